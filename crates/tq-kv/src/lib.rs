//! Quantized KV caches for LLM inference, with attention computed on TurboQuant codes.
//!
//! - [`HeadCache`]: one head's keys and values (keys MSE or Prod, values MSE), each at its own
//!   [`Precision`] (uniform, or the paper's fractional widths by outlier-channel splitting), an
//!   optional attention sink and window of recent tokens kept unquantized (f32 or f16 rows),
//!   attention and raw scores on the packed codes;
//! - [`MultiHeadCache`] (grouped-query attention, heads in parallel) and [`ModelCache`];
//! - [`Precision`] for mixed precision, [`HeadCalibration`] (outlier channels and means from
//!   samples) and [`calibrate_outliers`];
//! - [`KvTrace`]: the safetensors trace format, and [`SyntheticTrace`] with realistic outliers.
//!
//! ```
//! use tq_kv::{HeadCache, HeadConfig, HeadCalibration, Precision};
//!
//! let d = 64;
//! let mut cache = HeadCache::new(HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(4)), &HeadCalibration::default())?;
//! let keys: Vec<f32> = (0..10 * d).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
//! cache.append(&keys, &keys)?;
//! let mut out = vec![0.0; d];
//! cache.attend(&keys[..d], &mut out)?;
//! assert!(cache.memory_bytes() * 3 < cache.f16_bytes());
//! # Ok::<(), tq_kv::Error>(())
//! ```

pub mod calibration;
mod error;
pub mod head;
pub mod multi;
pub mod persist;
pub mod precision;
pub mod rows;
mod store;
pub mod trace;

pub use calibration::{HeadCalibration, OutlierChoice};
pub use error::{Error, Result};
pub use head::{HeadCache, HeadConfig, ScoreMode};
pub use multi::{MAX_HEADS, ModelCache, MultiHeadCache};
pub use precision::{Precision, calibrate_outliers, calibrate_outliers_grouped};
pub use rows::WindowPrecision;
pub use store::{KeyStrategy, ValueStrategy};
pub use tq_core::RotationKind;
pub use trace::{KvTrace, SyntheticTrace, TraceMeta};
