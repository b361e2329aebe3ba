//! The error type of tq-gpu.

/// Errors of tq-gpu.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter was found (no GPU and no software rasterizer such as lavapipe).
    #[error("no GPU adapter found (install Mesa's software Vulkan: scripts/setup.sh)")]
    NoAdapter,
    /// The adapter refused to create a device.
    #[error("cannot create a device on {adapter}: {reason}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's reason.
        reason: String,
    },
    /// The device reported a validation error (shader or pipeline).
    #[error("GPU validation error: {0}")]
    Validation(String),
    /// The device ran out of memory.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    /// The device was lost or a map or poll failed.
    #[error("GPU device error: {0}")]
    Device(String),
    /// The quantizer or request is outside what the kernels implement.
    #[error("not supported on the GPU path: {0}")]
    Unsupported(String),
    /// The input was rejected by tq-quant's checks.
    #[error(transparent)]
    Quant(#[from] tq_quant::Error),
}

/// Result alias of tq-gpu.
pub type Result<T, E = Error> = std::result::Result<T, E>;
