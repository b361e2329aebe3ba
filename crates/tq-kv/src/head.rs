//! [`HeadCache`]: the quantized keys and values of one attention head, with attention computed on
//! the packed codes (docs/DESIGN.md, Data flow).
//!
//! Tokens are appended at the end. Keys and values are quantized independently, each with its own
//! strategy and [`Precision`]. An optional full-precision window keeps the most recent `W` tokens
//! as f32 and quantizes each token when it ages out, so a token's code never depends on how the
//! cache was filled (one token at a time, in blocks, or restored). An optional sink keeps the
//! first `S` tokens as f32 for good (the attention sink: in most layers the first tokens draw a
//! large share of every query's attention). Token order: sink, quantized tokens, window.
//!
//! Attention for a query `q`: `s_t = ⟨q, k̃_t⟩ / sqrt(d)` through the per-query look-up tables of
//! the key codes (exact dot products for window tokens), a max-subtracted softmax, and
//! `Σ_t p_t ṽ_t` accumulated in the rotated domain of the value quantizer and rotated back once per
//! query. With [`ScoreMode::Exact`] the result equals attention over the dequantized cache up to
//! float rounding; [`ScoreMode::Fast`] scores through `u8` tables or, for TurboQuant keys of 5-8
//! bits, integer dots (4 bits with AVX-512 VBMI and VNNI: byte dots), and sums TurboQuant values
//! in integers (see tq-quant).

use std::borrow::Cow;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use tq_core::RotationKind;
use tq_quant::{KiviAxis, ScaleMode, ScalePrecision};

use crate::calibration::HeadCalibration;
use crate::error::{check_finite, check_len};
use crate::precision::Precision;
use crate::rows::{PlainRows, WindowPrecision};
use crate::store::{KeyStrategy, Store, StreamSpec, ValueStrategy};
use crate::{Error, Result};

thread_local! {
    /// Scratch for [`HeadCache::attend_fresh`]'s attention weights, kept between calls on each
    /// thread (rayon's workers attend to heads in parallel, each with its own).
    static PROBS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest scratch [`PROBS`] keeps between calls (4 MiB: a decode step's queries over a
/// long context).
const PROBS_KEPT: usize = 1 << 20;

/// How attention reads the codes: key scores, and the weighted sum of TurboQuant values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScoreMode {
    /// Keys: `u8` look-up tables and the SIMD scan (TurboQuant keys at 1-4 bits, KIVI keys),
    /// byte dots on a `u8` grid (TurboQuant keys at 4 bits where the CPU has AVX-512 VBMI and
    /// VNNI), integer dots on the codebook's grid (TurboQuant keys at 5-8 bits). Values: TurboQuant
    /// values summed in integers on the codebook's grid with the weights on `i16` (1-4 bits
    /// where the CPU has AVX-512 BW and VNNI: byte sums, the codebook on an 8-bit grid and the
    /// weights on `u8`; other values exactly). The extra error is a fraction of the quantization
    /// error: for TurboQuant keys an RMS ratio of 0.19 at 4 bits (under 2% more RMS score error;
    /// 0.08 with the byte dots), 0.003 / 0.007 / 0.016 / 0.030 at 5 / 6 / 7 / 8 bits; for values
    /// 0.0001-0.0006 at 1-3 bits, 0.001 / 0.002 / 0.005 / 0.012 / 0.025 at 4-8 bits (with the
    /// byte sums 0.003-0.033 at 1-3 bits and 0.05-0.08 at 4, under 0.4% more RMS output error).
    #[default]
    Fast,
    /// `f32` look-up tables and `f32` sums: the same function as attention over the dequantized
    /// cache.
    Exact,
}

/// Configuration of one head's cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Head dimension `d >= 2`.
    pub head_dim: usize,
    /// Key quantizer.
    pub key_strategy: KeyStrategy,
    /// Key bits.
    pub key_precision: Precision,
    /// Value bits.
    pub value_precision: Precision,
    /// Value quantizer: [`ValueStrategy::Mse`] (default) or [`ValueStrategy::Polar`].
    #[serde(default)]
    pub value_strategy: ValueStrategy,
    /// Most recent tokens kept unquantized (0: quantize every token at once), at
    /// [`HeadConfig::window_precision`].
    pub window: usize,
    /// First tokens kept unquantized for good (0: none). Caches saved before the field existed have
    /// none.
    #[serde(default)]
    pub sink: usize,
    /// Rotation of every quantizer.
    pub rotation: RotationKind,
    /// Seed of the key quantizers; the value quantizers use an independent derived seed.
    pub seed: u64,
    /// Per-vector scalar of the MSE key and value quantizers (Prod keys always store the norm).
    #[serde(default)]
    pub scale: ScaleMode,
    /// Stored width of that scalar (MSE streams only: KIVI keeps f16 scales and zeros, Prod,
    /// gmse and polar f32 norms whatever this says). Caches saved before the field existed hold
    /// f32 scales.
    #[serde(default)]
    pub scale_precision: ScalePrecision,
    /// Centre MSE keys and values on calibrated means ([`HeadCalibration::key_mean`] / `value_mean`);
    /// scores add `⟨q, mean⟩` and attention outputs add the value mean back.
    #[serde(default)]
    pub center: bool,
    /// How key scores are computed.
    pub score_mode: ScoreMode,
    /// The group size `G` of the grouped strategies (a power of two in 16..=128): KIVI's tokens
    /// per key group and channels per value group, gmse's tokens per group. Ignored by the others.
    #[serde(default = "default_group")]
    pub group: usize,
    /// Stored width of the sink and window tokens. Caches saved before the field existed hold
    /// f32 rows.
    #[serde(default)]
    pub window_precision: WindowPrecision,
}

