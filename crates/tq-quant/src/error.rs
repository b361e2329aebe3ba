//! The error type of tq-quant.

use thiserror::Error;

/// Errors raised by the quantizers, batches and their serialization.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from the primitives (dimension, bit width, lengths).
    #[error(transparent)]
    Core(#[from] tq_core::Error),
    /// A bit width outside the range a quantizer accepts.
    #[error("bit width {bits} is out of range for {quantizer} (expected {min}..={max})")]
    BitsOutOfRange {
        /// The quantizer the width was given to.
        quantizer: &'static str,
        /// The width given.
        bits: u32,
        /// Smallest accepted width.
        min: u32,
        /// Largest accepted width.
        max: u32,
    },
    /// A dimension too large for the chosen construction (it would allocate unboundedly).
    #[error("dimension {dim} exceeds the supported maximum {max} for {what}")]
    DimTooLarge {
        /// What the limit applies to.
        what: &'static str,
        /// The dimension given.
        dim: usize,
        /// The largest accepted dimension.
        max: usize,
    },
    /// A sketch size outside `1..=max`.
    #[error("sketch size {m} is out of range (expected 1..={max})")]
    SketchSizeOutOfRange {
        /// The sketch size given.
        m: usize,
        /// The largest accepted sketch size.
        max: usize,
    },
    /// A vector of the wrong length.
    #[error("dimension mismatch: expected {expected}, got {got}")]
    DimMismatch {
        /// Required length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// A NaN or infinite input value.
    #[error("non-finite value {value} at index {index}")]
    NonFinite {
        /// Flat index of the first non-finite value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A value outside what a quantizer stores (the grouped kinds keep f16 zeros and means, so
    /// their inputs must lie within `±max`).
    #[error("value {value} at index {index} is outside ±{max}, the range this quantizer stores")]
    ValueOutOfRange {
        /// Flat index of the first such value.
        index: usize,
        /// The value.
        value: f32,
        /// The largest magnitude accepted.
        max: f32,
    },
    /// A vector whose stored scale does not fit the configured width
    /// ([`ScalePrecision::F16`](crate::ScalePrecision::F16) holds at most 65 504).
    #[error(
        "row {row}'s scale {scale} exceeds {max}, the largest scale this batch stores (use f32 scales)"
    )]
    ScaleOverflow {
        /// Row of the first such vector within the rows given.
        row: usize,
        /// Its scale.
        scale: f32,
        /// The largest scale the width holds.
        max: f32,
    },
    /// A row index past the end of a batch.
    #[error("row {index} is out of range for a batch of {len} rows")]
    RowOutOfRange {
        /// The index given.
        index: usize,
        /// The batch length.
        len: usize,
    },
    /// Two objects built from different configurations were combined.
    #[error("configuration mismatch: {0}")]
    ConfigMismatch(String),
    /// Bytes that are not a valid saved batch; `what` names the part that is wrong.
    #[error("invalid saved batch ({what}): {detail}")]
    InvalidFormat {
        /// The tensor, metadata key or header part at fault.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A saved batch written by an unsupported format version.
    #[error("unsupported format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version in the file.
        found: String,
        /// The version this build reads.
        supported: u32,
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
}

/// Result alias for tq-quant.
pub type Result<T> = std::result::Result<T, Error>;

/// Rejects non-finite values, reporting the first one.
pub(crate) fn check_finite(xs: &[f32]) -> Result<()> {
    // Branch-free scan in chunks (vectorises); the exact position is looked up only on failure.
    const EXP: u32 = 0x7f80_0000;
    let bad = xs.chunks(256).any(|c| {
        c.iter()
            .fold(0u32, |acc, v| acc | ((v.to_bits() & EXP == EXP) as u32))
            != 0
    });
    if bad && let Some((index, &value)) = xs.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite { index, value });
    }
    Ok(())
}

/// Rejects values of magnitude above `max` (after [`check_finite`]), reporting the first one.
pub(crate) fn check_range(xs: &[f32], max: f32) -> Result<()> {
    if let Some((index, &value)) = xs.iter().enumerate().find(|(_, v)| v.abs() > max) {
        return Err(Error::ValueOutOfRange { index, value, max });
    }
    Ok(())
}

/// Rejects a buffer whose length is not `expected` (`Core(LengthMismatch)` naming `what`).
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if got != expected {
        return Err(tq_core::Error::LengthMismatch {
            what,
            expected,
            got,
        }
        .into());
    }
    Ok(())
}

/// Rejects a vector whose length is not `dim`.
pub(crate) fn check_dim(xs: &[f32], dim: usize) -> Result<()> {
    if xs.len() != dim {
        return Err(Error::DimMismatch {
            expected: dim,
            got: xs.len(),
        });
    }
    Ok(())
}

/// The rows of a row-major batch: rejects one whose length is not a multiple of `dim`.
pub(crate) fn check_rows(xs: &[f32], dim: usize) -> Result<usize> {
    if !xs.len().is_multiple_of(dim) {
        return Err(Error::DimMismatch {
            expected: dim,
            got: xs.len() % dim,
        });
    }
    Ok(xs.len() / dim)
}

/// The rows of a row-major batch: rejects one whose length is not a multiple of `dim`
/// ([`check_rows`]) or that holds a non-finite value ([`check_finite`]).
pub(crate) fn check_batch(xs: &[f32], dim: usize) -> Result<usize> {
    let n = check_rows(xs, dim)?;
    check_finite(xs)?;
    Ok(n)
}
