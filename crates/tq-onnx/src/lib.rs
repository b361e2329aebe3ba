//! Decoder-only ONNX language models run by tract, with their KV cache exact or stored as
//! TurboQuant codes through tq-kv, and the metrics that say how far the quantized run drifts.
//!
//! - [`Bundle`]: a model directory (`model.onnx` | `decoder_model_merged.onnx` |
//!   `decoder_model.onnx`, `tokenizer.json`, `config.json`), validated with typed errors;
//! - [`Decoder`]: the graph optimized once for symbolic lengths, one step at a time with
//!   explicit past key-values;
//! - [`Sequence`] with a [`CacheSpec`]: exact, or quantized (only the new tokens' K/V are
//!   quantized each step; the float past fed back is decoded from the codes, so tract still runs
//!   float attention while the cache's storage and information are quantized);
//! - [`Attention::Native`]: the native path of the project's exports (tract runs the model cut
//!   around attention; tq-kv attends on its packed codes, no float past);
//! - [`generate`], [`replay`], [`teacher_forced`], [`trace_of`] and the [`LogitComparison`]
//!   metrics (logit RMSE, top-1, top-k, KL, perplexity).
//!
//! ```
//! use tq_kv::{HeadConfig, Precision};
//! use tq_onnx::{CacheSpec, Decoder, Keep, Sampling, generate, replay};
//!
//! let decoder = Decoder::open("../../fixtures/tiny-llama")?;
//! let prompt = decoder.bundle().encode("The capital of France is")?;
//! let exact = generate(&decoder, &CacheSpec::Exact, &prompt, 8, Sampling::Greedy,
//!     Keep { logits: true, ..Keep::default() }, &mut || {})?;
//! let d = decoder.head_dim();
//! let spec = CacheSpec::Quantized {
//!     config: HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(4)),
//!     calibration: Vec::new(),
//! };
//! let (run, cmp) = replay(&decoder, &spec, &prompt, &exact.tokens, &exact.logits, 5, &mut || {})?;
//! assert_eq!(cmp.summary().steps, exact.tokens.len());
//! assert!(run.kv_bytes * 3 < run.f16_bytes);
//! # Ok::<(), tq_onnx::Error>(())
//! ```

pub mod bundle;
pub mod cache;
mod error;
pub mod eval;
pub mod metrics;
pub mod native;
pub mod runner;

pub use bundle::{Bundle, ModelConfig};
pub use cache::{CacheSpec, Sequence, calibrate};
pub use error::{Error, Result};
pub use eval::{
    Keep, LayerKv, Run, RunTrace, Sampling, Timing, TraceQueries, generate, replay, teacher_forced,
    token_match, trace_of,
};
pub use metrics::{LogitComparison, LogitMetrics};
pub use runner::{Attention, Decoder, KvTensors, StepOutput};
pub use tq_kv::OutlierChoice;
