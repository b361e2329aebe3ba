//! KIVI (Liu et al., arXiv 2402.02750): asymmetric uniform quantization in groups, the baseline
//! KV-cache quantizer that per-channel key outliers favour.
//!
//! **Levels.** A group of values `x` with minimum `lo` and maximum `hi` stores an f16 zero
//! `z = f16(lo)` and an f16 scale `s = f16((hi - z) / (2^b - 1))`; a value's code is
//! `clamp(round((x - z) / s), 0, 2^b - 1)` (code 0 when `s = 0`) and it decodes to `z + s · code`.
//! Scale and zero are rounded to f16 before the codes are chosen, so decoding sees exactly the
//! numbers encoding used.
//!
//! **Axes.** [`KiviAxis::Channel`] (keys): each channel of `G` consecutive rows is one group, so a
//! channel's large local offset lands in its zero point. Rows arrive one by one: the newest
//! incomplete group of fewer than `G` rows stays at full model precision, f16 (the paper's residual,
//! [`crate::residual`]), and is quantized as one `G × d` block when it fills. [`KiviAxis::Token`] (values): each row on its own, in groups of
//! `G` consecutive channels (the last one shorter when `G` does not divide `d`).
//!
//! **Storage.** Codes are `b`-bit, packed LSB-first in the 32-row block layout of every batch.
//! Channel axis: per complete group, `d` scales and `d` zeros (f16), plus the residual rows in
//! f16: `b + 32/G` bits per coordinate once the residual's share is amortised. Token axis:
//! `ceil(d/G)` scales and zeros per row: `b + 32·ceil(d/G)/d` bits per coordinate.
//!
//! **Scoring on the codes.** With the channel axis, `⟨q, k̃_t⟩ = Σ_c q_c z_{g,c} + Σ_c (q_c s_{g,c})
//! · code_{t,c}` for the rows `t` of group `g`: the first sum is one offset per group, the second is
//! linear in the codes. At 4 bits the fast path rounds the group's weights `q_c s_c` to `i8`
//! (step `max_c |q_c s_c| / 127`, so a score moves by at most `step / 2 · Σ_c code_c`) and takes
//! integer dot products with the nibbles ([`tq_core::scan::dot_nibbles_i8`]): no per-query tables,
//! and a kv head's queries share each pass over a group ([`KiviBatch::score_many_into`]). Other
//! widths use the look-up-table scan of the other batches with per-group tables over the uniform
//! levels `0..2^b` (fast `u8` tables and exact `f32` tables for widths 1-5; widths 6-8 decode
//! rows), as does the exact path at every width. The residual rows are scored exactly (f16
//! values, f32 arithmetic). The token axis scores each row exactly.

use std::sync::Arc;

use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tq_core::prefetch::Ahead;
use tq_core::scan::{self, BLOCK};
use tq_core::{bitpack, half_simd, simd};

use crate::error::{check_batch, check_dim, check_finite, check_len, check_range};
use crate::packed::PackedRows;
use crate::residual::Residual;
use crate::score::{self, Hit, Tables};
use crate::{Error, Result};

/// Which values share a scale and a zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KiviAxis {
    /// Per channel over `G` consecutive rows (KIVI's keys), with an f16 residual of the newest
    /// incomplete group.
    Channel,
    /// Per row over `G` consecutive channels (KIVI's values).
    Token,
}

/// Configuration of a [`KiviQuantizer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KiviConfig {
    /// Vector dimension `d >= 2`.
    pub dim: usize,
    /// Bits per code, `1..=8`.
    pub bits: u32,
    /// Group size `G`: a power of two in `16..=128` (rows per group for the channel axis,
    /// channels per group for the token axis).
    pub group: usize,
    /// The grouping axis.
    pub axis: KiviAxis,
}

/// Largest magnitude an f16 scale or zero holds: inputs beyond it cannot be stored.
pub const MAX_ABS: f32 = 65504.0;

impl KiviConfig {
    /// Validates the configuration.
    ///
    /// # Errors
    /// [`Error::Core`] for `dim < 2`, [`Error::DimTooLarge`], [`Error::BitsOutOfRange`],
    /// [`Error::ConfigMismatch`] for a group that is not a power of two in `16..=128`.
    pub fn validate(&self) -> Result<()> {
        crate::config::check_dim(self.dim, false)?;
        if !(1..=8).contains(&self.bits) {
            return Err(Error::BitsOutOfRange {
                quantizer: "KIVI",
                bits: self.bits,
                min: 1,
                max: 8,
            });
        }
        check_group(self.group)
    }

