//! Group-centred TurboQuant_mse (`gmse`): the per-channel offsets of each group of `G`
//! consecutive rows are removed, then the centred rows are quantized by [`crate::MseQuantizer`].
//!
//! **Why.** LLM keys carry channels with large offsets that drift slowly along the sequence (RoPE
//! makes them position-dependent, so one calibrated mean does not fit the next text). A random
//! rotation spreads such an offset over every coordinate and wastes the codebook on it; a
//! per-channel zero point over a token group (KIVI's idea) removes it. This quantizer keeps both:
//! the group's channel means come out first (one f16 per channel and group: `16/G` bits per
//! coordinate), and what is left is what TurboQuant codes near-optimally (rotation, Lloyd-Max
//! codes, the configured per-vector scale).
//!
//! **Streaming.** As with KIVI's keys, rows arrive one by one: the newest incomplete group of
//! fewer than `G` rows stays in f16 (the residual, [`crate::residual`]) and is centred and quantized as one block when
//! it fills. Truncating into a quantized group moves its kept rows back into the residual as their
//! decoded values.
//!
//! **Scoring on the codes.** `⟨q, x̃_t⟩ = ⟨q, μ_g⟩ + s_t ⟨Π q, c[codes_t]⟩`: the MSE batch's
//! look-up-table scan, plus one offset per group; the residual rows are scored exactly.
//!
//! **Storage.** MSE codes and per-vector scales of the centred rows, `d` f16 means per complete
//! group, the residual in f16: `b + 32/d + 16/G` bits per coordinate once the residual is
//! amortised.

use std::sync::Arc;

use half::f16;
use serde::{Deserialize, Serialize};
use tq_core::RotationKind;

use crate::config::MseConfig;
use crate::encoded::check_weighted;
use crate::error::{check_batch, check_dim, check_len, check_range};
use crate::kivi::MAX_ABS;
use crate::mse::{MseBatch, MseQuantizer, MseQuery};
use crate::residual::Residual;
use crate::score::{self, Hit};
use crate::{Error, Result, ScaleMode};

/// Configuration of a [`GroupMseQuantizer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMseConfig {
    /// Vector dimension `d >= 2`.
    pub dim: usize,
    /// Bits per coordinate of the MSE codes, `1..=8`.
    pub bits: u32,
    /// The random rotation.
    pub rotation: RotationKind,
    /// Seed of the rotation.
    pub seed: u64,
    /// The per-vector scalar of the centred rows.
    #[serde(default)]
    pub scale: ScaleMode,
    /// Rows per group `G`: a power of two in `16..=128`.
    pub group: usize,
}

impl GroupMseConfig {
    /// The MSE configuration of the centred rows.
    pub fn mse(&self) -> MseConfig {
        MseConfig::new(self.dim, self.bits, self.rotation, self.seed).with_scale(self.scale)
    }

    /// Validates the configuration.
    ///
    /// # Errors
    /// As [`MseConfig::validate`]; [`Error::ConfigMismatch`] for a group that is not a power of
    /// two in `16..=128`.
    pub fn validate(&self) -> Result<()> {
        self.mse().validate()?;
        crate::kivi::check_group(self.group)
    }
}

/// A group-centred TurboQuant_mse quantizer: the MSE quantizer of the centred rows and the group
/// size.
#[derive(Debug, Clone)]
pub struct GroupMseQuantizer {
    config: GroupMseConfig,
    mse: Arc<MseQuantizer>,
}

