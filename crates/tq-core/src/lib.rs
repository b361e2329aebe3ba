//! TurboQuant primitives: the pieces every tq quantizer is built from.
//!
//! - [`Rotation`]: seeded random rotations (dense Haar, randomized Hadamard for any `d >= 2`);
//! - [`Codebook`]: Lloyd-Max codebooks for the coordinate law of a rotated unit vector, cached per
//!   `(d, b)`;
//! - [`bitpack`]: LSB-first packing of `b`-bit codes, `b` in `1..=8`;
//! - [`simd`] and [`scan`]: runtime-dispatched kernels with scalar twins;
//! - [`prefetch`]: a second stream asked for in step with a scan (attention's value rows while
//!   its keys are scored);
//! - [`SeededRng`]: the portable random source behind every seed;
//! - [`fsio`]: crash-safe file writes (temporary file, sync, rename).
//!
//! ```
//! use tq_core::{Codebook, Rotation, RotationKind, bitpack};
//!
//! let rot = Rotation::new(RotationKind::Hadamard, 96, 42)?;
//! let x: Vec<f32> = (0..96).map(|i| ((i * 7 % 13) as f32 - 6.0) / 20.0).collect();
//! let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
//! let unit: Vec<f32> = x.iter().map(|v| v / norm).collect();
//! let mut y = vec![0.0; 96];
//! rot.apply(&unit, &mut y)?;
//! let cb = Codebook::get(96, 3)?;
//! let mut codes = vec![0u8; 96];
//! cb.quantize_slice(&y, &mut codes);
//! let mut packed = vec![0u8; bitpack::packed_len(96, 3)];
//! bitpack::pack(&codes, 3, &mut packed)?;
//! assert_eq!(packed.len(), 36);
//! # Ok::<(), tq_core::Error>(())
//! ```

pub mod bitpack;
pub mod codebook;
mod error;
pub mod fsio;
pub mod half_simd;
pub mod prefetch;
pub mod rng;
pub mod rotation;
pub mod scan;
pub mod shared;
pub mod simd;

pub use codebook::Codebook;
pub use error::{Error, Result};
pub use rng::SeededRng;
pub use rotation::{HadamardParams, Rotation, RotationKind};
