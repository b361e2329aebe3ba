//! The error type of tq-kv.

use thiserror::Error;

/// Errors raised by the KV caches.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from the quantizers.
    #[error(transparent)]
    Quant(#[from] tq_quant::Error),
    /// A slice whose length does not fit the cache's shape.
    #[error("{what}: expected {expected} values, got {got}")]
    Shape {
        /// What the slice holds.
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A NaN or infinite value in keys, values or queries.
    #[error("non-finite value {value} in {what} at index {index}")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Flat index of the first non-finite value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A precision specification that cannot be used.
    #[error("invalid precision '{spec}': {reason}")]
    InvalidPrecision {
        /// The specification given.
        spec: String,
        /// Why it was rejected.
        reason: String,
    },
    /// An outlier channel list that does not fit the head dimension.
    #[error("invalid outlier channels: {reason}")]
    InvalidChannels {
        /// Why they were rejected.
        reason: String,
    },
    /// Query and KV head counts that do not form grouped-query attention.
    #[error(
        "{n_q_heads} query heads cannot share {n_kv_heads} kv heads (need a positive multiple, at most 65536)"
    )]
    HeadCounts {
        /// Query heads.
        n_q_heads: usize,
        /// KV heads.
        n_kv_heads: usize,
    },
    /// A trace file that does not follow the trace format; `tensor` names the tensor or metadata
    /// key at fault.
    #[error("invalid trace ({tensor}): {reason}")]
    Trace {
        /// The tensor or metadata key at fault.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// Bytes that are not a valid saved cache; `tensor` names the tensor or key at fault.
    #[error("invalid saved cache ({tensor}): {reason}")]
    InvalidCache {
        /// The tensor or metadata key at fault.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error while reading or writing a file; the cause is kept as the error's source.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A causal limit past the cached tokens.
    #[error("query attends to {limit} tokens but the cache holds {len}")]
    PositionOutOfRange {
        /// Tokens the query asked to attend to.
        limit: usize,
        /// Tokens in the cache.
        len: usize,
    },
}

/// Result alias for tq-kv.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Shape {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

pub(crate) fn check_finite(what: &'static str, xs: &[f32]) -> Result<()> {
    if let Some((index, &value)) = xs.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite { what, index, value });
    }
    Ok(())
}

/// Replaces `path` with `bytes` crash-safely (`tq_core::fsio::write_atomic`), mapping failures
/// to [`Error::Io`].
pub(crate) fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    tq_core::fsio::write_atomic(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `path`, mapping failures to [`Error::Io`].
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Why `bytes` did not open as safetensors, in words a user recognises: another known format by
/// its magic bytes, else the parser's own message.
pub(crate) fn not_safetensors(bytes: &[u8], e: &safetensors::SafeTensorError) -> String {
    if bytes.starts_with(b"\x93NUMPY") {
        "this is a NumPy .npy file, not a safetensors file".into()
    } else if bytes.starts_with(b"PK\x03\x04") {
        "this is a zip archive (e.g. .npz), not a safetensors file".into()
    } else if bytes.len() < 8 {
        format!("{} bytes are too short for a safetensors file", bytes.len())
    } else {
        format!("not a safetensors file ({e})")
    }
}