impl GroupMseQuantizer {
    /// Builds the quantizer (the rotation from the seed, the codebook for `(d, b)`).
    ///
    /// # Errors
    /// See [`GroupMseConfig::validate`].
    pub fn new(config: GroupMseConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            mse: Arc::new(MseQuantizer::new(config.mse())?),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GroupMseConfig {
        &self.config
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        self.config.dim
    }

    /// The MSE quantizer of the centred rows.
    pub fn mse(&self) -> &Arc<MseQuantizer> {
        &self.mse
    }

    /// Stored bytes per quantized row: MSE codes and scale, and its share of the group means
    /// (`2d/G`, rounded up).
    pub fn bytes_per_vector(&self) -> usize {
        self.mse.bytes_per_vector() + (2 * self.config.dim).div_ceil(self.config.group)
    }

    /// Prepares a query: the MSE query (rotation and tables) and the query itself for the group
    /// offsets and the residual.
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`].
    pub fn prepare_query(&self, q: &[f32]) -> Result<GroupMseQuery> {
        Ok(GroupMseQuery {
            mse: self.mse.prepare_query(q)?,
            q: q.to_vec(),
        })
    }
}

/// A query prepared for a [`GroupMseQuantizer`].
#[derive(Debug, Clone)]
pub struct GroupMseQuery {
    mse: MseQuery,
    q: Vec<f32>,
}

/// A growable batch of group-centred TurboQuant_mse codes (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct GroupMseBatch {
    quantizer: Arc<GroupMseQuantizer>,
    /// The centred rows of every complete group.
    inner: MseBatch,
    /// f16 channel means, `groups × d`.
    means: Vec<u16>,
    /// The newest incomplete group's rows, in f16.
    residual: Residual,
}

impl GroupMseBatch {
    /// An empty batch.
    pub fn new(quantizer: Arc<GroupMseQuantizer>) -> Self {
        Self {
            inner: MseBatch::new(quantizer.mse.clone()),
            means: Vec::new(),
            residual: Residual::new(quantizer.dim(), quantizer.config.group),
            quantizer,
        }
    }

    /// Assembles a batch from parts (deserialization), checking lengths against the
    /// configuration and the means and residual for finite values.
    ///
    /// # Errors
    /// [`Error::ConfigMismatch`] naming the part that disagrees (including a residual of `G` rows
    /// or more, or a residual value that is not a finite f16).
    pub fn from_parts(
        quantizer: Arc<GroupMseQuantizer>,
        inner: MseBatch,
        means: Vec<u16>,
        residual: Vec<u16>,
    ) -> Result<Self> {
        let (d, g, n) = (quantizer.dim(), quantizer.config.group, inner.len());
        let bad = |what: String| Err(Error::ConfigMismatch(what));
        if inner.quantizer().config() != &quantizer.config.mse() {
            return bad("the centred rows' quantizer differs from the configuration".into());
        }
        if !n.is_multiple_of(g) {
            return bad(format!("{n} quantized rows are not whole groups of {g}"));
        }
        if means.len() != n / g * d {
            return bad(format!("{} means, expected {}", means.len(), n / g * d));
        }
        if let Some(i) = means
            .iter()
            .position(|&m| !f16::from_bits(m).to_f32().is_finite())
        {
            return bad(format!("mean {i} is not a finite f16"));
        }
        let residual = Residual::from_bits(d, g, residual)?;
        Ok(Self {
            quantizer,
            inner,
            means,
            residual,
        })
    }

    /// The quantizer.
    pub fn quantizer(&self) -> &Arc<GroupMseQuantizer> {
        &self.quantizer
    }

    fn d(&self) -> usize {
        self.quantizer.dim()
    }

    fn g(&self) -> usize {
        self.quantizer.config.group
    }

    /// The MSE batch of the centred rows of every complete group.
    pub fn centred(&self) -> &MseBatch {
        &self.inner
    }

    /// f16 channel means (bit patterns), `groups × d`.
    pub fn means(&self) -> &[u16] {
        &self.means
    }

    /// The residual rows, f16 bit patterns, row-major.
    pub fn residual(&self) -> &[u16] {
        self.residual.bits()
    }

    /// Rows held as codes.
    pub fn quantized_len(&self) -> usize {
        self.inner.len()
    }

    /// Rows held in the f16 residual.
    pub fn residual_len(&self) -> usize {
        self.residual.rows()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.quantized_len() + self.residual_len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stored bytes per quantized row ([`GroupMseQuantizer::bytes_per_vector`]).
    pub fn bytes_per_vector(&self) -> usize {
        self.quantizer.bytes_per_vector()
    }

    /// Exact bytes stored: MSE codes and scales, f16 means, the f16 residual.
    pub fn stored_bytes(&self) -> usize {
        self.quantized_len() * self.quantizer.mse.bytes_per_vector()
            + 2 * self.means.len()
            + self.residual.bytes()
    }

    /// Bytes held in memory (codes with block padding, means, residual).
    pub fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes() + 2 * self.means.len() + self.residual.bytes()
    }

    /// The f32 mean of channel `c` of group `g`.
    #[inline]
    fn mean(&self, g: usize, c: usize) -> f32 {
        f16::from_bits(self.means[g * self.d() + c]).to_f32()
    }

    /// Appends row-major rows to the residual and quantizes every group that fills. O(n · d).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`], [`Error::ValueOutOfRange`] for a value beyond
    /// f16's range (the means are f16); nothing is appended then.
    pub fn extend(&mut self, xs: &[f32]) -> Result<()> {
        let (d, g) = (self.d(), self.g());
        check_batch(xs, d)?;
        check_range(xs, MAX_ABS)?;
        let mut done = self.residual.push(xs);
        if done.is_empty() {
            return Ok(());
        }
        for group in done.chunks_exact_mut(g * d) {
            for c in 0..d {
                let sum: f64 = group.iter().skip(c).step_by(d).map(|&v| v as f64).sum();
                let m = f16::from_f64((sum / g as f64).clamp(-MAX_ABS as f64, MAX_ABS as f64));
                self.means.push(m.to_bits());
                let m = m.to_f32();
                group.iter_mut().skip(c).step_by(d).for_each(|v| *v -= m);
            }
        }
        self.inner.extend(&done)
    }

