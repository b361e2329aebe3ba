//! TurboQuant quantizers over the tq-core primitives.
//!
//! - [`MseQuantizer`] (`TurboQuant_mse`): near-optimal mean squared error at `b` bits per coordinate;
//! - [`ProdQuantizer`] (`TurboQuant_prod`): unbiased inner products from `b - 1` MSE bits plus a
//!   1-bit QJL sketch of the residual;
//! - [`QjlSketch`]: the stand-alone QJL sign sketch with any sketch size;
//! - [`MseBatch`] / [`ProdBatch`]: packed, growable batches with parallel quantization, scoring on
//!   the packed codes through per-query look-up tables, top-k search, and safetensors I/O
//!   ([`io`]);
//! - [`Index`]: a faiss-shaped search index (inner product or L2, many queries in parallel) over
//!   a batch of any kind;
//! - [`EncodedVectors`]: the contract every batch meets, and [`AnyBatch`] / [`AnyQuantizer`] /
//!   [`AnyQuery`] over the kinds, built from a [`QuantizerSpec`] when the kind is chosen at run
//!   time.
//!
//! ```
//! use std::sync::Arc;
//! use tq_quant::{MseBatch, MseConfig, MseQuantizer, RotationKind};
//!
//! let q = Arc::new(MseQuantizer::new(MseConfig::new(64, 4, RotationKind::Hadamard, 7))?);
//! let data: Vec<f32> = (0..64 * 100).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
//! let mut batch = MseBatch::new(q.clone());
//! batch.extend(&data)?;
//! assert_eq!(batch.bytes_per_vector(), 64 * 4 / 8 + 4);
//! let query = q.prepare_query(&data[..64])?;
//! let hits = batch.top_k(&query, 3);
//! assert_eq!(hits.len(), 3);
//! # Ok::<(), tq_quant::Error>(())
//! ```

mod any;
pub mod config;
pub mod encoded;
mod error;
pub mod gmse;
pub mod index;
pub mod io;
pub mod kivi;
pub mod mse;
pub mod packed;
pub mod polar;
pub mod prod;
pub mod qjl;
mod residual;
pub mod scales;
pub mod score;

pub use any::{
    AnyBatch, AnyQuantizer, AnyQuery, DEFAULT_KIVI_GROUP, QuantizerKind, QuantizerSpec,
    polar_levels_for,
};
pub use config::{MseConfig, ProdConfig, QjlConfig, ScaleMode, ScalePrecision, SketchKind};
pub use encoded::EncodedVectors;
pub use error::{Error, Result};
pub use gmse::{GroupMseBatch, GroupMseConfig, GroupMseQuantizer, GroupMseQuery};
pub use index::{Index, Metric, SearchResults};
pub use kivi::{KiviAxis, KiviBatch, KiviConfig, KiviQuantizer, KiviQuery};
pub use mse::{ACCUMULATE_CHUNK_ROWS, MseBatch, MseQuantizer, MseQuery};
pub use packed::PackedRows;
pub use polar::{PolarBatch, PolarConfig, PolarQuantizer, PolarQuery};
pub use prod::{ProdBatch, ProdQuantizer, ProdQuery};
pub use qjl::QjlSketch;
pub use scales::RowScales;
pub use score::Hit;
pub use tq_core::RotationKind;