fn default_group() -> usize {
    tq_quant::DEFAULT_KIVI_GROUP
}

impl HeadConfig {
    /// MSE keys and values at the given precisions, no window, Hadamard rotation, seed 0, fast scores.
    pub fn new(head_dim: usize, key_precision: Precision, value_precision: Precision) -> Self {
        Self {
            head_dim,
            key_strategy: KeyStrategy::Mse,
            key_precision,
            value_precision,
            value_strategy: ValueStrategy::Mse,
            window: 0,
            sink: 0,
            rotation: RotationKind::Hadamard,
            seed: 0,
            scale: ScaleMode::Norm,
            scale_precision: ScalePrecision::F32,
            center: false,
            score_mode: ScoreMode::Fast,
            group: default_group(),
            window_precision: WindowPrecision::F32,
        }
    }
}

impl HeadConfig {
    /// The paper's plain configuration: TurboQuant_mse at 4 bits for keys and values, norm
    /// scales, no window, Hadamard rotation (4.5 stored bits per coordinate at d = 64).
    pub fn paper(head_dim: usize) -> Self {
        Self::new(head_dim, Precision::Uniform(4), Precision::Uniform(4))
    }

    /// The documented default for LLM KV caches (docs/CHOOSING.md): 4-bit KIVI keys (per-channel
    /// groups of 64 tokens, f16 scale and zero, the newest incomplete group in f16), 3-bit
    /// TurboQuant_mse values with least-squares f16 scales, the first 4 tokens (the attention
    /// sink) and the 12 most recent kept unquantized in f16, Hadamard rotation. Chosen as the
    /// fewest stored bits per coordinate measured to keep perplexity within 2% of the exact cache
    /// and next-token top-1 agreement at or above 0.95 on SmolLM2-135M-Instruct in all four
    /// checks: teacher-forced over 2 000 tokens of `fixtures/jargon-chapters.txt` (3.97 bits,
    /// x1.006, top-1 0.952) and 299 tokens of each of two English texts, and greedy 64-token
    /// continuations of an 8-prompt suite. Its keys are KIVI's, not TurboQuant's: per-channel
    /// zero points remove the post-RoPE keys' channel offsets that a rotation would spread
    /// (docs/REAL_MODEL.md). Decode attention on its keys takes 0.91x the time of 4-bit
    /// TurboQuant keys at 32 768 tokens (d = 128, 4-bit values; integer dot products per key
    /// group, on a CPU with AVX-512 VBMI and VNNI; 1.07x on its AVX2 kernels).
    pub fn recommended(head_dim: usize) -> Self {
        Self {
            key_strategy: KeyStrategy::Kivi,
            group: 64,
            window: 12,
            sink: 4,
            scale: ScaleMode::LeastSquares,
            scale_precision: ScalePrecision::F16,
            window_precision: WindowPrecision::F16,
            ..Self::new(head_dim, Precision::Uniform(4), Precision::Uniform(3))
        }
    }