    /// Keeps the first `n` rows; cutting into a quantized group moves its kept rows back into the
    /// residual as their decoded values.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len() {
            return;
        }
        let (d, g) = (self.d(), self.g());
        let q = self.quantized_len();
        if n >= q {
            self.residual.truncate(n - q);
            return;
        }
        let first = n / g * g;
        let mut kept = vec![0.0f32; (n - first) * d];
        for (i, row) in (first..n).zip(kept.chunks_exact_mut(d)) {
            self.decode_row(i, row);
        }
        self.inner.truncate(first);
        self.means.truncate(first / g * d);
        self.residual.replace(&kept);
    }

    /// Decodes row `i < len` (unchecked).
    fn decode_row(&self, i: usize, out: &mut [f32]) {
        let q = self.quantized_len();
        if i >= q {
            self.residual.row_into(i - q, out);
            return;
        }
        // In range and of length d: the inner batch cannot fail.
        let _ = self.inner.dequantize_row(i, out);
        let g = i / self.g();
        for (c, o) in out.iter_mut().enumerate() {
            *o += self.mean(g, c);
        }
    }

    /// Decodes row `i` into `out` (`d` values).
    ///
    /// # Errors
    /// [`Error::RowOutOfRange`], [`Error::DimMismatch`].
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        if i >= self.len() {
            return Err(Error::RowOutOfRange {
                index: i,
                len: self.len(),
            });
        }
        check_dim(out, self.d())?;
        self.decode_row(i, out);
        Ok(())
    }

    /// Decodes every row (row-major `len · d`).
    pub fn dequantize_all(&self) -> Vec<f32> {
        let d = self.d();
        let mut out = self.inner.dequantize_all();
        for (i, row) in out.chunks_exact_mut(d).enumerate() {
            let g = i / self.g();
            for (c, o) in row.iter_mut().enumerate() {
                *o += self.mean(g, c);
            }
        }
        out.extend(self.residual.to_f32());
        out
    }

    fn score_rows(&self, query: &GroupMseQuery, out: &mut [f32], fast: bool) -> Result<()> {
        check_dim(&query.q, self.d())?;
        check_len("score output", self.len(), out.len())?;
        let (d, g) = (self.d(), self.g());
        let q = self.quantized_len();
        let (coded, rest) = out.split_at_mut(q);
        if fast {
            self.inner.score_into(&query.mse, coded)?;
        } else {
            self.inner.score_exact_into(&query.mse, coded)?;
        }
        for (gi, chunk) in coded.chunks_mut(g).enumerate() {
            let m = &self.means[gi * d..(gi + 1) * d];
            let offset: f32 = query
                .q
                .iter()
                .zip(m)
                .map(|(a, &b)| a * f16::from_bits(b).to_f32())
                .sum();
            chunk.iter_mut().for_each(|s| *s += offset);
        }
        self.residual.score_into(&query.q, rest);
        Ok(())
    }

    /// Scores through the MSE batch's fast tables plus the group offsets.
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `out.len() != len`; [`Error::DimMismatch`] for a query of
    /// another dimension.
    pub fn score_into(&self, query: &GroupMseQuery, out: &mut [f32]) -> Result<()> {
        self.score_rows(query, out, true)
    }

    /// As [`GroupMseBatch::score_into`] with the exact `f32` tables.
    ///
    /// # Errors
    /// As [`GroupMseBatch::score_into`].
    pub fn score_exact_into(&self, query: &GroupMseQuery, out: &mut [f32]) -> Result<()> {
        self.score_rows(query, out, false)
    }

    /// The `k` rows with the largest exact estimates, best first.
    ///
    /// # Errors
    /// As [`GroupMseBatch::score_into`].
    pub fn top_k(&self, query: &GroupMseQuery, k: usize) -> Result<Vec<Hit>> {
        let mut s = vec![0.0; self.len()];
        self.score_exact_into(query, &mut s)?;
        Ok(score::top_k_of(&s, k))
    }

    /// `outs[j] = Σ_i weights[j][i] · x̃_i`: the centred rows in the rotated domain (the MSE
    /// batch's route), each group's means weighted by its rows' total weight, the residual rows
    /// directly.
    ///
    /// # Errors
    /// `Core(LengthMismatch)` / [`Error::DimMismatch`] for shapes that do not fit.
    pub fn weighted_sums_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        self.weighted_sums_with(weights, outs, false)
    }

    /// [`GroupMseBatch::weighted_sums_into`] with the centred rows on the MSE batch's fast path
    /// (integer sums, [`MseBatch::accumulate_rotated_fast_multi`]).
    ///
    /// # Errors
    /// As [`GroupMseBatch::weighted_sums_into`].
    pub fn weighted_sums_fast_into(
        &self,
        weights: &[&[f32]],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        self.weighted_sums_with(weights, outs, true)
    }

    fn weighted_sums_with(
        &self,
        weights: &[&[f32]],
        outs: &mut [&mut [f32]],
        fast: bool,
    ) -> Result<()> {
        check_weighted(self.len(), self.d(), weights, outs)?;
        let (g, q) = (self.g(), self.quantized_len());
        let heads: Vec<&[f32]> = weights.iter().map(|w| &w[..q]).collect();
        self.inner.weighted_sums_with(&heads, outs, fast)?;
        for (w, out) in weights.iter().zip(outs.iter_mut()) {
            for (gi, chunk) in w[..q].chunks(g).enumerate() {
                let total: f32 = chunk.iter().sum();
                if total != 0.0 {
                    for (c, o) in out.iter_mut().enumerate() {
                        *o += total * self.mean(gi, c);
                    }
                }
            }
            self.residual.add_weighted(&w[q..], out);
        }
        Ok(())
    }
}
