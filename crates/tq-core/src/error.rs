//! The error type shared by the tq primitives.

use thiserror::Error;

/// Errors raised by tq-core. Every variant carries the offending values so a caller can report
/// them without parsing a message.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum Error {
    /// A dimension below the supported minimum (every primitive needs `d >= 2`).
    #[error("dimension {dim} is not supported (need at least {min})")]
    DimTooSmall {
        /// The dimension that was given.
        dim: usize,
        /// The smallest dimension accepted.
        min: usize,
    },
    /// A bit width outside `1..=8`.
    #[error("bit width {bits} is out of range (expected 1..=8)")]
    BitsOutOfRange {
        /// The bit width that was given.
        bits: u32,
    },
    /// A slice whose length does not match the dimension it is used with.
    #[error("dimension mismatch: expected {expected}, got {got}")]
    DimMismatch {
        /// The length that was required.
        expected: usize,
        /// The length that was given.
        got: usize,
    },
    /// A buffer whose length is wrong for the operation.
    #[error("buffer length mismatch for {what}: expected {expected}, got {got}")]
    LengthMismatch {
        /// What the buffer holds.
        what: &'static str,
        /// The length that was required.
        expected: usize,
        /// The length that was given.
        got: usize,
    },
    /// A NaN or infinite value in an input vector.
    #[error("non-finite value {value} at index {index}")]
    NonFinite {
        /// The position of the first non-finite value.
        index: usize,
        /// The value found there.
        value: f32,
    },
    /// A packed code that is out of range for its bit width.
    #[error("code {code} at index {index} does not fit in {bits} bits")]
    CodeOutOfRange {
        /// The position of the code.
        index: usize,
        /// The offending code.
        code: u8,
        /// The bit width it had to fit in.
        bits: u32,
    },
}

/// Result alias for tq-core.
pub type Result<T> = std::result::Result<T, Error>;