    /// The compact configuration, under 4 stored bits per coordinate at 2 000 tokens: the
    /// default with its KIVI keys split, 4 bits on the half of the channels that swing most
    /// inside groups and 3 bits on the rest (3-bit TurboQuant_mse values with least-squares f16
    /// scales, a 4-token sink and a 12-token window in f16, as the default). On SmolLM2-135M-Instruct (`head_dim` 64:
    /// `4x32+3` keys) it stores 3.72 bits per coordinate at 2 000 tokens of
    /// `fixtures/jargon-chapters.txt` and kept all four checks of [`HeadConfig::recommended`]:
    /// x1.005 / top-1 0.951 there, prose x1.010 / 0.957, expository x0.991 / 0.980, the prompt
    /// suite x1.004 / 0.969 (docs/REAL_MODEL.md).
    ///
    /// The key split needs calibrated channels: build the cache with
    /// `HeadCalibration::from_samples(&config, keys, values, &OutlierChoice::Auto)` on sample
    /// key-values of the head (tq-onnx's `calibrate` does it from a prompt). `head_dim >= 4`.
    pub fn compact(head_dim: usize) -> Self {
        let half = head_dim / 2;
        Self {
            key_precision: Precision::Split {
                outlier_bits: 4,
                outlier_channels: half,
                regular_bits: 3,
            },
            ..Self::recommended(head_dim)
        }
    }
}

/// A head's serialized parts (see [`crate::persist`]).
pub(crate) struct SavedParts<'a> {
    pub(crate) keys: Vec<Vec<u8>>,
    pub(crate) values: Vec<Vec<u8>>,
    pub(crate) window_keys: &'a PlainRows,
    pub(crate) window_values: &'a PlainRows,
    pub(crate) sink_keys: &'a PlainRows,
    pub(crate) sink_values: &'a PlainRows,
}

const VALUE_SEED_OFFSET: u64 = 0x5641_4c55_4553_0001;

/// The cache of one attention head.
#[derive(Debug, Clone)]
pub struct HeadCache {
    config: HeadConfig,
    keys: Store,
    values: Store,
    window_keys: PlainRows,
    window_values: PlainRows,
    sink_keys: PlainRows,
    sink_values: PlainRows,
}