    /// Scale-and-zero groups per row of the token axis: `ceil(d / G)`.
    pub fn token_groups(&self) -> usize {
        self.dim.div_ceil(self.group)
    }

    /// Stored bits per coordinate, codes and f16 scales and zeros (the channel axis without its
    /// residual, which is f16 until its group fills).
    pub fn bits_per_coordinate(&self) -> f64 {
        let scalars = match self.axis {
            KiviAxis::Channel => 32.0 / self.group as f64,
            KiviAxis::Token => 32.0 * self.token_groups() as f64 / self.dim as f64,
        };
        self.bits as f64 + scalars
    }
}

/// The largest f16 not above `x` (`x` within `±MAX_ABS`).
pub(crate) fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x.clamp(-MAX_ABS, MAX_ABS));
    if h.to_f32() <= x {
        return h;
    }
    let b = h.to_bits();
    f16::from_bits(match b {
        0x0000 => 0x8001,
        b if b & 0x8000 != 0 => b + 1,
        b => b - 1,
    })
}

/// The smallest f16 not below `x` (`0 <= x`; at most `MAX_ABS`).
fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x.min(MAX_ABS));
    if h.to_f32() >= x || h.to_f32() >= MAX_ABS {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// The f16 zero and scale of a group with minimum `lo` and maximum `hi` at `bits` bits: the zero
/// rounded down and the scale up, so the stored levels still cover `[lo, hi]` (the scale is capped
/// at f16's largest value).
fn group_params(lo: f32, hi: f32, bits: u32) -> (f16, f16) {
    let levels = ((1u32 << bits) - 1) as f32;
    let z = f16_down(lo);
    let s = f16_up(((hi - z.to_f32()) / levels).max(0.0));
    (z, s)
}

/// Checks a group size: a power of two in `16..=128`.
pub(crate) fn check_group(group: usize) -> Result<()> {
    if !group.is_power_of_two() || !(16..=128).contains(&group) {
        return Err(Error::ConfigMismatch(format!(
            "group {group} is not a power of two in 16..=128"
        )));
    }
    Ok(())
}

#[inline]
fn code_of(x: f32, z: f32, s: f32, max: f32) -> u8 {
    if s > 0.0 {
        ((x - z) / s).round().clamp(0.0, max) as u8
    } else {
        0
    }
}

/// A KIVI quantizer: a configuration (no random state).
#[derive(Debug, Clone)]
pub struct KiviQuantizer {
    config: KiviConfig,
    row_bytes: usize,
    levels: Vec<f32>,
}

impl KiviQuantizer {
    /// Builds the quantizer.
    ///
    /// # Errors
    /// See [`KiviConfig::validate`].
    pub fn new(config: KiviConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            row_bytes: bitpack::packed_len(config.dim, config.bits),
            levels: (0..1u32 << config.bits).map(|v| v as f32).collect(),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KiviConfig {
        &self.config
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        self.config.dim
    }

    /// Packed code bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Stored bytes per quantized row, codes and its share of scales and zeros (the channel
    /// axis's share `4d/G` rounded up to whole bytes).
    pub fn bytes_per_vector(&self) -> usize {
        let scalars = match self.config.axis {
            KiviAxis::Channel => (4 * self.config.dim).div_ceil(self.config.group),
            KiviAxis::Token => 4 * self.config.token_groups(),
        };
        self.row_bytes + scalars
    }

    /// Prepares a query (`d` finite floats). O(d): tables are built per group when scoring.
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`].
    pub fn prepare_query(&self, q: &[f32]) -> Result<KiviQuery> {
        check_dim(q, self.dim())?;
        check_finite(q)?;
        Ok(KiviQuery { q: q.to_vec() })
    }
}

/// A query prepared for a [`KiviQuantizer`] (the query itself: KIVI does not rotate).
#[derive(Debug, Clone)]
pub struct KiviQuery {
    q: Vec<f32>,
}

impl KiviQuery {
    /// The query.
    pub fn query(&self) -> &[f32] {
        &self.q
    }
}

/// Groups of channel-axis scoring per batch ([`KiviBatch::score_groups`]; threads split the
/// batches): on the fast 4-bit path ([`KiviBatch::score_groups_i8`]) their weights are computed
/// in one loop before their codes are read. Eight groups of 64 tokens are 512 rows.
const GROUP_BATCH: usize = 8;

/// How far ahead of the block it scores the fast 4-bit channel-group scan asks for codes, in
/// bytes of codes ([`KiviBatch::score_groups_i8`]; at d = 64, 256 rows). Read from memory (the
/// caches of 80 SmolLM2-shaped heads cycled), with the next batch's scales and zeros asked for
/// at each batch's start, one / three queries took 43-52 / 74-84 us without the hints and
/// 42-47 / 67-71 with them; 16 KiB and more ahead measured no better.
const CODES_AHEAD_BYTES: usize = 8192;

/// Buffers of channel-axis group scoring, reused across the groups of a scoring call.
#[derive(Default)]
struct GroupScratch {
    /// The group's scales in f32 (on the fast 4-bit path, those of every group of a batch).
    scales: Vec<f32>,
    /// One query's weights `q_c s_c` in f32 (the table path).
    products: Vec<f32>,
    /// Each query's and group's `i8` weight step (the fast 4-bit path).
    steps: Vec<f32>,
    /// Each query's and group's `i8` weights (`2 · row_bytes` per query and group) on the fast
    /// 4-bit path.
    weights: Vec<i8>,
    /// Each query's and group's `(offset, step)`: score = offset + step · integer dot.
    affine: Vec<(f32, f32)>,
    /// Each query's integer dots of one block.
    sums: Vec<[i32; BLOCK]>,
}

/// A growable batch of KIVI codes (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct KiviBatch {
    quantizer: Arc<KiviQuantizer>,
    /// Codes of the quantized rows (channel axis: whole groups only).
    codes: PackedRows,
    /// f16 scales: `groups × d` (channel axis) or `rows × ceil(d/G)` (token axis).
    scales: Vec<u16>,
    /// f16 zeros, as `scales`.
    zeros: Vec<u16>,
    /// Channel axis: the rows of the newest incomplete group, in f16 (`< G` rows; always empty on
    /// the token axis).
    residual: Residual,
}

impl KiviBatch {
    /// An empty batch.
    pub fn new(quantizer: Arc<KiviQuantizer>) -> Self {
        Self {
            codes: PackedRows::new(quantizer.row_bytes()),
            scales: Vec::new(),
            zeros: Vec::new(),
            residual: Residual::new(quantizer.dim(), quantizer.config.group),
            quantizer,
        }
    }

    /// Assembles a batch from parts (deserialization), checking every length against the
    /// configuration and every scale and zero for a finite value (scales non-negative).
    ///
    /// # Errors
    /// [`Error::ConfigMismatch`] naming the part that disagrees (including a residual of `G` rows
    /// or more, or one on the token axis, or a residual value that is not a finite f16).
    pub fn from_parts(
        quantizer: Arc<KiviQuantizer>,
        codes: PackedRows,
        scales: Vec<u16>,
        zeros: Vec<u16>,
        residual: Vec<u16>,
    ) -> Result<Self> {
        let c = quantizer.config;
        let (d, n) = (c.dim, codes.len());
        let bad = |what: String| Err(Error::ConfigMismatch(what));
        if codes.row_bytes() != quantizer.row_bytes() {
            return bad(format!(
                "codes of {} bytes per row, expected {}",
                codes.row_bytes(),
                quantizer.row_bytes()
            ));
        }
        let want = match c.axis {
            KiviAxis::Channel => {
                if !n.is_multiple_of(c.group) {
                    return bad(format!(
                        "{n} quantized rows are not whole groups of {}",
                        c.group
                    ));
                }
                n / c.group * d
            }
            KiviAxis::Token => {
                if !residual.is_empty() {
                    return bad("the token axis keeps no residual".into());
                }
                n * c.token_groups()
            }
        };
        if scales.len() != want || zeros.len() != want {
            return bad(format!(
                "{} scales and {} zeros, expected {want}",
                scales.len(),
                zeros.len()
            ));
        }
        if let Some(i) = scales.iter().position(|&s| {
            let v = f16::from_bits(s).to_f32();
            !v.is_finite() || v < 0.0
        }) {
            return bad(format!("scale {i} is not a finite non-negative f16"));
        }
        if let Some(i) = zeros
            .iter()
            .position(|&z| !f16::from_bits(z).to_f32().is_finite())
        {
            return bad(format!("zero {i} is not a finite f16"));
        }
        let residual = Residual::from_bits(d, c.group, residual)?;
        Ok(Self {
            quantizer,
            codes,
            scales,
            zeros,
            residual,
        })
    }

    /// The quantizer.
    pub fn quantizer(&self) -> &Arc<KiviQuantizer> {
        &self.quantizer
    }

    fn d(&self) -> usize {
        self.quantizer.config.dim
    }

    /// Rows held as codes.
    pub fn quantized_len(&self) -> usize {
        self.codes.len()
    }

    /// Rows held in the f16 residual (channel axis; always 0 for the token axis).
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

    /// The packed codes.
    pub fn codes(&self) -> &PackedRows {
        &self.codes
    }

    /// f16 scales (bit patterns; layout in the field docs of the [module](self)).
    pub fn scales(&self) -> &[u16] {
        &self.scales
    }

    /// f16 zeros (bit patterns).
    pub fn zeros(&self) -> &[u16] {
        &self.zeros
    }

    /// The residual rows (channel axis), f16 bit patterns, row-major.
    pub fn residual(&self) -> &[u16] {
        self.residual.bits()
    }

    /// Stored bytes per quantized row ([`KiviQuantizer::bytes_per_vector`]).
    pub fn bytes_per_vector(&self) -> usize {
        self.quantizer.bytes_per_vector()
    }

    /// Exact bytes stored: codes, every f16 scale and zero, and the f16 residual.
    pub fn stored_bytes(&self) -> usize {
        self.quantized_len() * self.quantizer.row_bytes
            + 2 * (self.scales.len() + self.zeros.len())
            + self.residual.bytes()
    }

    /// Bytes held in memory (codes with block padding, scalars, residual).
    pub fn memory_bytes(&self) -> usize {
        self.codes.memory_bytes()
            + 2 * (self.scales.len() + self.zeros.len())
            + self.residual.bytes()
    }

    /// Appends row-major rows: the token axis quantizes each row; the channel axis adds them to
    /// the residual and quantizes every group of `G` rows as it fills. O(n · d).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`], [`Error::ValueOutOfRange`] for a value whose
    /// magnitude exceeds [`MAX_ABS`] (f16 cannot hold its zero); nothing is appended then.
    pub fn extend(&mut self, xs: &[f32]) -> Result<()> {
        let d = self.d();
        check_batch(xs, d)?;
        check_range(xs, MAX_ABS)?;
        match self.quantizer.config.axis {
            KiviAxis::Token => {
                let rows: Vec<&[f32]> = xs.chunks_exact(d).collect();
                self.push_token_rows(&rows);
            }
            KiviAxis::Channel => {
                let g = self.quantizer.config.group;
                let done = self.residual.push(xs);
                for group in done.chunks_exact(g * d) {
                    self.push_channel_group(group);
                }
            }
        }
        Ok(())
    }

    /// Quantizes one `G × d` group per channel and appends it.
    fn push_channel_group(&mut self, group: &[f32]) {
        let (d, bits) = (self.d(), self.quantizer.config.bits);
        let max = ((1u32 << bits) - 1) as f32;
        let mut params = Vec::with_capacity(d);
        for c in 0..d {
            let (lo, hi) = group
                .iter()
                .skip(c)
                .step_by(d)
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let (z, s) = group_params(lo, hi, bits);
            self.zeros.push(z.to_bits());
            self.scales.push(s.to_bits());
            params.push((z.to_f32(), s.to_f32()));
        }
        let mut codes = vec![0u8; d];
        let mut packed = vec![0u8; self.quantizer.row_bytes];
        for row in group.chunks_exact(d) {
            for ((k, &x), &(z, s)) in codes.iter_mut().zip(row).zip(&params) {
                *k = code_of(x, z, s, max);
            }
            packed.fill(0);
            bitpack::pack_unchecked(&codes, bits, &mut packed);
            self.codes.push(&packed);
        }
    }

    /// Quantizes rows on the token axis (in parallel) and appends them.
    fn push_token_rows(&mut self, rows: &[&[f32]]) {
        let c = self.quantizer.config;
        let (d, bits, gsz, ng) = (c.dim, c.bits, c.group, c.token_groups());
        let max = ((1u32 << bits) - 1) as f32;
        let rb = self.quantizer.row_bytes;
        let encoded: Vec<(Vec<u8>, Vec<u16>, Vec<u16>)> = rows
            .par_iter()
            .map(|row| {
                let (mut zs, mut ss) = (Vec::with_capacity(ng), Vec::with_capacity(ng));
                let mut codes = vec![0u8; d];
                for (chunk, out) in row.chunks(gsz).zip(codes.chunks_mut(gsz)) {
                    let (lo, hi) = chunk
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                            (a.min(v), b.max(v))
                        });
                    let (z, s) = group_params(lo, hi, bits);
                    zs.push(z.to_bits());
                    ss.push(s.to_bits());
                    let (zf, sf) = (z.to_f32(), s.to_f32());
                    for (k, &x) in out.iter_mut().zip(chunk) {
                        *k = code_of(x, zf, sf, max);
                    }
                }
                let mut packed = vec![0u8; rb];
                bitpack::pack_unchecked(&codes, bits, &mut packed);
                (packed, ss, zs)
            })
            .collect();
        for (packed, ss, zs) in encoded {
            self.codes.push(&packed);
            self.scales.extend(ss);
            self.zeros.extend(zs);
        }
    }

    /// Keeps the first `n` rows. On the channel axis, cutting into a quantized group moves that
    /// group's kept rows back into the residual as their decoded values (rounded to f16) (they are quantized
    /// again, with the rows that follow, when the group refills).
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len() {
            return;
        }
        let d = self.d();
        let c = self.quantizer.config;
        match c.axis {
            KiviAxis::Token => {
                self.codes.resize_rows(n);
                self.scales.truncate(n * c.token_groups());
                self.zeros.truncate(n * c.token_groups());
            }
            KiviAxis::Channel => {
                let q = self.quantized_len();
                if n >= q {
                    self.residual.truncate(n - q);
                    return;
                }
                let first = n / c.group * c.group;
                let mut kept = vec![0.0f32; (n - first) * d];
                for (i, row) in (first..n).zip(kept.chunks_exact_mut(d)) {
                    self.decode_row(i, row);
                }
                self.codes.resize_rows(first);
                self.scales.truncate(first / c.group * d);
                self.zeros.truncate(first / c.group * d);
                self.residual.replace(&kept);
            }
        }
    }

    /// Decodes row `i < len` (unchecked).
    fn decode_row(&self, i: usize, out: &mut [f32]) {
        let mut scratch = self.scratch();
        self.decode_row_with(i, out, &mut scratch);
    }

    /// Buffers for [`KiviBatch::decode_row_with`]: a packed row and its codes.
    fn scratch(&self) -> (Vec<u8>, Vec<u8>) {
        (vec![0u8; self.quantizer.row_bytes], vec![0u8; self.d()])
    }

    /// Decodes row `i < len` (unchecked) with caller-owned scratch.
    fn decode_row_with(&self, i: usize, out: &mut [f32], scratch: &mut (Vec<u8>, Vec<u8>)) {
        let c = self.quantizer.config;
        let d = c.dim;
        let q = self.quantized_len();
        if i >= q {
            self.residual.row_into(i - q, out);
            return;
        }
        let (packed, codes) = scratch;
        self.codes.read_row(i, packed);
        bitpack::unpack_unchecked(packed, c.bits, codes);
        let at = |v: &[u16], k: usize| f16::from_bits(v[k]).to_f32();
        match c.axis {
            KiviAxis::Channel => {
                let base = i / c.group * d;
                for (ch, (o, &k)) in out.iter_mut().zip(codes.iter()).enumerate() {
                    *o = at(&self.zeros, base + ch) + at(&self.scales, base + ch) * k as f32;
                }
            }
            KiviAxis::Token => {
                let base = i * c.token_groups();
                for (ch, (o, &k)) in out.iter_mut().zip(codes.iter()).enumerate() {
                    let g = base + ch / c.group;
                    *o = at(&self.zeros, g) + at(&self.scales, g) * k as f32;
                }
            }
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

    /// Decodes every row (row-major `len · d`), in parallel.
    pub fn dequantize_all(&self) -> Vec<f32> {
        let d = self.d();
        let mut out = vec![0.0; self.len() * d];
        out.par_chunks_mut(d).enumerate().for_each_init(
            || self.scratch(),
            |scratch, (i, o)| self.decode_row_with(i, o, scratch),
        );
        out
    }

    /// `outs[j] = Σ_i weights[j][i] · x̃_i`: each row with a non-zero weight decoded once (into
    /// reused scratch) and added to every output. O(n · d · outputs).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` for weight vectors of another length, [`Error::DimMismatch`] for
    /// outputs of another dimension.
    pub fn weighted_sums_into(&self, weights: &[&[f32]], outs: &mut [&mut [f32]]) -> Result<()> {
        crate::encoded::check_weighted(self.len(), self.d(), weights, outs)?;
        outs.iter_mut().for_each(|o| o.fill(0.0));
        let mut scratch = self.scratch();
        let mut row = vec![0.0f32; self.d()];
        for i in 0..self.len() {
            if weights.iter().all(|w| w[i] == 0.0) {
                continue;
            }
            self.decode_row_with(i, &mut row, &mut scratch);
            for (w, o) in weights.iter().zip(outs.iter_mut()) {
                simd::axpy(w[i], &row, o);
            }
        }
        Ok(())
    }

    /// Inner-product estimates `⟨q, x̃_i⟩` of every row for each query into `outs[j]`:
    /// channel-axis groups in batches through [`KiviBatch::score_groups`] (all queries per pass
    /// over a group's codes on the fast 4-bit path), the residual and the token axis exactly.
    fn score_rows(
        &self,
        queries: &[&KiviQuery],
        outs: &mut [&mut [f32]],
        fast: bool,
    ) -> Result<()> {
        check_len("score outputs", outs.len(), queries.len())?;
        for (query, out) in queries.iter().zip(outs.iter()) {
            check_dim(&query.q, self.d())?;
            check_len("score output", self.len(), out.len())?;
        }
        let c = self.quantizer.config;
        let d = c.dim;
        let q = self.quantized_len();
        let mut coded: Vec<&mut [f32]> = Vec::with_capacity(outs.len());
        for (query, out) in queries.iter().zip(outs.iter_mut()) {
            let (head, rest) = out.split_at_mut(q);
            self.residual.score_into(&query.q, rest);
            coded.push(head);
        }
        match c.axis {
            KiviAxis::Channel if score::split_rows(q) => {
                // Each batch's slice of every query's output, so batches can run in parallel.
                let rows = GROUP_BATCH * c.group;
                let mut batches: Vec<Vec<&mut [f32]>> = (0..q.div_ceil(rows))
                    .map(|_| Vec::with_capacity(queries.len()))
                    .collect();
                for o in coded {
                    for (b, chunk) in batches.iter_mut().zip(o.chunks_mut(rows)) {
                        b.push(chunk);
                    }
                }
                let groups = q / c.group;
                batches.into_par_iter().enumerate().for_each_init(
                    GroupScratch::default,
                    |scratch, (b, mut o)| {
                        let range = b * GROUP_BATCH..((b + 1) * GROUP_BATCH).min(groups);
                        self.score_groups(queries, range, &mut o, 0, fast, scratch)
                    },
                );
            }
            KiviAxis::Channel => {
                // One thread: every batch writes its rows of the whole outputs, nothing allocated
                // per batch.
                let mut scratch = GroupScratch::default();
                let groups = q / c.group;
                for b in (0..groups).step_by(GROUP_BATCH) {
                    let range = b..(b + GROUP_BATCH).min(groups);
                    self.score_groups(queries, range, &mut coded, b * c.group, fast, &mut scratch);
                }
            }
            KiviAxis::Token => {
                for (query, coded) in queries.iter().zip(coded) {
                    let work = |(scratch, row): &mut ((Vec<u8>, Vec<u8>), Vec<f32>),
                                (i, o): (usize, &mut f32)| {
                        self.decode_row_with(i, row, scratch);
                        *o = simd::dot(&query.q, row);
                    };
                    let init = || (self.scratch(), vec![0.0f32; d]);
                    if score::split_rows(q) {
                        coded.par_iter_mut().enumerate().for_each_init(init, work);
                    } else {
                        let mut state = init();
                        coded
                            .iter_mut()
                            .enumerate()
                            .for_each(|p| work(&mut state, p));
                    }
                }
            }
        }
        Ok(())
    }

    /// Scores the rows of the channel-axis groups `groups` for every query into `outs[j][at..at
    /// + groups.len() · G]`, with buffers reused across the batches. 4-bit codes on the fast
    /// path take integer dot products against `i8` weights ([`KiviBatch::score_groups_i8`]);
    /// other widths and the exact path per-group tables, one group and query at a time
    /// ([`KiviBatch::score_group`]).
    fn score_groups(
        &self,
        queries: &[&KiviQuery],
        groups: std::ops::Range<usize>,
        outs: &mut [&mut [f32]],
        at: usize,
        fast: bool,
        scratch: &mut GroupScratch,
    ) {
        let c = self.quantizer.config;
        if fast && c.bits == 4 {
            self.score_groups_i8(queries, groups, outs, at, scratch);
            return;
        }
        let first = groups.start;
        for g in groups {
            self.score_group(queries, g, outs, at + (g - first) * c.group, fast, scratch);
        }
    }

    /// Scores the rows of channel-axis group `g` for every query into `outs[j][at..at + G]`
    /// through per-group tables (the exact path, and widths other than 4 on the fast one).
    fn score_group(
        &self,
        queries: &[&KiviQuery],
        g: usize,
        outs: &mut [&mut [f32]],
        at: usize,
        fast: bool,
        scratch: &mut GroupScratch,
    ) {
        let c = self.quantizer.config;
        let d = c.dim;
        // The group's scales to f32 in one pass (eight per instruction where the CPU has F16C);
        // its zeros enter only through `Σ_c q_c z_c`, read as f16 by `half_simd::dot`.
        scratch.scales.resize(d, 0.0);
        half_simd::widen(&self.scales[g * d..(g + 1) * d], &mut scratch.scales);
        let zeros = &self.zeros[g * d..(g + 1) * d];
        let first = g * c.group;
        for (query, out) in queries.iter().zip(outs.iter_mut()) {
            let out = &mut out[at..at + c.group];
            let offset = half_simd::dot(&query.q, zeros);
            scratch.products.clear();
            scratch
                .products
                .extend(query.q.iter().zip(&scratch.scales).map(|(a, b)| a * b));
            let weights = &scratch.products[..];
            let tables = Tables::for_codes(
                weights,
                &self.quantizer.levels,
                c.bits,
                self.quantizer.row_bytes,
            );
            match tables {
                Some(t) => {
                    let mut dots = [0.0f32; BLOCK];
                    let mut done = 0;
                    while done < out.len() {
                        let row = first + done;
                        let (b, slot) = (row / BLOCK, row % BLOCK);
                        if fast {
                            t.block_fast(self.codes.block(b), &mut dots);
                        } else {
                            t.block_exact(self.codes.block(b), &mut dots);
                        }
                        let take = (BLOCK - slot).min(out.len() - done);
                        for (o, &v) in out[done..done + take].iter_mut().zip(&dots[slot..]) {
                            *o = v + offset;
                        }
                        done += take;
                    }
                }
                None => {
                    let mut packed = vec![0u8; self.quantizer.row_bytes];
                    let mut codes = vec![0u8; d];
                    for (k, o) in out.iter_mut().enumerate() {
                        self.codes.read_row(first + k, &mut packed);
                        bitpack::unpack_unchecked(&packed, c.bits, &mut codes);
                        *o = offset
                            + weights
                                .iter()
                                .zip(&codes)
                                .map(|(w, &v)| w * v as f32)
                                .sum::<f32>();
                    }
                }
            }
        }
    }

    /// The fast 4-bit path of [`KiviBatch::score_groups`]: first every group's scales to f32,
    /// then per query the weights `q_c s_c` of every group of the batch rounded to `i8` with
    /// step `max_c |q_c s_c| / 127` ([`scan::nibble_weights_i8_groups`]: the groups' short
    /// dependent chains overlap) and each offset `Σ_c q_c z_c` (the f16 zeros read by
    /// `half_simd::dot`); then one integer pass over each block of each group for all queries
    /// ([`scan::dot_nibbles_i8`]). No per-query tables. The next batch's scales and zeros are
    /// asked for at the start, and each block's codes [`CODES_AHEAD_BYTES`] ahead.
    fn score_groups_i8(
        &self,
        queries: &[&KiviQuery],
        groups: std::ops::Range<usize>,
        outs: &mut [&mut [f32]],
        at: usize,
        scratch: &mut GroupScratch,
    ) {
        let c = self.quantizer.config;
        let d = c.dim;
        let positions = 2 * self.quantizer.row_bytes;
        let (nq, ng) = (queries.len(), groups.len());
        let per_query = ng * positions;
        // Read from memory, the scan outran the hardware's prefetch of its three streams: the
        // next batch's scales and zeros are asked for now, and each block's codes about 8 KiB
        // ahead as the blocks are walked.
        let next = groups.end..(2 * groups.end - groups.start).min(self.scales.len() / d);
        Ahead::over(1)
            .with(&self.scales[next.start * d..next.end * d])
            .with(&self.zeros[next.start * d..next.end * d])
            .rows(0..1);
        let codes = Ahead::over(self.quantized_len()).with(self.codes.blocks());
        let distance = (CODES_AHEAD_BYTES / self.quantizer.row_bytes).max(BLOCK);
        scratch.scales.resize(ng * d, 0.0);
        scratch.weights.resize(nq * per_query, 0);
        scratch.steps.resize(nq * ng, 0.0);
        scratch.affine.clear();
        // Every group's scales first: the weights read them whole registers at a time, which
        // a load just behind the narrower stores of the widening would wait for.
        for (g, scales) in groups.clone().zip(scratch.scales.chunks_exact_mut(d)) {
            half_simd::widen(&self.scales[g * d..(g + 1) * d], scales);
        }
        // Per query, every group's weights (query-major: `weights[(j · ng + k) · positions..]`)
        // and steps, then the affine maps in the same order.
        for ((query, w), steps) in queries
            .iter()
            .zip(scratch.weights.chunks_exact_mut(per_query))
            .zip(scratch.steps.chunks_exact_mut(ng))
        {
            scan::nibble_weights_i8_groups(&query.q, &scratch.scales, w, steps);
            for (g, &step) in groups.clone().zip(steps.iter()) {
                let zeros = &self.zeros[g * d..(g + 1) * d];
                scratch.affine.push((half_simd::dot(&query.q, zeros), step));
            }
        }
        scratch.sums.resize(nq, [0; BLOCK]);
        for (k, g) in groups.enumerate() {
            let (first, base) = (g * c.group, at + k * c.group);
            let mut done = 0;
            while done < c.group {
                let row = first + done;
                let (b, slot) = (row / BLOCK, row % BLOCK);
                let block = self.codes.block(b);
                codes.rows(row + distance..row + distance + BLOCK);
                // The queries in passes of up to `DOT_QUERIES`, their weights named by a stack
                // array (no allocation per group).
                for (pass, sums) in scratch.sums.chunks_mut(scan::DOT_QUERIES).enumerate() {
                    let mut refs: [&[i8]; scan::DOT_QUERIES] = [&[]; scan::DOT_QUERIES];
                    for (i, r) in refs.iter_mut().enumerate().take(sums.len()) {
                        let j = pass * scan::DOT_QUERIES + i;
                        let from = (j * ng + k) * positions;
                        *r = &scratch.weights[from..from + positions];
                    }
                    scan::dot_nibbles_i8(block, &refs[..sums.len()], sums);
                }
                let take = (BLOCK - slot).min(c.group - done);
                for (j, (out, sums)) in outs.iter_mut().zip(&scratch.sums).enumerate() {
                    let (offset, step) = scratch.affine[j * ng + k];
                    for (o, &v) in out[base + done..base + done + take]
                        .iter_mut()
                        .zip(&sums[slot..])
                    {
                        *o = offset + step * v as f32;
                    }
                }
                done += take;
            }
        }
    }

    /// Scores through the fast tables (see the [module docs](self)).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `out.len() != len`; [`Error::DimMismatch`] for a query of
    /// another dimension.
    pub fn score_into(&self, query: &KiviQuery, out: &mut [f32]) -> Result<()> {
        self.score_rows(&[query], &mut [out], true)
    }

    /// [`KiviBatch::score_into`] for several queries at once (the query heads of one kv head):
    /// on the fast 4-bit path each group's codes are read once for all queries. O(queries · n · d).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `outs.len() != queries.len()` or any `out.len() != len`;
    /// [`Error::DimMismatch`] for a query of another dimension.
    pub fn score_many_into(&self, queries: &[&KiviQuery], outs: &mut [&mut [f32]]) -> Result<()> {
        self.score_rows(queries, outs, true)
    }

    /// The quantized rows' codes, scales and zeros (not the newest incomplete group's f16 rows),
    /// for a scan of another batch of as many rows to ask for
    /// ([`EncodedVectors::ahead`](crate::EncodedVectors::ahead)). O(1).
    pub fn ahead(&self) -> Ahead<'_> {
        Ahead::over(self.quantized_len())
            .with(self.codes.blocks())
            .with(&self.scales)
            .with(&self.zeros)
    }

    /// As [`KiviBatch::score_into`] with exact `f32` tables: equal to scoring the decoded rows up
    /// to float summation order.
    ///
    /// # Errors
    /// As [`KiviBatch::score_into`].
    pub fn score_exact_into(&self, query: &KiviQuery, out: &mut [f32]) -> Result<()> {
        self.score_rows(&[query], &mut [out], false)
    }

    /// The `k` rows with the largest exact estimates, best first.
    ///
    /// # Errors
    /// As [`KiviBatch::score_into`].
    pub fn top_k(&self, query: &KiviQuery, k: usize) -> Result<Vec<Hit>> {
        let mut s = vec![0.0; self.len()];
        self.score_exact_into(query, &mut s)?;
        Ok(score::top_k_of(&s, k))
    }
}
