//! GPU batch kernels for TurboQuant_mse and TurboQuant_prod, written in WGSL and driven through `wgpu`: quantize
//! (randomized Hadamard or dense Haar rotation, codebook search, bit-packing into the CPU's 32-row block
//! layout), dequantize and exact scoring. The codes are those of the CPU path (tq-quant), so a
//! batch quantized here is an ordinary [`MseBatch`](tq_quant::MseBatch).
//!
//! - [`GpuContext`]: adapter and device selection (a discrete GPU first, then any adapter,
//!   Mesa's software Vulkan included), pipelines compiled once, typed errors for a missing
//!   adapter, shader validation, out-of-memory and a lost device.
//! - [`GpuContext::quantize_mse`], [`GpuContext::dequantize_mse`], [`GpuContext::upload`] (a
//!   resident batch) and [`ResidentBatch::score`] / [`ResidentBatch::top_k`]. Batches larger
//!   than one dispatch or one storage binding are split into chunks of whole 32-row blocks.
//! - [`GpuContext::quantize`], [`GpuContext::dequantize`], [`GpuContext::upload_batch`]: the
//!   same for a quantizer kind chosen at run time ([`tq_quant::AnyQuantizer`]).
//!
//! ```
//! use std::sync::Arc;
//! use tq_gpu::GpuContext;
//! use tq_quant::{MseConfig, MseQuantizer, RotationKind};
//!
//! let q = Arc::new(MseQuantizer::new(MseConfig::new(128, 4, RotationKind::Hadamard, 42))?);
//! let xs: Vec<f32> = (0..128 * 100).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
//! if let Ok(gpu) = GpuContext::new() {           // a GPU, or lavapipe (scripts/setup.sh)
//!     let batch = gpu.quantize_mse(&q, &xs)?;    // an ordinary MseBatch, the CPU's codes
//!     let on_device = gpu.upload(&batch)?;       // kept resident for repeated queries
//!     let best = on_device.top_k(&xs[..128], 5)?;
//!     assert_eq!(best[0].0, 0);
//! }
//! # Ok::<(), tq_gpu::Error>(())
//! ```
//!
//! Scope: MSE quantizers (any scale mode, centred or not) and Prod (`bits >= 2`), Hadamard or
//! dense Haar rotation, `d <= 1024`
//! (one row lives in workgroup memory). Other configurations are [`Error::Unsupported`].
//! Codes equal the CPU's except where a rotated coordinate lies within float rounding of a
//! codebook boundary (the GPU's `sqrt` and division may differ from the CPU's by an ulp).

mod any;
mod context;
mod error;
mod mse;
mod prod;
mod resident;

pub use context::{GpuContext, MAX_DIM};
pub use error::{Error, Result};
pub use resident::ResidentBatch;