impl HeadCache {
    /// An empty cache.
    ///
    /// # Errors
    /// Invalid dimension or precision, or missing / malformed outlier channels for a split.
    pub fn new(config: HeadConfig, outliers: &HeadCalibration) -> Result<Self> {
        let d = config.head_dim;
        fn mean<'a>(
            center: bool,
            m: &'a Option<Vec<f32>>,
            what: &str,
        ) -> Result<Option<&'a [f32]>> {
            if !center {
                return Ok(None);
            }
            m.as_deref()
                .map(Some)
                .ok_or_else(|| Error::InvalidChannels {
                    reason: format!("a centred cache needs its {what} mean"),
                })
        }
        let stream = StreamSpec {
            dim: d,
            precision: config.key_precision,
            strategy: config.key_strategy,
            scale: config.scale,
            scale_precision: config.scale_precision,
            rotation: config.rotation,
            seed: config.seed,
            group: config.group,
            axis: KiviAxis::Channel,
            outliers: outliers.keys.as_deref(),
            mean: mean(config.center, &outliers.key_mean, "key")?,
        };
        let keys = Store::new(&stream)?;
        let values = Store::new(&StreamSpec {
            precision: config.value_precision,
            strategy: config.value_strategy.into(),
            seed: config.seed ^ VALUE_SEED_OFFSET,
            axis: KiviAxis::Token,
            outliers: outliers.values.as_deref(),
            mean: mean(config.center, &outliers.value_mean, "value")?,
            ..stream
        })?;
        let rows = PlainRows::new(config.window_precision);
        Ok(Self {
            config,
            keys,
            values,
            window_keys: rows.clone(),
            window_values: rows.clone(),
            sink_keys: rows.clone(),
            sink_values: rows,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HeadConfig {
        &self.config
    }

    /// The calibration in use (outlier channels and means).
    pub fn outliers(&self) -> HeadCalibration {
        HeadCalibration {
            keys: self.keys.outliers().map(<[usize]>::to_vec),
            values: self.values.outliers().map(<[usize]>::to_vec),
            key_mean: self.keys.mean(),
            value_mean: self.values.mean(),
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.sink_len() + self.keys.len() + self.window_len()
    }

    /// True when no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens held as codes (positions `sink_len()..sink_len() + quantized_len()`).
    pub fn quantized_len(&self) -> usize {
        self.keys.len()
    }

    /// Tokens held in the sink (the first ones, unquantized, at most `config.sink`).
    pub fn sink_len(&self) -> usize {
        self.sink_keys.len() / self.config.head_dim
    }

    /// Leading tokens whose decoded keys and values are final: later appends never change them.
    /// Tokens past it (the window, and the pending group of KIVI keys or gmse streams) may decode
    /// differently after the next append, so a consumer mirroring decoded rows re-reads from
    /// here. `<= sink_len() + quantized_len()`.
    pub fn settled_len(&self) -> usize {
        self.sink_len() + self.keys.settled_len().min(self.values.settled_len())
    }

    /// Checks `n` tokens as [`HeadCache::append`] would, changing nothing.
    ///
    /// # Errors
    /// As [`HeadCache::append`].
    pub fn check_append(&self, keys: &[f32], values: &[f32]) -> Result<()> {
        let d = self.config.head_dim;
        if !keys.len().is_multiple_of(d) {
            return Err(Error::Shape {
                what: "keys",
                expected: keys.len() / d * d,
                got: keys.len(),
            });
        }
        check_len("values", values.len(), keys.len())?;
        check_finite("keys", keys)?;
        check_finite("values", values)?;
        // The tokens that enter the sink or the window must fit their stored width.
        let sink = self
            .config
            .sink
            .saturating_sub(self.sink_len())
            .min(keys.len() / d)
            * d;
        let plain = if self.config.window > 0 {
            keys.len()
        } else {
            sink
        };
        let width = self.config.window_precision;
        width.check(&keys[..plain])?;
        width.check(&values[..plain])?;
        self.keys.check_rows(keys)?;
        self.values.check_rows(values)
    }

    /// Tokens held in the window (unquantized).
    pub fn window_len(&self) -> usize {
        self.window_keys.len() / self.config.head_dim
    }

    /// Exact bytes held: codes and every scale of the quantized tokens, rows a strategy keeps
    /// unquantized (KIVI's key residual) at their stored width, plus the window and sink rows at
    /// theirs.
    pub fn memory_bytes(&self) -> usize {
        self.keys.stored_bytes()
            + self.values.stored_bytes()
            + self.window_keys.stored_bytes()
            + self.window_values.stored_bytes()
            + self.sink_keys.stored_bytes()
            + self.sink_values.stored_bytes()
    }

    /// Bytes the same tokens take as f16 keys and values.
    pub fn f16_bytes(&self) -> usize {
        2 * 2 * self.len() * self.config.head_dim
    }

    /// Appends `n = keys.len() / d` tokens (row-major f32 keys and values, any norms).
    ///
    /// # Errors
    /// [`Error::Shape`] when the lengths are not `n · d` for the same `n`, [`Error::NonFinite`],
    /// and with KIVI or gmse streams `Quant(ValueOutOfRange)` for a value beyond f16's range;
    /// nothing is appended then.
    pub fn append(&mut self, keys: &[f32], values: &[f32]) -> Result<()> {
        // Every stream accepts the rows before anything changes (the grouped kinds refuse values
        // f16 cannot hold), so a refused append leaves keys, values and window as they were.
        self.check_append(keys, values)?;
        let (keys, values) = self.fill_sink(keys, values);
        if self.config.window == 0 {
            self.keys.extend(keys)?;
            return self.values.extend(values);
        }
        self.window_keys.extend(keys);
        self.window_values.extend(values);
        self.settle()
    }

    /// Appends `n` tokens and computes, in the same call, the attention of a block of queries
    /// (row-major `m · d`, query `i` over the first `limits[i]` tokens of the cache *with* the new
    /// ones, `1 <= limits[i] <= len + n`) in which the new tokens are still exact, as a model's own
    /// forward pass sees the tokens it computes; then the tokens that leave the window are
    /// quantized. This is one decoder step on the cache: the same codes attended by a float past
    /// decoded from them (the new tokens exact) give the same output up to float rounding.
    ///
    /// # Errors
    /// As [`HeadCache::append`] and [`HeadCache::attend_block`]; nothing changes when the tokens,
    /// queries or limits are refused.
    pub fn append_attend(
        &mut self,
        keys: &[f32],
        values: &[f32],
        queries: &[f32],
        limits: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        let d = self.config.head_dim;
        self.check_append(keys, values)?;
        check_len("queries", queries.len(), limits.len() * d)?;
        check_len("output", out.len(), queries.len())?;
        check_finite("queries", queries)?;
        let len = self.len() + keys.len() / d;
        if let Some(&limit) = limits.iter().find(|&&l| l == 0 || l > len) {
            return Err(Error::PositionOutOfRange { limit, len });
        }
        let (rest_k, rest_v) = self.fill_sink(keys, values);
        self.window_keys.extend(rest_k);
        self.window_values.extend(rest_v);
        let attended = self.attend_fresh(queries, limits, out, Some((keys, values)));
        // The tokens are in either way; what left the window is quantized even if attention
        // failed, so the window never stays beyond its size.
        let settled = if self.config.window == 0 {
            // The new tokens only passed through the window (attended exact): quantize them
            // from their exact values, as `append` does, not from the window's stored rounding.
            self.window_keys.truncate(0);
            self.window_values.truncate(0);
            self.keys
                .extend(rest_k)
                .and_then(|()| self.values.extend(rest_v))
        } else {
            self.settle()
        };
        attended.and(settled)
    }

    /// Moves the leading tokens of `keys` / `values` (trusted, whole rows) into the sink while it
    /// has room; returns the rest.
    fn fill_sink<'a>(&mut self, keys: &'a [f32], values: &'a [f32]) -> (&'a [f32], &'a [f32]) {
        let d = self.config.head_dim;
        let take = self
            .config
            .sink
            .saturating_sub(self.sink_len())
            .min(keys.len() / d);
        self.sink_keys.extend(&keys[..take * d]);
        self.sink_values.extend(&values[..take * d]);
        (&keys[take * d..], &values[take * d..])
    }

    /// Quantizes the oldest window tokens beyond the window size (all of them when it is 0),
    /// straight from the window, and drops them from it.
    fn settle(&mut self) -> Result<()> {
        let d = self.config.head_dim;
        let over = self.window_len().saturating_sub(self.config.window);
        if over > 0 {
            // Quantize the aged tokens straight from the window, then drop them from it.
            self.keys.extend(&self.window_keys.to_f32()[..over * d])?;
            self.values
                .extend(&self.window_values.to_f32()[..over * d])?;
            self.window_keys.drain_front(over * d);
            self.window_values.drain_front(over * d);
        }
        Ok(())
    }

    /// [`HeadCache::append`] for f16 inputs (converted exactly to f32).
    ///
    /// # Errors
    /// As [`HeadCache::append`].
    pub fn append_f16(&mut self, keys: &[f16], values: &[f16]) -> Result<()> {
        let k: Vec<f32> = keys.iter().map(|v| v.to_f32()).collect();
        let v: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
        self.append(&k, &v)
    }

    /// [`HeadCache::append`] for bf16 inputs (converted exactly to f32).
    ///
    /// # Errors
    /// As [`HeadCache::append`].
    pub fn append_bf16(&mut self, keys: &[bf16], values: &[bf16]) -> Result<()> {
        let k: Vec<f32> = keys.iter().map(|v| v.to_f32()).collect();
        let v: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
        self.append(&k, &v)
    }

    /// Keeps the first `n` tokens (speculative-decoding rollback). Tokens that were already
    /// quantized stay quantized: the window then holds only tokens that never aged out. Sink
    /// tokens stay in the sink.
    pub fn truncate(&mut self, n: usize) {
        let d = self.config.head_dim;
        let s = self.sink_len();
        if n < s {
            self.sink_keys.truncate(n * d);
            self.sink_values.truncate(n * d);
        }
        let n = n.saturating_sub(s);
        let q = self.quantized_len();
        if n >= q {
            let keep = (n - q).min(self.window_len());
            self.window_keys.truncate(keep * d);
            self.window_values.truncate(keep * d);
        } else {
            self.keys.truncate(n);
            self.values.truncate(n);
            self.window_keys.truncate(0);
            self.window_values.truncate(0);
        }
    }

    /// Removes every token.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Tokens `start..len` decoded into `len - start` rows (sink and window rows copied,
    /// quantized rows from their codes).
    fn reconstruct_from(
        &self,
        store: &Store,
        sink: &PlainRows,
        window: &PlainRows,
        start: usize,
    ) -> Result<Vec<f32>> {
        let d = self.config.head_dim;
        let (s, q) = (self.sink_len(), self.quantized_len());
        let start = start.min(self.len());
        let mut out = Vec::with_capacity((self.len() - start) * d);
        out.extend_from_slice(&sink.to_f32()[start.min(s) * d..]);
        let first_code = start.max(s) - s;
        let base = out.len();
        out.resize(base + q.saturating_sub(first_code) * d, 0.0);
        for (i, row) in (first_code..q).zip(out[base..].chunks_exact_mut(d)) {
            store.reconstruct(i, row)?;
        }
        let first_window = start.max(s + q) - (s + q);
        out.extend_from_slice(&window.to_f32()[first_window * d..]);
        Ok(out)
    }

    /// All keys decoded to f32 (`len · d`, row-major; sink and window tokens exact).
    ///
    /// # Errors
    /// Only on internal inconsistency (not expected).
    pub fn keys(&self) -> Result<Vec<f32>> {
        self.keys_from(0)
    }

    /// All values decoded to f32 (`len · d`, row-major; sink and window tokens exact).
    ///
    /// # Errors
    /// Only on internal inconsistency (not expected).
    pub fn values(&self) -> Result<Vec<f32>> {
        self.values_from(0)
    }

    /// Keys of tokens `start..len` decoded to f32 (`(len - start) · d`; empty when
    /// `start >= len`). Decoding a suffix costs O((len - start) · d log d), so a decode loop
    /// that mirrors the cache in f32 re-reads only the rows that changed: the new tokens and
    /// those that left the window.
    ///
    /// # Errors
    /// Only on internal inconsistency (not expected).
    pub fn keys_from(&self, start: usize) -> Result<Vec<f32>> {
        self.reconstruct_from(&self.keys, &self.sink_keys, &self.window_keys, start)
    }

    /// Values of tokens `start..len` decoded to f32; as [`HeadCache::keys_from`].
    ///
    /// # Errors
    /// Only on internal inconsistency (not expected).
    pub fn values_from(&self, start: usize) -> Result<Vec<f32>> {
        self.reconstruct_from(&self.values, &self.sink_values, &self.window_values, start)
    }

    /// Saved parts: key and value part batches (tq-batch bytes), the window rows and the sink rows.
    pub(crate) fn parts(&self) -> Result<SavedParts<'_>> {
        Ok(SavedParts {
            keys: self.keys.to_blobs()?,
            values: self.values.to_blobs()?,
            window_keys: &self.window_keys,
            window_values: &self.window_values,
            sink_keys: &self.sink_keys,
            sink_values: &self.sink_values,
        })
    }

    /// Fills an empty cache from saved parts (see [`crate::persist`]); `what` names the head in
    /// errors.
    pub(crate) fn restore(
        &mut self,
        keys: &[&[u8]],
        values: &[&[u8]],
        window: (PlainRows, PlainRows),
        sink: (PlainRows, PlainRows),
        what: &str,
    ) -> Result<()> {
        let ((window_keys, window_values), (sink_keys, sink_values)) = (window, sink);
        let d = self.config.head_dim;
        self.keys.restore(keys, &format!("{what}.keys"))?;
        self.values.restore(values, &format!("{what}.values"))?;
        if self.keys.len() != self.values.len() {
            return Err(Error::InvalidCache {
                tensor: what.to_string(),
                reason: "keys and values hold different numbers of tokens".into(),
            });
        }
        if window_keys.len() != window_values.len()
            || !window_keys.len().is_multiple_of(d)
            || window_keys.len() / d > self.config.window
        {
            return Err(Error::InvalidCache {
                tensor: format!("{what}.window_keys"),
                reason: format!(
                    "window of {} values does not fit W = {}",
                    window_keys.len(),
                    self.config.window
                ),
            });
        }
        let sink_rows = sink_keys.len() / d;
        if sink_keys.len() != sink_values.len()
            || !sink_keys.len().is_multiple_of(d)
            || sink_rows > self.config.sink
            || (sink_rows < self.config.sink && (self.keys.len() > 0 || !window_keys.is_empty()))
        {
            return Err(Error::InvalidCache {
                tensor: format!("{what}.sink_keys"),
                reason: format!(
                    "sink of {} values does not fit S = {} before {} later tokens",
                    sink_keys.len(),
                    self.config.sink,
                    self.keys.len() + window_keys.len() / d
                ),
            });
        }
        self.window_keys = window_keys;
        self.window_values = window_values;
        self.sink_keys = sink_keys;
        self.sink_values = sink_values;
        Ok(())
    }

    fn check_query(&self, q: &[f32]) -> Result<()> {
        check_len("query", q.len(), self.config.head_dim)?;
        check_finite("query", q)
    }

    /// Raw attention scores `⟨q, k̃_t⟩ / sqrt(d)` for every token into `out` (`len` values).
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong `q` or `out` length, [`Error::NonFinite`].
    pub fn scores(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        self.check_query(q)?;
        check_len("scores", out.len(), self.len())?;
        self.scores_unchecked(q, out)
    }

    /// Raw dots of `q` with the unquantized keys `sink` and `window` (f32 rows): the sink's into
    /// `p[..sink_len]`, the window's into `p[sink_len + quantized_len..]` (`p` has one entry per
    /// token; the rest is left as it is).
    fn exact_dots(&self, sink: &[f32], window: &[f32], q: &[f32], p: &mut [f32]) {
        let d = self.config.head_dim;
        let s = self.sink_len();
        let (head, tail) = p.split_at_mut(s + self.quantized_len());
        let exact = sink
            .chunks_exact(d)
            .zip(&mut head[..s])
            .chain(window.chunks_exact(d).zip(tail));
        for (k, o) in exact {
            *o = tq_core::simd::dot(q, k);
        }
    }

    fn scores_unchecked(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        let d = self.config.head_dim;
        let (s, qn) = (self.sink_len(), self.quantized_len());
        let scale = 1.0 / (d as f32).sqrt();
        if qn > 0 {
            let prepared = self.keys.prepare(q)?;
            self.keys.scores(
                &prepared,
                &mut out[s..s + qn],
                self.config.score_mode == ScoreMode::Fast,
            )?;
        }
        let (sink, window) = (self.sink_keys.to_f32(), self.window_keys.to_f32());
        self.exact_dots(&sink, &window, q, out);
        for o in out.iter_mut() {
            *o *= scale;
        }
        Ok(())
    }

    /// Attention output `softmax(q K̃ᵀ / sqrt(d)) Ṽ` over all tokens into `out` (`d` values).
    /// An empty cache gives zeros. O(len · d).
    ///
    /// # Errors
    /// [`Error::Shape`], [`Error::NonFinite`].
    pub fn attend(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        self.check_query(q)?;
        check_len("output", out.len(), self.config.head_dim)?;
        self.attend_many(q, &[self.len()], out)
    }

    /// Attention for a block of `m` queries (row-major `m · d`), query `i` attending to the first
    /// `limits[i]` tokens (causal masking by position; `1 <= limits[i] <= len`), into `out`
    /// (`m · d`).
    ///
    /// # Errors
    /// [`Error::Shape`], [`Error::NonFinite`], [`Error::PositionOutOfRange`].
    pub fn attend_block(&self, queries: &[f32], limits: &[usize], out: &mut [f32]) -> Result<()> {
        let d = self.config.head_dim;
        check_len("queries", queries.len(), limits.len() * d)?;
        check_len("output", out.len(), queries.len())?;
        check_finite("queries", queries)?;
        if let Some(&limit) = limits.iter().find(|&&l| l == 0 || l > self.len()) {
            return Err(Error::PositionOutOfRange {
                limit,
                len: self.len(),
            });
        }
        self.attend_many(queries, limits, out)
    }

    /// Attention of `m` queries, query `i` over the first `limits[i]` tokens (trusted arguments;
    /// a limit of 0 gives zeros). The quantized keys are scored for all queries in one call (shared
    /// passes over the codes where the kind allows), the softmax per query; the value codes are
    /// decoded once for all queries.
    pub(crate) fn attend_many(
        &self,
        queries: &[f32],
        limits: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        self.attend_fresh(queries, limits, out, None)
    }

    /// The sink and window rows as f32, with `fresh` (the exact keys or values of the newest
    /// tokens, all of them in the sink or the window) written over their stored rounding: f16
    /// rows hold the newest tokens rounded, but the step that computes them attends to them exact.
    fn plain_f32<'a>(
        &self,
        sink: &'a PlainRows,
        window: &'a PlainRows,
        fresh: Option<&[f32]>,
    ) -> (Cow<'a, [f32]>, Cow<'a, [f32]>) {
        let (mut s, mut w) = (sink.to_f32(), window.to_f32());
        if let Some(f) = fresh.filter(|_| self.config.window_precision != WindowPrecision::F32) {
            let in_window = f.len().min(w.len());
            let at = w.len() - in_window;
            w.to_mut()[at..].copy_from_slice(&f[f.len() - in_window..]);
            let rest = f.len() - in_window;
            let at = s.len() - rest;
            s.to_mut()[at..].copy_from_slice(&f[..rest]);
        }
        (s, w)
    }

    /// [`HeadCache::attend_many`], the newest tokens' exact `(keys, values)` attended in place of
    /// their stored rows when given (see [`HeadCache::plain_f32`]).
    fn attend_fresh(
        &self,
        queries: &[f32],
        limits: &[usize],
        out: &mut [f32],
        fresh: Option<(&[f32], &[f32])>,
    ) -> Result<()> {
        let d = self.config.head_dim;
        let (s, qn) = (self.sink_len(), self.quantized_len());
        let codes = s..s + qn;
        out.fill(0.0);
        let n = self.len();
        if n == 0 {
            return Ok(());
        }
        // The queries' weights, `n` per query, in this thread's scratch (taken out for the call):
        // every entry a query reads is written below, so the scratch is not cleared per call
        // (clearing fresh buffers took 3% of a grouped-query step).
        let mut scratch = PROBS.take();
        if scratch.len() < n * limits.len() {
            scratch.resize(n * limits.len(), 0.0);
        }
        let mut probs: Vec<&mut [f32]> = scratch.chunks_exact_mut(n).take(limits.len()).collect();
        // Raw scores of every query with a token to attend to: the quantized keys of all such
        // queries in one call (queries sharing passes over the codes where the kind allows), the
        // sink and the window exactly.
        let live: Vec<usize> = (0..limits.len()).filter(|&i| limits[i] > 0).collect();
        if qn > 0 && !live.is_empty() {
            let prepared = live
                .iter()
                .map(|&i| self.keys.prepare(&queries[i * d..(i + 1) * d]))
                .collect::<Result<Vec<_>>>()?;
            let mut outs: Vec<&mut [f32]> = probs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| limits[*i] > 0)
                .map(|(_, p)| &mut p[codes.clone()])
                .collect();
            // The value rows are asked for as the keys are scanned, so they come in from memory
            // with the keys instead of after the softmax.
            self.keys.scores_many(
                &prepared,
                &mut outs,
                self.config.score_mode == ScoreMode::Fast,
                self.values.ahead(),
            )?;
        }
        let scale = 1.0 / (d as f32).sqrt();
        let (sink_k, window_k) =
            self.plain_f32(&self.sink_keys, &self.window_keys, fresh.map(|f| f.0));
        // Each query's softmax numerators (zero past its limit) and their sum: the weighted sums
        // are divided by it once at the end instead of every weight.
        let mut sums = vec![0.0f32; limits.len()];
        for (i, (p, &limit)) in probs.iter_mut().zip(limits).enumerate() {
            if limit == 0 {
                p.fill(0.0);
                continue;
            }
            self.exact_dots(&sink_k, &window_k, &queries[i * d..(i + 1) * d], p);
            sums[i] = tq_core::simd::softmax_numerators(&mut p[..limit], scale);
            p[limit..].fill(0.0);
        }
        if qn > 0 {
            let weights: Vec<&[f32]> = probs.iter().map(|p| &p[codes.clone()]).collect();
            let mut outs: Vec<&mut [f32]> = out.chunks_exact_mut(d).collect();
            let fast = self.config.score_mode == ScoreMode::Fast;
            self.values.weighted_sums_into(&weights, &mut outs, fast)?;
        }
        let (sink, window) =
            self.plain_f32(&self.sink_values, &self.window_values, fresh.map(|f| f.1));
        for (((p, &limit), o), &sum) in probs
            .iter()
            .zip(limits)
            .zip(out.chunks_exact_mut(d))
            .zip(&sums)
        {
            // Weights past a query's limit are zero, so whole rows can be summed.
            let exact = sink.chunks_exact(d).zip(&p[..s]).chain(
                window
                    .chunks_exact(d)
                    .zip(&p[codes.end..limit.max(codes.end)]),
            );
            for (v, &w) in exact {
                for (a, &x) in o.iter_mut().zip(v) {
                    *a += w * x;
                }
            }
            if limit > 0 {
                let inv = 1.0 / sum;
                for a in o.iter_mut() {
                    *a *= inv;
                }
            }
        }
        drop(probs);
        // A block of many queries (a prefill) may need far more: that is freed, not kept.
        if scratch.len() <= PROBS_KEPT {
            PROBS.set(scratch);
        }
        Ok(())
    }
}
