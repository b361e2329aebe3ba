//! `TurboQuant_mse`: rotate, quantize every coordinate with the Lloyd-Max codebook, bit-pack.
//!
//! A vector `x` is stored as its norm `‖x‖` (f32) and the `b`-bit codes of `y = Π x / ‖x‖`
//! (`ceil(d·b/8)` bytes). It decodes to `x̃ = ‖x‖ · Πᵀ c[codes]`, and inner products are estimated
//! as `⟨q, x̃⟩ = ‖x‖ · ⟨Π q, c[codes]⟩` without decoding: the query is rotated once and each row is
//! scored with per-query look-up tables ([`crate::score`]). The zero vector is stored with norm 0
//! and the codes of `y = 0`, so it decodes to 0 exactly.
//!
//! The estimator is biased: `E⟨q, x̃⟩ ≈ (1 - D_mse/2)·⟨q, x⟩`-like shrinkage, and exactly
//! `(2/π)·⟨q, x⟩` at `b = 1` for large `d` (docs/DESIGN.md, Reference numbers); [`crate::ProdQuantizer`] removes the bias.

use std::sync::Arc;

use rayon::prelude::*;
use tq_core::prefetch::Ahead;
use tq_core::scan::{self, BLOCK, ByteCodebook, ByteQuery, IntCodebook, IntQuery, block_bytes};
use tq_core::{Codebook, Rotation, bitpack, simd};

use crate::config::{MseConfig, ScaleMode, ScalePrecision};
use crate::error::{check_batch, check_dim, check_finite, check_len, check_range, check_rows};
use crate::packed::PackedRows;
use crate::scales::RowScales;
use crate::score::{
    self, BYTE_DOT_BITS, BYTE_SUM_MAX_BITS, Hit, INT_DOT_MIN_BITS, TableKind, Tables,
};
use crate::{Error, Result};

/// Rows summed per chunk by [`MseBatch::accumulate_rotated_multi`] (a multiple of the 32-row
/// block): long batches are split here so that threads can share one head's value sum.
pub const ACCUMULATE_CHUNK_ROWS: usize = 8192;

/// A `TurboQuant_mse` quantizer: the rotation and codebook of one [`MseConfig`].
#[derive(Debug, Clone)]
pub struct MseQuantizer {
    config: MseConfig,
    rotation: Rotation,
    codebook: Arc<Codebook>,
    row_bytes: usize,
    /// The calibrated mean subtracted before quantization (`config.centered`).
    mean: Option<Arc<[f32]>>,
    /// The codebook on the integer grid of the fast paths: 5-8-bit keys score through integer
    /// dots on it (below 5 bits keys scan `u8` tables or, at 4 bits, take the byte dots),
    /// values of every width are summed on it.
    grid: Arc<IntCodebook>,
    /// 1-4 bits: the codebook on the byte grid that values are summed on where the CPU runs
    /// the byte sums ([`scan::byte_sums_native`]) and, at 4 bits, keys score through where it
    /// runs the byte dots ([`scan::byte_dots_native`]; else the `u8` tables).
    bytes: Option<Arc<ByteCodebook>>,
}

/// Reusable buffers for encoding.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub(crate) ys: Vec<f32>,
    pub(crate) codes: Vec<u8>,
    pub(crate) packed: Vec<u8>,
}

impl MseQuantizer {
    /// Builds the quantizer (regenerates the rotation from the seed; fetches the cached codebook).
    ///
    /// # Errors
    /// See [`MseConfig::validate`].
    pub fn new(config: MseConfig) -> Result<Self> {
        config.validate()?;
        if config.centered {
            return Err(Error::ConfigMismatch(
                "a centred quantizer needs its mean: use MseQuantizer::with_mean".into(),
            ));
        }
        let rotation = Rotation::new(config.rotation, config.dim, config.seed)?;
        let codebook = Codebook::get(config.dim, config.bits)?;
        let grid = Arc::new(IntCodebook::from_centroids(codebook.centroids()));
        let bytes = (config.bits <= BYTE_SUM_MAX_BITS)
            .then(|| Arc::new(ByteCodebook::from_centroids(codebook.centroids())));
        Ok(Self {
            config,
            rotation,
            codebook,
            row_bytes: bitpack::packed_len(config.dim, config.bits),
            mean: None,
            grid,
            bytes,
        })
    }

    /// A centred quantizer: vectors are quantized as `x - mean`, scores add `⟨q, mean⟩` back and
    /// rows decode to `x̃ + mean`. Sets `config.centered`. The mean is stored with saved batches.
    ///
    /// # Errors
    /// As [`MseQuantizer::new`]; [`Error::DimMismatch`] / [`Error::NonFinite`] for a bad mean.
    pub fn with_mean(config: MseConfig, mean: Vec<f32>) -> Result<Self> {
        check_dim(&mean, config.dim)?;
        check_finite(&mean)?;
        let mut q = Self::new(MseConfig {
            centered: false,
            ..config
        })?;
        q.config.centered = true;
        q.mean = Some(mean.into());
        Ok(q)
    }

    /// The mean of `n` row-major sample vectors (`samples.len() == n·dim`, `n >= 1`), for
    /// [`MseQuantizer::with_mean`]. O(n·d).
    ///
    /// # Errors
    /// [`Error::DimMismatch`] for a ragged or empty sample, [`Error::NonFinite`].
    pub fn calibrate_mean(samples: &[f32], dim: usize) -> Result<Vec<f32>> {
        let n = check_batch(samples, dim)?;
        if n == 0 {
            return Err(Error::DimMismatch {
                expected: dim,
                got: 0,
            });
        }
        let mut acc = vec![0f64; dim];
        for row in samples.chunks_exact(dim) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        Ok(acc.iter().map(|a| (a / n as f64) as f32).collect())
    }

    /// The calibrated mean of a centred quantizer.
    pub fn mean(&self) -> Option<&[f32]> {
        self.mean.as_deref()
    }

    /// The stored scalar for a row with norm `norm`, rotated unit vector `y` and codes `codes`
    /// ([`ScaleMode`]).
    #[inline]
    /// Before rounding to the stored width ([`RowScales`] rounds as it stores).
    pub(crate) fn scale_of(&self, norm: f32, y: &[f32], codes: &[u8]) -> f32 {
        if self.config.scale == ScaleMode::Norm || norm == 0.0 {
            return norm;
        }
        let c = self.codebook.centroids();
        let (mut yc, mut cc) = (0f64, 0f64);
        for (&v, &k) in y.iter().zip(codes) {
            let ck = c[k as usize] as f64;
            yc += v as f64 * ck;
            cc += ck * ck;
        }
        // Nearest-centroid codes of a symmetric codebook keep every y_j·c_j >= 0, so yc > 0 for
        // any non-zero y; the guards only catch degenerate rounding.
        match self.config.scale {
            ScaleMode::LeastSquares if cc > 0.0 => (norm as f64 * yc / cc) as f32,
            ScaleMode::Unbiased if yc > 0.0 => (norm as f64 / yc) as f32,
            _ => norm,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MseConfig {
        &self.config
    }

    /// Dimension `d`.
    pub fn dim(&self) -> usize {
        self.config.dim
    }

    /// Bits per coordinate.
    pub fn bits(&self) -> u32 {
        self.config.bits
    }

    /// The rotation `Π`.
    pub fn rotation(&self) -> &Rotation {
        &self.rotation
    }

    /// The codebook.
    pub fn codebook(&self) -> &Codebook {
        &self.codebook
    }

    /// Packed code bytes per vector: `ceil(d·b/8)`.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Stored bytes per vector: codes plus the scale (4 or 2 bytes, [`ScalePrecision`]).
    pub fn bytes_per_vector(&self) -> usize {
        self.row_bytes + self.config.scale_precision.bytes()
    }

    /// Rotates `n` rows and scales each to unit norm: `ys[i] = Π xs[i] / ‖xs[i]‖` (zero rows stay
    /// zero), `norms[i] = ‖xs[i]‖`. Lengths are trusted; a row with a non-finite value gets a
    /// non-finite norm (what [`MseBatch::extend`] relies on to find it without a pass of its own).
    pub(crate) fn rotate_unit(&self, xs: &[f32], ys: &mut [f32], norms: &mut [f32]) {
        let d = self.dim();
        let centred: Vec<f32>;
        let xs = match &self.mean {
            Some(m) => {
                centred = xs
                    .chunks_exact(d)
                    .flat_map(|x| x.iter().zip(m.iter()).map(|(a, b)| a - b))
                    .collect();
                &centred[..]
            }
            None => xs,
        };
        // The norms first: their sequential pass brings the rows into cache for the rotation's
        // transposed reads.
        for (x, n) in xs.chunks_exact(d).zip(norms.iter_mut()) {
            *n = simd::sum_squares_fixed(x).sqrt();
        }
        if self.rotation.apply_batch(xs, ys).is_err() {
            debug_assert!(false, "rotate_unit: sizes");
        }
        for (y, &norm) in ys.chunks_exact_mut(d).zip(norms.iter()) {
            if norm > 0.0 {
                simd::scale_in_place(y, 1.0 / norm);
            } else {
                y.fill(0.0);
            }
        }
    }

    /// Checks that every row of `xs` (trusted: finite, whole rows) gets a scale the configured
    /// width holds, writing nothing. Every row's squared norm must be finite (a finite norm keeps
    /// every scale mode finite in f32). For f16 scales a row passes at once when its norm times a
    /// bound on `scale / norm` stays under the largest f16 (the bound, from the codebook's
    /// smallest centroid `c`: 1 for the norm scale, `1 / (sqrt(d) c)` for least squares since
    /// `<y,ỹ>/|ỹ|² <= 1/|ỹ|`, `sqrt(d) / c` for the unbiased scale since `<y,ỹ> >= max_j |y_j| c`);
    /// only batches with a row above it compute the scales as quantization would (rotation and
    /// codebook search, no packing). O(n · d), or O(n · d log d) for such a batch.
    ///
    /// # Errors
    /// [`Error::ScaleOverflow`] naming the first such row.
    pub(crate) fn check_scales(&self, xs: &[f32]) -> Result<()> {
        let d = self.dim();
        let f16_max = half::f16::MAX.to_f32();
        let c_min = self
            .codebook
            .centroids()
            .iter()
            .fold(f32::INFINITY, |m, c| m.min(c.abs()));
        let sqrt_d = (d as f32).sqrt();
        let ratio = match self.config.scale {
            ScaleMode::Norm => 1.0,
            ScaleMode::LeastSquares => 1.0 / (sqrt_d * c_min),
            ScaleMode::Unbiased => sqrt_d / c_min,
        };
        let mut all_small = true;
        let mut centred = vec![0.0f32; d];
        for (row, x) in xs.chunks_exact(d).enumerate() {
            let x = match &self.mean {
                Some(m) => {
                    for ((c, a), b) in centred.iter_mut().zip(x).zip(m.iter()) {
                        *c = a - b;
                    }
                    &centred[..]
                }
                None => x,
            };
            let sq = simd::sum_squares_fixed(x);
            if !sq.is_finite() {
                return Err(Error::ScaleOverflow {
                    row,
                    scale: sq.sqrt(),
                    max: f32::MAX,
                });
            }
            // A 1% margin covers the rounding of the norm and of the bound.
            all_small &= sq.sqrt() * ratio <= 0.99 * f16_max;
        }
        if self.config.scale_precision == ScalePrecision::F32 || all_small {
            return Ok(());
        }
        let mut s = Scratch::default();
        let mut norms = [0.0f32; BLOCK];
        for (b, chunk) in xs.chunks(BLOCK * d).enumerate() {
            let n = chunk.len() / d;
            s.ys.resize(n * d, 0.0);
            s.codes.resize(d, 0);
            self.rotate_unit(chunk, &mut s.ys, &mut norms[..n]);
            let mut scales = [0.0f32; BLOCK];
            for ((y, norm), sc) in s.ys.chunks_exact(d).zip(&norms[..n]).zip(&mut scales) {
                self.codebook.quantize_slice(y, &mut s.codes);
                *sc = self.scale_of(*norm, y, &s.codes);
            }
            RowScales::from_f32(ScalePrecision::F16, &scales[..n]).map_err(|e| match e {
                Error::ScaleOverflow { row, scale, max } => Error::ScaleOverflow {
                    row: b * BLOCK + row,
                    scale,
                    max,
                },
                other => other,
            })?;
        }
        Ok(())
    }

    /// Codes and packed bytes of one rotated unit row.
    #[inline]
    pub(crate) fn code_row(&self, y: &[f32], codes: &mut [u8], packed: &mut [u8]) {
        self.codebook.quantize_slice(y, codes);
        bitpack::pack_unchecked(codes, self.bits(), packed);
    }

    /// Encodes up to 32 rows (trusted lengths) into slots `first_slot..` of one block, writing
    /// their scales; a row with a non-finite value gets a non-finite scale.
    /// A block filled from slot 0 is written whole (its later slots become zero).
    pub(crate) fn encode_block(
        &self,
        xs: &[f32],
        block: &mut [u8],
        first_slot: usize,
        norms: &mut [f32],
        s: &mut Scratch,
    ) {
        let d = self.dim();
        let n = xs.len() / d;
        let rb = self.row_bytes;
        s.ys.resize(n * d, 0.0);
        s.codes.resize(n * d, 0);
        self.rotate_unit(xs, &mut s.ys, norms);
        // Every row's codes in one search (the codebook's SIMD tables are set up once).
        self.codebook.quantize_slice(&s.ys, &mut s.codes);
        for ((y, c), n) in
            s.ys.chunks_exact(d)
                .zip(s.codes.chunks_exact(d))
                .zip(norms.iter_mut())
        {
            *n = self.scale_of(*n, y, c);
        }
        if self.bits() == 4 && first_slot == 0 {
            // 4-bit codes go straight into the block layout, unpacked.
            scan::write_block_codes4(&s.codes, d, block);
            return;
        }
        s.packed.resize(n * rb, 0);
        for (c, p) in s.codes.chunks_exact(d).zip(s.packed.chunks_exact_mut(rb)) {
            bitpack::pack_unchecked(c, self.bits(), p);
        }
        scan::write_rows(&s.packed, rb, block, first_slot);
    }

    /// Quantizes one vector: returns its packed codes (`row_bytes` bytes) and scale (rounded to
    /// the configured [`ScalePrecision`]). O(d log d) (Hadamard) or O(d²) (Haar).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`], [`Error::ScaleOverflow`].
    pub fn quantize(&self, x: &[f32]) -> Result<(Vec<u8>, f32)> {
        let mut packed = vec![0u8; self.row_bytes];
        let norm = self.quantize_into(x, &mut packed)?;
        Ok((packed, norm))
    }

    /// Quantizes one vector into `packed` (`row_bytes` bytes) and returns its scale (rounded to
    /// the configured [`ScalePrecision`]).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`], `Core(LengthMismatch)` for a wrong `packed`,
    /// [`Error::ScaleOverflow`] for a scale f16 scales cannot hold.
    pub fn quantize_into(&self, x: &[f32], packed: &mut [u8]) -> Result<f32> {
        check_dim(x, self.dim())?;
        check_finite(x)?;
        check_len("packed row", self.row_bytes, packed.len())?;
        let mut y = vec![0.0; self.dim()];
        let mut norm = [0.0f32];
        self.rotate_unit(x, &mut y, &mut norm);
        let mut codes = vec![0u8; self.dim()];
        self.code_row(&y, &mut codes, packed);
        let s = self.scale_of(norm[0], &y, &codes);
        let stored = RowScales::from_f32(self.config.scale_precision, &[s])?;
        Ok(stored.get(0))
    }

    /// Rotated-domain reconstruction `c[codes]` of one packed row (unit scale).
    pub(crate) fn decode_rotated(&self, packed: &[u8], codes: &mut [u8], out: &mut [f32]) {
        bitpack::unpack_unchecked(packed, self.bits(), codes);
        let c = self.codebook.centroids();
        for (o, &k) in out.iter_mut().zip(codes.iter()) {
            *o = c[k as usize];
        }
    }

    /// Decodes one packed row: `out = norm · Πᵀ c[codes]`.
    ///
    /// # Errors
    /// `Core(LengthMismatch)` for a `packed` of the wrong length, [`Error::DimMismatch`] for `out`.
    pub fn dequantize_into(&self, packed: &[u8], norm: f32, out: &mut [f32]) -> Result<()> {
        check_len("packed row", self.row_bytes, packed.len())?;
        check_dim(out, self.dim())?;
        let mut codes = vec![0u8; self.dim()];
        let mut y = vec![0.0; self.dim()];
        self.decode_rotated(packed, &mut codes, &mut y);
        self.rotation.apply_inverse_unchecked(&y, out);
        simd::scale_in_place(out, norm);
        self.add_mean(out, 1.0);
        Ok(())
    }

    /// `out += w · mean` for a centred quantizer (no-op otherwise).
    #[inline]
    pub(crate) fn add_mean(&self, out: &mut [f32], w: f32) {
        if let Some(m) = &self.mean {
            simd::axpy(w, m, out);
        }
    }

    /// [`Self::add_mean`] weighted by `Σ weights` (a weighted sum of decoded rows carries the mean
    /// that many times); the sum is only taken for a centred quantizer. O(n + d) or O(1).
    pub(crate) fn add_weighted_mean(&self, out: &mut [f32], weights: &[f32]) {
        if self.mean.is_some() {
            self.add_mean(out, weights.iter().sum());
        }
    }

    /// Prepares a query for scoring: rotates it once, builds its look-up tables (1-5 bits; at 5
    /// bits the exact path's only), its `i16` weights on the codebook's integer grid (5-8 bits,
    /// the fast path) and, at 4 bits where the CPU runs the byte dots
    /// ([`scan::byte_dots_native`]), its `i8` weights on the byte grid (the fast path there).
    /// O(d log d + 2^b·d) at 3 and 5 bits, O(d log d + 16·d) at 1, 2 and 4, O(d log d) at 6-8.
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`]; [`Error::ValueOutOfRange`] for a value of
    /// magnitude above `f32::MAX / (2d)`, which the rotation's sums could carry past `f32::MAX`.
    pub fn prepare_query(&self, q: &[f32]) -> Result<MseQuery> {
        check_dim(q, self.dim())?;
        check_finite(q)?;
        check_range(q, f32::MAX / (2 * self.dim()) as f32)?;
        let mut rotated = vec![0.0; self.dim()];
        self.rotation.apply_unchecked(q, &mut rotated);
        let offset = self.mean.as_ref().map_or(0.0, |m| simd::dot(q, m));
        let tables = Tables::for_codes(
            &rotated,
            self.codebook.centroids(),
            self.bits(),
            self.row_bytes,
        );
        // A query so small that one unit of its integer sums is not a normal f32 would lose the
        // fast scores' precision: it keeps the tables' fast path (5 bits) or the exact path.
        let int = (self.bits() >= INT_DOT_MIN_BITS)
            .then(|| (Arc::clone(&self.grid), self.grid.quantize_query(&rotated)))
            .filter(|(_, iq)| iq.step == 0.0 || iq.step.is_normal());
        // The same for the byte grid (4 bits, where the CPU runs the byte dots natively).
        let bytes = self
            .bytes
            .as_ref()
            .filter(|_| self.bits() == BYTE_DOT_BITS && scan::byte_dots_native())
            .map(|book| {
                let bq = book.quantize_query(&rotated, 2 * self.row_bytes);
                (Arc::clone(book), bq)
            })
            .filter(|(_, bq)| bq.step.is_normal());
        Ok(MseQuery {
            rotated,
            tables,
            int,
            bytes,
            centroids: self.codebook.centroids().to_vec(),
            offset,
        })
    }
}

/// A query prepared for one [`MseQuantizer`]: the rotated query, its look-up tables (1-5 bits),
/// its byte weights (4 bits, where the CPU runs the byte dots) and its integer weights (5-8
/// bits).
#[derive(Debug, Clone)]
pub struct MseQuery {
    rotated: Vec<f32>,
    tables: Option<Tables>,
    /// 5-8 bits: the codebook's integer grid and the rotated query on it (the fast path).
    int: Option<(Arc<IntCodebook>, IntQuery)>,
    /// 4 bits where the CPU runs the byte dots: the codebook's byte grid and the rotated query
    /// on `i8` weights (the fast path, in place of the `u8` tables).
    bytes: Option<(Arc<ByteCodebook>, ByteQuery)>,
    centroids: Vec<f32>,
    /// `⟨q, mean⟩` for a centred quantizer, added to every score.
    offset: f32,
}

impl MseQuery {
    /// `⟨q, mean⟩` (0 unless the quantizer is centred), added to every score.
    pub fn offset(&self) -> f32 {
        self.offset
    }

    /// The rotated query `Π q`.
    pub fn rotated(&self) -> &[f32] {
        &self.rotated
    }

    /// `⟨Π q, c[codes]⟩` for one row-major packed row, in f32 (the exact path). `codes` is scratch
    /// of length `d`.
    pub(crate) fn row_dot(&self, packed: &[u8], bits: u32, codes: &mut [u8]) -> f32 {
        match &self.tables {
            Some(t) if t.kind == score::TableKind::Nibble => scan::score_row_f32(packed, &t.exact),
            _ => {
                bitpack::unpack_unchecked(packed, bits, codes);
                self.rotated
                    .iter()
                    .zip(codes.iter())
                    .map(|(q, &k)| q * self.centroids[k as usize])
                    .sum()
            }
        }
    }

    /// Unit-scale dots of the rows of block `b` (exact f32 path) into `out` (`<= 32` rows).
    pub(crate) fn block_dots_exact(&self, rows: &PackedRows, b: usize, bits: u32, out: &mut [f32]) {
        match &self.tables {
            Some(t) => t.block_exact(rows.block(b), out),
            None => {
                // Widths without tables (6-8 bits): straight from the block layout.
                let mut all = [0.0f32; BLOCK];
                scan::dot_block_codes(
                    rows.block(b),
                    bits,
                    &self.centroids,
                    &self.rotated,
                    &mut all,
                );
                out.copy_from_slice(&all[..out.len()]);
            }
        }
    }

    /// Unit-scale dots of block `b` (`out.len() <= 32` rows) on the fast path: through the `u8`
    /// tables (1-4 bits), the byte dots (4 bits, where the CPU runs them) or the integer dots on
    /// the codebook's grid (5-8 bits), else exact.
    pub(crate) fn block_dots_fast(&self, rows: &PackedRows, b: usize, bits: u32, out: &mut [f32]) {
        let ones = [1.0f32; BLOCK];
        let (rb, ones) = (rows.row_bytes(), &ones[..out.len()]);
        match (&self.int, &self.bytes, &self.tables) {
            (Some(grid), _, _) => int_scores(grid, rows.block(b), rb, bits, 0.0, ones, out),
            (None, Some(grid), _) => byte_scores(grid, rows.block(b), rb, 0.0, ones, out),
            (None, None, Some(t)) => t.block_fast(rows.block(b), out),
            (None, None, None) => self.block_dots_exact(rows, b, bits, out),
        }
    }

    /// True when the fast path differs from the exact one (`u8` tables, byte or integer dots in
    /// use).
    pub fn has_fast_path(&self) -> bool {
        self.tables.is_some() || self.int.is_some() || self.bytes.is_some()
    }
}

/// Byte-dot scores `scales[i] · dot_i + bias` of `out.len()` rows of the consecutive `blocks`
/// for a query on the byte grid `(book, weights)` ([`scan::dot_blocks_scores_u8`]).
fn byte_scores(
    (book, bq): &(Arc<ByteCodebook>, ByteQuery),
    blocks: &[u8],
    row_bytes: usize,
    bias: f32,
    scales: &[f32],
    out: &mut [f32],
) {
    let mut jobs = [scan::ByteJob {
        weights: &bq.weights,
        affine: byte_affine(bq, bias),
        out,
    }];
    scan::dot_blocks_scores_u8(blocks, row_bytes, book, scales, &mut jobs, Ahead::NONE);
}

/// The map from a byte-grid query's integer sums to its scores, plus `bias`.
fn byte_affine(bq: &ByteQuery, bias: f32) -> scan::Affine {
    scan::Affine {
        offset: bq.offset,
        step: bq.step,
        bias,
    }
}

/// Integer-dot scores `scales[i] · dot_i + bias` of `out.len()` rows of the consecutive `blocks`
/// for a query on the integer grid `(book, weights)` ([`scan::dot_blocks_scores_i16`]).
fn int_scores(
    (book, iq): &(Arc<IntCodebook>, IntQuery),
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    bias: f32,
    scales: &[f32],
    out: &mut [f32],
) {
    let affine = scan::Affine {
        offset: iq.offset,
        step: iq.step,
        bias,
    };
    scan::dot_blocks_scores_i16(
        blocks,
        row_bytes,
        bits,
        book,
        &iq.weights,
        affine,
        scales,
        out,
    );
}

/// A growable batch of `TurboQuant_mse` codes: packed codes in the 32-row block layout and one
/// scale per row (f32 or f16, [`ScalePrecision`]). Bytes per vector: `ceil(d·b/8) + 4` or `+ 2`.
#[derive(Debug, Clone)]
pub struct MseBatch {
    quantizer: Arc<MseQuantizer>,
    codes: PackedRows,
    norms: RowScales,
}

impl MseBatch {
    /// An empty batch for `quantizer`.
    pub fn new(quantizer: Arc<MseQuantizer>) -> Self {
        let codes = PackedRows::new(quantizer.row_bytes());
        let norms = RowScales::new(quantizer.config().scale_precision);
        Self {
            quantizer,
            codes,
            norms,
        }
    }

    /// Assembles a batch from parts (used by deserialization; lengths and widths are checked).
    ///
    /// # Errors
    /// [`Error::ConfigMismatch`] when the parts disagree with each other or the quantizer (codes
    /// of another row width or count, scales of another width than the configuration's).
    pub fn from_parts(
        quantizer: Arc<MseQuantizer>,
        codes: PackedRows,
        norms: RowScales,
    ) -> Result<Self> {
        let want = quantizer.config().scale_precision;
        if norms.precision() != want {
            return Err(Error::ConfigMismatch(format!(
                "{} scales for a quantizer that stores {} scales",
                norms.precision().name(),
                want.name()
            )));
        }
        if codes.row_bytes() != quantizer.row_bytes() || codes.len() != norms.len() {
            return Err(Error::ConfigMismatch(format!(
                "codes of {} rows x {} bytes with {} norms for rows of {} bytes",
                codes.len(),
                codes.row_bytes(),
                norms.len(),
                quantizer.row_bytes()
            )));
        }
        Ok(Self {
            quantizer,
            codes,
            norms,
        })
    }

    /// The quantizer.
    pub fn quantizer(&self) -> &Arc<MseQuantizer> {
        &self.quantizer
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.norms.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.norms.is_empty()
    }

    /// The packed codes.
    pub fn codes(&self) -> &PackedRows {
        &self.codes
    }

    /// The stored scales as f32 (borrowed for f32 scales, converted for f16). O(n) for f16.
    pub fn norms(&self) -> std::borrow::Cow<'_, [f32]> {
        self.norms.to_f32()
    }

    /// The stored scales at their stored width.
    pub fn scales(&self) -> &RowScales {
        &self.norms
    }

    /// Exact stored bytes per vector: `ceil(d·b/8) + 4`.
    pub fn bytes_per_vector(&self) -> usize {
        self.quantizer.bytes_per_vector()
    }

    /// Bytes held in memory (codes with the last block's padding, and scales).
    pub fn memory_bytes(&self) -> usize {
        self.codes.memory_bytes() + self.norms.memory_bytes()
    }

    /// Appends one vector. O(d log d) or O(d²).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`], [`Error::ScaleOverflow`] (nothing is
    /// appended then).
    pub fn push(&mut self, x: &[f32]) -> Result<()> {
        check_dim(x, self.quantizer.dim())?;
        self.extend(x)
    }

    /// Appends `n = xs.len() / d` row-major vectors, quantizing whole blocks in parallel on the
    /// current rayon pool.
    ///
    /// # Errors
    /// [`Error::DimMismatch`] if `xs.len()` is not a multiple of `d`, [`Error::NonFinite`],
    /// [`Error::ScaleOverflow`] for a scale f16 scales cannot hold (nothing is appended then).
    pub fn extend(&mut self, xs: &[f32]) -> Result<()> {
        let d = self.quantizer.dim();
        let n = check_rows(xs, d)?;
        let start = self.len();
        self.codes.resize_rows(start + n);
        let mut norms = vec![0.0f32; n];
        // Finiteness is checked on the way, not in a pass of its own over the input: a row with
        // a non-finite value has a non-finite sum of squares, hence a non-finite scale in every
        // scale mode, and only then is the input searched for the value to report.
        self.encode_rows(xs, start, &mut norms);
        let checked = if norms.iter().all(|s| s.is_finite()) {
            Ok(())
        } else {
            check_finite(xs)
        };
        if let Err(e) = checked.and_then(|()| self.norms.extend_from_f32(&norms)) {
            self.codes.resize_rows(start);
            return Err(e);
        }
        Ok(())
    }

    /// Encodes the `n = norms.len()` rows `xs` (trusted lengths; a non-finite value gives its row a
    /// non-finite scale) into rows `start..start + n` of the codes
    /// (already sized), writing their scales into `norms`.
    fn encode_rows(&mut self, xs: &[f32], start: usize, norms: &mut [f32]) {
        let d = self.quantizer.dim();
        let n = norms.len();
        let q = &*self.quantizer;
        // Fill the partially used last block first, then whole blocks in parallel.
        let head = ((BLOCK - start % BLOCK) % BLOCK).min(n);
        if head > 0 {
            let mut s = Scratch::default();
            let b = start / BLOCK;
            q.encode_block(
                &xs[..head * d],
                self.codes.block_mut(b),
                start % BLOCK,
                &mut norms[..head],
                &mut s,
            );
        }
        let first_block = (start + head) / BLOCK;
        let bb = scan::block_bytes(q.row_bytes());
        let rest = &xs[head * d..];
        let norms = &mut norms[head..];
        self.codes
            .blocks_mut_from(first_block)
            .par_chunks_mut(bb)
            .zip(rest.par_chunks(BLOCK * d))
            .zip(norms.par_chunks_mut(BLOCK))
            .for_each_init(Scratch::default, |s, ((block, x), nrm)| {
                q.encode_block(x, block, 0, nrm, s)
            });
    }

    /// Keeps the first `n` rows (no-op when `n >= len`).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.codes.resize_rows(n);
            self.norms.truncate(n);
        }
    }

    fn check_row(&self, i: usize) -> Result<()> {
        if i >= self.len() {
            return Err(Error::RowOutOfRange {
                index: i,
                len: self.len(),
            });
        }
        Ok(())
    }

    /// Copies the packed codes of row `i` (row-major, `row_bytes` bytes) into `out`.
    ///
    /// # Errors
    /// [`Error::RowOutOfRange`], `Core(LengthMismatch)`.
    pub fn row_codes(&self, i: usize, out: &mut [u8]) -> Result<()> {
        self.check_row(i)?;
        check_len("packed row", self.codes.row_bytes(), out.len())?;
        self.codes.read_row(i, out);
        Ok(())
    }

    /// Decodes row `i` into `out` (length `d`).
    ///
    /// # Errors
    /// [`Error::RowOutOfRange`], [`Error::DimMismatch`].
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        self.check_row(i)?;
        let mut packed = vec![0u8; self.codes.row_bytes()];
        self.codes.read_row(i, &mut packed);
        self.quantizer
            .dequantize_into(&packed, self.norms.get(i), out)
    }

    /// Decodes every row (row-major `len · d` floats).
    pub fn dequantize_all(&self) -> Vec<f32> {
        let d = self.quantizer.dim();
        let mut out = vec![0.0; self.len() * d];
        out.par_chunks_mut(d).enumerate().for_each_init(
            || {
                (
                    vec![0u8; self.codes.row_bytes()],
                    vec![0u8; d],
                    vec![0.0f32; d],
                )
            },
            |(packed, codes, y), (i, o)| {
                self.codes.read_row(i, packed);
                self.quantizer.decode_rotated(packed, codes, y);
                self.quantizer.rotation().apply_inverse_unchecked(y, o);
                simd::scale_in_place(o, self.norms.get(i));
                self.quantizer.add_mean(o, 1.0);
            },
        );
        out
    }

    /// `out_rot += Σ_i weights[i] · ‖x_i‖ · c[codes_i]`: the weighted sum of the decoded rows kept
    /// in the rotated domain (apply `Πᵀ` once to the total; a centred quantizer's mean, weighted by
    /// `Σ weights`, is not included). Rows with weight 0 are skipped a block at a time. O(n · d).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` unless `weights.len() == len`, [`Error::DimMismatch`] unless
    /// `out_rot.len() == d`.
    pub fn accumulate_rotated(&self, weights: &[f32], out_rot: &mut [f32]) -> Result<()> {
        self.accumulate_rotated_multi(&[weights], &mut [out_rot])
    }

    /// [`MseBatch::accumulate_rotated`] for several weight vectors at once: the codes are decoded
    /// once and shared (the queries of a grouped-query head, or a block of queries). Batches longer
    /// than [`ACCUMULATE_CHUNK_ROWS`] are summed a chunk of rows at a time, chunks in parallel on
    /// the current rayon pool when it has threads to spare, and the chunk sums are added in chunk
    /// order, so the result does not depend on the number of threads.
    ///
    /// # Errors
    /// As [`MseBatch::accumulate_rotated`] for every pair; `Core(LengthMismatch)` when the two
    /// slices differ in length.
    pub fn accumulate_rotated_multi(
        &self,
        weights: &[&[f32]],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        self.accumulate_rotated_with(weights, outs, false)
    }

    /// [`MseBatch::accumulate_rotated_multi`] on the fast path: each weight vector goes on `i16`
    /// weights (one scale per 128 rows,
    /// [`IntCodebook::quantize_weights`]) and the codebook on its 14-bit grid, and the sums are
    /// exact integers ([`scan::accumulate_blocks_i16`]: `vpdpwssd` with AVX-512 VNNI, `vpmaddwd`
    /// with AVX2, the same bits on every CPU that takes it). The roundings add about 0.001 of the
    /// quantization error at 4 bits (RMS, see the accuracy tests; 0.0001-0.0006 at 1-3 bits,
    /// relatively more at 8 bits, whose own error is 16 times smaller). At 1-4 bits, where the CPU has AVX-512 BW
    /// and VNNI ([`scan::byte_sums_native`]), non-negative weights (attention's) go on `u8`
    /// instead ([`tq_core::scan::ByteCodebook::quantize_weights`]) and the codebook on an 8-bit
    /// grid (the byte dots' at 4 bits; [`scan::accumulate_blocks_u8`]: one `vpdpbusd` per 16
    /// rows, four coordinates and vector, half the work): 0.05-0.08 of the quantization error at
    /// 4 bits, about what the 4-bit keys' byte dots add, 0.003-0.033 at 1-3 bits (so at 1-4 bits
    /// the fast sums differ between CPUs with and without it). The exact path takes a part of
    /// [`ACCUMULATE_CHUNK_ROWS`] rows whose weights the grid cannot hold for some weight vector
    /// (a non-finite product `weight · norm`, or all of that vector's products in the part so
    /// small that a unit of its sums would not be a normal `f32`: below about `2^-96` for these
    /// codebooks). On CPUs without AVX2 the integer sums run their scalar twin (the same
    /// results, no faster than the exact path there).
    ///
    /// # Errors
    /// As [`MseBatch::accumulate_rotated_multi`].
    pub fn accumulate_rotated_fast_multi(
        &self,
        weights: &[&[f32]],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        self.accumulate_rotated_with(weights, outs, true)
    }

    fn accumulate_rotated_with(
        &self,
        weights: &[&[f32]],
        outs: &mut [&mut [f32]],
        fast: bool,
    ) -> Result<()> {
        check_len("weight vectors", outs.len(), weights.len())?;
        for w in weights {
            check_len("weights", self.len(), w.len())?;
        }
        for o in outs.iter() {
            check_dim(o, self.quantizer.dim())?;
        }
        let (n, d) = (self.len(), self.quantizer.dim());
        // The rows' norms scale the weights inside the kernel (no per-query scaled copy).
        let chunk = |rows: std::ops::Range<usize>, accs: &mut [&mut [f32]]| {
            let bb = block_bytes(self.codes.row_bytes());
            let blocks =
                &self.codes.blocks()[rows.start / BLOCK * bb..rows.end.div_ceil(BLOCK) * bb];
            let ws: Vec<&[f32]> = weights.iter().map(|w| &w[rows.clone()]).collect();
            let norms = self.norms.f32_range(rows);
            if let Some(book) = self.quantizer.bytes.as_deref().filter(|_| fast)
                && scan::byte_sums_native()
            {
                // 1-4 bits where the CPU has VNNI: non-negative weights (attention's) on `u8`.
                let bytes: Option<Vec<_>> = ws
                    .iter()
                    .map(|w| book.quantize_weights(w, Some(&norms)))
                    .collect();
                if let Some(bytes) = bytes {
                    let refs: Vec<&scan::ByteWeights> = bytes.iter().collect();
                    let rb = self.codes.row_bytes();
                    scan::accumulate_blocks_u8(blocks, rb, book, &refs, accs);
                    return;
                }
            }
            if fast {
                let book = &*self.quantizer.grid;
                let ints: Option<Vec<_>> = ws
                    .iter()
                    .map(|w| book.quantize_weights(w, Some(&norms)))
                    .collect();
                if let Some(ints) = ints {
                    let refs: Vec<&scan::IntWeights> = ints.iter().collect();
                    let (rb, bits) = (self.codes.row_bytes(), self.quantizer.bits());
                    scan::accumulate_blocks_i16(blocks, rb, bits, book, &refs, accs);
                    return;
                }
            }
            scan::accumulate_blocks_multi(
                blocks,
                self.codes.row_bytes(),
                self.quantizer.bits(),
                self.quantizer.codebook().centroids(),
                Some(&norms),
                &ws,
                accs,
            );
        };
        if n <= ACCUMULATE_CHUNK_ROWS {
            chunk(0..n, outs);
            return Ok(());
        }
        let part = |c: usize| {
            let rows = c * ACCUMULATE_CHUNK_ROWS..((c + 1) * ACCUMULATE_CHUNK_ROWS).min(n);
            let mut acc = vec![0.0f32; weights.len() * d];
            let mut refs: Vec<&mut [f32]> = acc.chunks_exact_mut(d).collect();
            chunk(rows, &mut refs);
            acc
        };
        let chunks = n.div_ceil(ACCUMULATE_CHUNK_ROWS);
        let parts: Vec<Vec<f32>> = if score::split_rows(n) {
            (0..chunks).into_par_iter().map(part).collect()
        } else {
            (0..chunks).map(part).collect()
        };
        for p in &parts {
            for (o, a) in outs.iter_mut().zip(p.chunks_exact(d)) {
                for (o, &a) in o.iter_mut().zip(a) {
                    *o += a;
                }
            }
        }
        Ok(())
    }

    /// `outs[q] = Σ_i weights[q][i] · x̃_i` for every weight vector: the sums in the rotated
    /// domain (exact, or on the fast path when `fast`), one inverse rotation per output, a
    /// centred quantizer's mean added once, weighted by `Σ w`.
    pub(crate) fn weighted_sums_with(
        &self,
        weights: &[&[f32]],
        outs: &mut [&mut [f32]],
        fast: bool,
    ) -> Result<()> {
        crate::encoded::check_weighted(self.len(), self.quantizer.dim(), weights, outs)?;
        let d = self.quantizer.dim();
        let mut rot = vec![vec![0.0f32; d]; weights.len()];
        {
            let mut refs: Vec<&mut [f32]> = rot.iter_mut().map(Vec::as_mut_slice).collect();
            self.accumulate_rotated_with(weights, &mut refs, fast)?;
        }
        let q = &self.quantizer;
        for ((r, out), w) in rot.iter().zip(outs.iter_mut()).zip(weights) {
            q.rotation().apply_inverse_unchecked(r, out);
            q.add_weighted_mean(out, w);
        }
        Ok(())
    }

    /// `out = Σ_i weights[i] · x̃_i` (decoded rows), computed in the rotated domain and rotated back
    /// once: O(n · d + one rotation), no per-row decoding to the original domain.
    ///
    /// # Errors
    /// As [`MseBatch::accumulate_rotated`] (`out` must have length `d`).
    pub fn weighted_sum(&self, weights: &[f32], out: &mut [f32]) -> Result<()> {
        let mut rot = vec![0.0f32; self.quantizer.dim()];
        self.accumulate_rotated(weights, &mut rot)?;
        check_dim(out, self.quantizer.dim())?;
        self.quantizer.rotation().apply_inverse_unchecked(&rot, out);
        self.quantizer.add_weighted_mean(out, weights);
        Ok(())
    }

    fn check_out(&self, out: &[f32]) -> Result<()> {
        check_len("score output", self.len(), out.len())?;
        Ok(())
    }

    /// Inner-product estimates `‖x_i‖ · ⟨Π q, c[codes_i]⟩` for every row on the fast path: the
    /// `u8` tables at 1-4 bits (at 4 bits, where the CPU runs them, the byte dots instead,
    /// [`scan::dot_blocks_scores_u8`]: 0.08 of the quantization error against the tables' 0.19),
    /// the integer dots on the codebook's grid at 5-8 ([`scan::dot_blocks_scores_i16`];
    /// 0.003-0.030 of the quantization error). Parallel on the current rayon pool for large
    /// batches.
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `out.len() != len`.
    pub fn score_into(&self, query: &MseQuery, out: &mut [f32]) -> Result<()> {
        self.score_blocks(query, out, true)
    }

    /// [`MseBatch::score_into`] for several queries (`outs[i]` for `queries[i]`): on a batch
    /// scanned on this thread, 1-, 2- and 4-bit tables score in pairs, or threes with AVX-512 VL
    /// (each block read once per group, [`scan::scan_blocks_scores_multi`]), 4-bit queries on one
    /// byte grid in groups of three (each block's nibbles looked up once per group,
    /// [`scan::dot_blocks_scores_u8`]) and 5-8-bit queries on one integer grid in groups of three
    /// (each code cut out and looked up once per group, [`scan::dot_blocks_scores_i16_multi`]);
    /// else one query at a time (the byte and integer dots give [`MseBatch::score_into`]'s bits).
    /// O(queries · n).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `outs.len() != queries.len()` or any `out.len() != len`.
    pub fn score_many_into(&self, queries: &[&MseQuery], outs: &mut [&mut [f32]]) -> Result<()> {
        self.score_many_ahead(queries, outs, Ahead::NONE)
    }

    /// [`MseBatch::score_many_into`] asking for `ahead`'s lines of each block's rows as the
    /// grouped scans walk them (nibble tables on AVX2, 5-bit tables, byte and integer dots; not
    /// the one-query-at-a-time fallback of 3-bit tables, mixed grids or scans split over
    /// threads): the same scores. See [`EncodedVectors::score_many_ahead`].
    ///
    /// # Errors
    /// As [`MseBatch::score_many_into`].
    pub fn score_many_ahead(
        &self,
        queries: &[&MseQuery],
        outs: &mut [&mut [f32]],
        ahead: Ahead<'_>,
    ) -> Result<()> {
        check_len("score outputs", outs.len(), queries.len())?;
        for o in outs.iter() {
            self.check_out(o)?;
        }
        if let Some(book) = self.shared_book(queries, |q| q.int.as_ref().map(|(b, _)| b)) {
            // 5-8 bits: the codes cut out and looked up once per group of three queries.
            let rb = self.codes.row_bytes();
            let (blocks, scales) = self.chunk(0, self.len());
            let mut jobs: Vec<scan::IntJob<'_>> = queries
                .iter()
                .zip(outs.iter_mut())
                .filter_map(|(q, o)| {
                    let (_, iq) = q.int.as_ref()?;
                    Some(scan::IntJob {
                        weights: &iq.weights,
                        affine: scan::Affine {
                            offset: iq.offset,
                            step: iq.step,
                            bias: q.offset,
                        },
                        out: o,
                    })
                })
                .collect();
            let bits = self.quantizer.bits();
            scan::dot_blocks_scores_i16_multi(blocks, rb, bits, book, &scales, &mut jobs, ahead);
            return Ok(());
        }
        if let Some(book) = self.shared_book(queries, |q| q.bytes.as_ref().map(|(b, _)| b)) {
            // 4 bits: each unit of nibbles looked up once per group of three queries.
            let rb = self.codes.row_bytes();
            let (blocks, scales) = self.chunk(0, self.len());
            let mut jobs: Vec<scan::ByteJob<'_>> = queries
                .iter()
                .zip(outs.iter_mut())
                .filter_map(|(q, o)| {
                    let (_, bq) = q.bytes.as_ref()?;
                    Some(scan::ByteJob {
                        weights: &bq.weights,
                        affine: byte_affine(bq, q.offset),
                        out: o,
                    })
                })
                .collect();
            scan::dot_blocks_scores_u8(blocks, rb, book, &scales, &mut jobs, ahead);
            return Ok(());
        }
        // Queries on a grid but not one shared grid score one at a time (as `score_into`, on
        // their grids); the tables serve only queries without one.
        let tables: Option<Vec<&Tables>> = queries
            .iter()
            .map(|q| {
                q.tables
                    .as_ref()
                    .filter(|_| q.int.is_none() && q.bytes.is_none())
            })
            .collect();
        let (Some(tables), false) = (tables, score::split_rows(self.len())) else {
            return queries
                .iter()
                .zip(outs.iter_mut())
                .try_for_each(|(q, o)| self.score_into(q, o));
        };
        let biases: Vec<f32> = queries.iter().map(|q| q.offset).collect();
        Tables::scores_fast_many(
            &tables,
            self.codes.blocks(),
            self.codes.row_bytes(),
            &self.norms.to_f32(),
            &biases,
            outs,
            ahead,
        );
        Ok(())
    }

    /// The codes' blocks and the per-row norms, for a scan of another batch of as many rows to
    /// ask for ([`EncodedVectors::ahead`]; the blocks hold whole 32-row blocks, so a walk asks
    /// for the codes up to one block early). O(1).
    pub fn ahead(&self) -> Ahead<'_> {
        let a = Ahead::over(self.len()).with(self.codes.blocks());
        match &self.norms {
            RowScales::F32(v) => a.with(v),
            RowScales::F16(v) => a.with(v),
        }
    }

    /// The grid (`book` of a query: its integer or its byte grid) every query in `queries` (at
    /// least one) is weighted on, when they share one and the batch is scanned on this thread:
    /// then [`MseBatch::score_many_into`] scores them in groups
    /// ([`scan::dot_blocks_scores_i16_multi`], [`scan::dot_blocks_scores_u8`]).
    fn shared_book<'q, B>(
        &self,
        queries: &[&'q MseQuery],
        book: impl Fn(&'q MseQuery) -> Option<&'q Arc<B>>,
    ) -> Option<&'q B> {
        let first = book(queries.first()?)?;
        let shared = queries
            .iter()
            .all(|q| book(q).is_some_and(|b| Arc::ptr_eq(b, first)));
        (shared && !score::split_rows(self.len())).then_some(&**first)
    }

    /// As [`MseBatch::score_into`] with the exact `f32` tables.
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `out.len() != len`.
    pub fn score_exact_into(&self, query: &MseQuery, out: &mut [f32]) -> Result<()> {
        self.score_blocks(query, out, false)
    }

    /// Scores every row through the fast path (`u8` tables, byte or integer dots) or the exact
    /// (`f32`) one: unit dots times the stored scale, plus the query's mean offset.
    fn score_blocks(&self, query: &MseQuery, out: &mut [f32], fast: bool) -> Result<()> {
        self.check_out(out)?;
        match (&query.int, &query.bytes, &query.tables, fast) {
            (Some(grid), _, _, true) => {
                score::for_each_chunk(out, |start, o| self.int_chunk(grid, query, start, o))
            }
            (None, Some(grid), _, true) => {
                score::for_each_chunk(out, |start, o| self.byte_chunk(grid, query, start, o))
            }
            (None, None, Some(t), true) => {
                score::for_each_chunk(out, |start, o| self.fast_chunk(t, query, start, o, None))
            }
            _ => score::for_each_block(out, |b, o| self.score_block(query, b, o, fast)),
        }
        Ok(())
    }

    /// The scores a top-k search chooses its candidates by, one per row into `out` (`out.len() ==
    /// len`): through the query's 64-level search tables ([`Tables::for_search`]) where it has
    /// tables, else its fast scores; chunks in parallel when [`score::split_rows`] says so.
    fn candidate_scores(&self, query: &MseQuery, out: &mut [f32]) {
        match (&query.int, &query.tables) {
            (None, Some(t)) => {
                let t = t.for_search();
                score::for_each_chunk(out, |start, o| self.fast_chunk(&t, query, start, o, None));
            }
            _ => {
                let _ = self.score_into(query, out);
            }
        }
    }

    /// Fast scores of rows `start..start + o.len()` (`start` a multiple of 32) through the query's
    /// `u8` tables `t`: unit dots times the stored scale, plus the query's mean offset.
    fn fast_chunk(
        &self,
        t: &Tables,
        query: &MseQuery,
        start: usize,
        o: &mut [f32],
        select: Option<(f32, &mut [u32])>,
    ) {
        let (blocks, scales) = self.chunk(start, o.len());
        t.scores_fast(
            blocks,
            self.codes.row_bytes(),
            &scales,
            query.offset,
            o,
            select,
        );
    }

    /// The blocks and the stored scales of rows `start..start + len` (`start` a multiple of 32).
    fn chunk(&self, start: usize, len: usize) -> (&[u8], std::borrow::Cow<'_, [f32]>) {
        let bb = block_bytes(self.codes.row_bytes());
        let b0 = start / BLOCK;
        let blocks = &self.codes.blocks()[b0 * bb..(b0 + len.div_ceil(BLOCK)) * bb];
        (blocks, self.norms.f32_range(start..start + len))
    }

    /// Byte-dot scores of rows `start..start + o.len()` (`start` a multiple of 32) for `query` on
    /// its byte grid `grid` (4 bits): unit dots times the stored scale, plus the query's mean
    /// offset, in one kernel call.
    fn byte_chunk(
        &self,
        grid: &(Arc<ByteCodebook>, ByteQuery),
        query: &MseQuery,
        start: usize,
        o: &mut [f32],
    ) {
        let rb = self.codes.row_bytes();
        let (blocks, scales) = self.chunk(start, o.len());
        byte_scores(grid, blocks, rb, query.offset, &scales, o);
    }

    /// Integer-dot scores of rows `start..start + o.len()` (`start` a multiple of 32) for `query`
    /// on its integer grid `grid` (5-8 bits): unit dots times the stored scale, plus the query's
    /// mean offset, in one kernel call.
    fn int_chunk(
        &self,
        grid: &(Arc<IntCodebook>, IntQuery),
        query: &MseQuery,
        start: usize,
        o: &mut [f32],
    ) {
        let rb = self.codes.row_bytes();
        let (blocks, scales) = self.chunk(start, o.len());
        int_scores(
            grid,
            blocks,
            rb,
            self.quantizer.bits(),
            query.offset,
            &scales,
            o,
        );
    }

    /// Scores block `b` into `o` (its rows, at most 32): unit dots times the stored scale, plus
    /// the query's mean offset.
    fn score_block(&self, query: &MseQuery, b: usize, o: &mut [f32], fast: bool) {
        let bits = self.quantizer.bits();
        if fast {
            query.block_dots_fast(&self.codes, b, bits, o);
        } else {
            query.block_dots_exact(&self.codes, b, bits, o);
        }
        let scales = self.norms.f32_range(b * BLOCK..b * BLOCK + o.len());
        for (v, &n) in o.iter_mut().zip(scales.iter()) {
            *v = *v * n + query.offset;
        }
    }

    /// The `k` rows with the largest estimated inner product, best first: fast scores for all rows,
    /// then the best `max(4k, k + 32)` re-scored with the exact tables. Nibble-table queries
    /// choose those candidates with their tables quantized to 64 levels, not 256 (the fused scan
    /// then adds four steps' look-ups as bytes); the same tables on one thread or many, so the
    /// hits do not depend on the pool. O(n + k log k).
    pub fn top_k(&self, query: &MseQuery, k: usize) -> Vec<Hit> {
        let fast = query.has_fast_path();
        let c = if fast { score::rerank_candidates(k) } else { k };
        let mut sel = score::Candidates::new(c);
        if score::split_rows(self.len()) {
            // A large batch and a free pool: score in parallel (with the tables the one-pass
            // branch scans, so both choose the same candidates), then select.
            let mut scores = vec![0.0; self.len()];
            self.candidate_scores(query, &mut scores);
            for (b, chunk) in scores.chunks(BLOCK).enumerate() {
                sel.push(b * BLOCK, chunk);
            }
        } else if let Some(grid) = &query.int {
            // Integer dots (5-8 bits), a chunk of blocks per kernel call.
            let mut o = [0.0f32; score::SEARCH_CHUNK_ROWS];
            for (start, n) in score::search_chunks(self.len(), c) {
                let o = &mut o[..n];
                self.int_chunk(grid, query, start, o);
                sel.push(start, o);
            }
        } else if let Some(t) = &query.tables {
            // One pass, a chunk of blocks at a time: nothing of the batch's size is allocated.
            // The kernel marks the rows above the selection's threshold; only those are offered.
            let t = t.for_search();
            let t = t.as_ref();
            let mut o = [0.0f32; score::SEARCH_CHUNK_ROWS];
            let mut masks = [0u32; score::SEARCH_CHUNK_ROWS / BLOCK];
            for (start, n) in score::search_chunks(self.len(), c) {
                let o = &mut o[..n];
                let masks = &mut masks[..o.len().div_ceil(BLOCK)];
                self.fast_chunk(t, query, start, o, Some((sel.threshold(), &mut *masks)));
                sel.push_marked(start, o, masks);
            }
        } else {
            // No fast path: the exact path, block by block.
            let mut o = [0.0f32; BLOCK];
            for b in 0..self.len().div_ceil(BLOCK) {
                let o = &mut o[..(self.len() - b * BLOCK).min(BLOCK)];
                self.score_block(query, b, o, true);
                sel.push(b * BLOCK, o);
            }
        }
        self.finish_top_k(query, sel, fast, k)
    }

    /// The `k` best hits of each query, as [`MseBatch::top_k`] gives them one at a time (the same
    /// 64-level candidate tables); queries with 1-, 2- or 4-bit tables are scanned in groups of
    /// eight when the batch is scanned on this thread: each chunk of rows goes to
    /// [`scan::scan_blocks_scores_multi`] with the group's jobs, which reads the chunk once per
    /// pair (three jobs with AVX-512 VL) while it stays in cache. O(queries · n + k log k each).
    pub fn top_k_many(&self, queries: &[&MseQuery], k: usize) -> Vec<Vec<Hit>> {
        let pairable = |q: &MseQuery| {
            q.tables
                .as_ref()
                .is_some_and(|t| t.kind == TableKind::Nibble)
        };
        if score::split_rows(self.len()) || !queries.iter().all(|q| pairable(q)) {
            return queries.iter().map(|q| self.top_k(q, k)).collect();
        }
        let c = score::rerank_candidates(k);
        let rb = self.codes.row_bytes();
        let bb = block_bytes(rb);
        let mut hits = Vec::with_capacity(queries.len());
        for group in queries.chunks(score::SEARCH_QUERIES) {
            let tables: Vec<_> = group
                .iter()
                .filter_map(|q| q.tables.as_ref().map(Tables::for_search))
                .collect();
            let mut sels: Vec<score::Candidates> =
                group.iter().map(|_| score::Candidates::new(c)).collect();
            let mut outs = vec![[0.0f32; score::SEARCH_CHUNK_ROWS]; group.len()];
            let mut masks = vec![[0u32; score::SEARCH_CHUNK_ROWS / BLOCK]; group.len()];
            for (start, n) in score::search_chunks(self.len(), c) {
                let nb = n.div_ceil(BLOCK);
                let blocks = &self.codes.blocks()[start / BLOCK * bb..(start / BLOCK + nb) * bb];
                let mut jobs: Vec<scan::ScoreJob<'_>> = group
                    .iter()
                    .zip(&tables)
                    .zip(outs.iter_mut().zip(masks.iter_mut()))
                    .zip(&sels)
                    .map(|(((q, t), (o, m)), sel)| {
                        let lut = t.fast();
                        scan::ScoreJob {
                            tables: &lut.tables,
                            affine: scan::Affine {
                                offset: lut.offset,
                                step: lut.step,
                                bias: q.offset,
                            },
                            out: &mut o[..n],
                            marks: Some((sel.threshold(), &mut m[..nb])),
                        }
                    })
                    .collect();
                scan::scan_blocks_scores_multi(
                    blocks,
                    rb,
                    &self.norms.f32_range(start..start + n),
                    &mut jobs,
                    Ahead::NONE,
                );
                drop(jobs);
                for ((sel, o), m) in sels.iter_mut().zip(&outs).zip(&masks) {
                    sel.push_marked(start, &o[..n], &m[..nb]);
                }
            }
            for (q, sel) in group.iter().zip(sels) {
                hits.push(self.finish_top_k(q, sel, true, k));
            }
        }
        hits
    }

    /// The `k` best of a finished selection, best first: with `fast`, its candidates re-scored
    /// with the exact tables; else its scores as they are.
    fn finish_top_k(
        &self,
        query: &MseQuery,
        sel: score::Candidates,
        fast: bool,
        k: usize,
    ) -> Vec<Hit> {
        let cand = sel.finish();
        if !fast {
            let hits = cand
                .into_iter()
                .map(|(score, index)| Hit { index, score })
                .collect();
            return score::finish_hits(hits, k);
        }
        let mut packed = vec![0u8; self.codes.row_bytes()];
        let mut codes = vec![0u8; self.quantizer.dim()];
        let bits = self.quantizer.bits();
        let hits = cand
            .into_iter()
            .map(|(_, i)| {
                self.codes.read_row(i, &mut packed);
                Hit {
                    index: i,
                    score: self.norms.get(i) * query.row_dot(&packed, bits, &mut codes)
                        + query.offset,
                }
            })
            .collect();
        score::finish_hits(hits, k)
    }

    /// The exact top-k: every row scored with the `f32` tables.
    pub fn top_k_exact(&self, query: &MseQuery, k: usize) -> Vec<Hit> {
        let mut scores = vec![0.0; self.len()];
        let _ = self.score_exact_into(query, &mut scores);
        let idx = score::top_candidates(&scores, k);
        score::finish_hits(
            idx.into_iter()
                .map(|i| Hit {
                    index: i,
                    score: scores[i],
                })
                .collect(),
            k,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tq_core::{RotationKind, SeededRng, rng::stream};

    fn gaussian_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut r = SeededRng::new(seed, stream::DATA);
        (0..n * d).map(|_| r.gaussian() as f32).collect()
    }

    fn unit_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut x = gaussian_rows(n, d, seed);
        for row in x.chunks_exact_mut(d) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.iter_mut().for_each(|v| *v /= norm);
        }
        x
    }

    /// The candidate tables' rounding against the quantization error (root mean square over all
    /// query/row pairs, unit vectors, d = 128), beside the `u8` tables' (which the accuracy tests
    /// bound by 1/5 up to 4 bits): 64 levels round four times as coarsely. Measured with these
    /// seeds: 0.036 / 0.113 / 0.771 at 1 / 2 / 4 bits (`u8`: 0.009 / 0.029 / 0.188).
    #[test]
    fn coarse_candidate_error_against_quantization() {
        let (d, n, nq) = (128, 2048, 20);
        let xs = unit_rows(n, d, 1);
        let qs = unit_rows(nq, d, 2);
        for (bits, bound) in [(1u32, 0.06), (2, 0.18), (4, 1.1)] {
            let q = Arc::new(
                MseQuantizer::new(MseConfig::new(d, bits, RotationKind::Hadamard, 1)).unwrap(),
            );
            let mut batch = MseBatch::new(q.clone());
            batch.extend(&xs).unwrap();
            let (mut coarse_err, mut fine_err, mut quant_err) = (0.0f64, 0.0f64, 0.0f64);
            let mut fast_err = 0.0f64;
            let (mut coarse, mut fine, mut exact) =
                (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            let mut fast = vec![0.0f32; n];
            for (qi, qv) in qs.chunks_exact(d).enumerate() {
                let query = q.prepare_query(qv).unwrap();
                batch.candidate_scores(&query, &mut coarse);
                // The u8 tables (the fast path unless the byte dots run, 4 bits).
                let t = query.tables.as_ref().unwrap();
                score::for_each_chunk(&mut fine, |start, o| {
                    batch.fast_chunk(t, &query, start, o, None)
                });
                batch.score_into(&query, &mut fast).unwrap();
                batch.score_exact_into(&query, &mut exact).unwrap();
                for i in 0..n {
                    let truth: f64 = qs[qi * d..(qi + 1) * d]
                        .iter()
                        .zip(&xs[i * d..(i + 1) * d])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    coarse_err += ((coarse[i] - exact[i]) as f64).powi(2);
                    fine_err += ((fine[i] - exact[i]) as f64).powi(2);
                    fast_err += ((fast[i] - exact[i]) as f64).powi(2);
                    quant_err += (exact[i] as f64 - truth).powi(2);
                }
            }
            let (rc, rf, rb) = (
                (coarse_err / quant_err).sqrt(),
                (fine_err / quant_err).sqrt(),
                (fast_err / quant_err).sqrt(),
            );
            println!(
                "bits {bits}: coarse {rc:.3}, u8 {rf:.3}, fast path {rb:.3} of the quantization error"
            );
            assert!(rc <= bound, "bits {bits}: {rc}");
            if bits == BYTE_DOT_BITS && scan::byte_dots_native() {
                // The byte grid rounds the query and the codebook on finer steps than the
                // tables' shared one.
                assert!(
                    rb <= 0.6 * rf,
                    "bits {bits}: byte dots {rb} vs u8 tables {rf}"
                );
            } else {
                assert_eq!(
                    rb.to_bits(),
                    rf.to_bits(),
                    "bits {bits}: the fast path is the u8 tables"
                );
            }
            // Four times the step: between 2.5x and 6x the u8 tables' rounding.
            assert!(
                (2.5 * rf..=6.0 * rf).contains(&rc),
                "bits {bits}: {rc} vs {rf}"
            );
        }
    }

    /// With the coarse candidate tables (and at 5 and 8 bits the integer dots), `top_k` still
    /// returns the exact-table top-k: over 40 queries on 20 000 Gaussian rows (d = 128) at 1, 2,
    /// 4, 5 and 8 bits, the same best row for every query and at least 99% of the ten best (measured with
    /// these seeds: every one).
    #[test]
    fn top_k_finds_the_exact_top_k_with_coarse_candidates() {
        let (d, n, nq, k) = (128, 20_000, 40, 10);
        let xs = gaussian_rows(n, d, 8);
        let qs = gaussian_rows(nq, d, 9);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for bits in [1u32, 2, 4, 5, 8] {
            let q = Arc::new(
                MseQuantizer::new(MseConfig::new(d, bits, RotationKind::Hadamard, 3)).unwrap(),
            );
            let mut batch = MseBatch::new(q.clone());
            batch.extend(&xs).unwrap();
            let (mut first, mut found) = (0, 0);
            for qv in qs.chunks_exact(d) {
                let query = q.prepare_query(qv).unwrap();
                let got = one.install(|| batch.top_k(&query, k));
                let want = batch.top_k_exact(&query, k);
                first += usize::from(got[0].index == want[0].index);
                found += got
                    .iter()
                    .filter(|h| want.iter().any(|w| w.index == h.index))
                    .count();
            }
            println!(
                "bits {bits}: top-1 {first}/{nq}, top-{k} {found}/{}",
                nq * k
            );
            assert_eq!(first, nq, "bits {bits}");
            assert!(found * 100 >= 99 * nq * k, "bits {bits}: {found}");
        }
    }

    /// The single-pass top-k (the kernel marks rows above the running threshold, only those are
    /// offered) equals an independent reference: the best `max(4k, k + 32)` rows by their scores
    /// through the search tables ([`score::Tables::for_search`]; at 5 and 8 bits the integer dots;
    /// full sort, ties by index), re-ranked by their exact scores. Quantized data with many
    /// near-ties.
    #[test]
    fn single_pass_top_k_equals_sort_and_rerank() {
        let (d, n, k) = (32, 3000, 10);
        for bits in [2u32, 4, 5, 8] {
            let q = Arc::new(
                MseQuantizer::new(MseConfig::new(d, bits, RotationKind::Hadamard, 17)).unwrap(),
            );
            let mut batch = MseBatch::new(q.clone());
            // Rows repeat every 97: equal codes and scores, ties broken by index.
            let base = gaussian_rows(97, d, 8);
            let rows: Vec<f32> = (0..n)
                .flat_map(|i| base[(i % 97) * d..(i % 97 + 1) * d].to_vec())
                .collect();
            batch.extend(&rows).unwrap();
            for seed in 0..3 {
                let query = q.prepare_query(&gaussian_rows(1, d, 20 + seed)).unwrap();
                let got = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap()
                    .install(|| batch.top_k(&query, k));
                let (mut fast, mut exact) = (vec![0.0f32; n], vec![0.0f32; n]);
                batch.candidate_scores(&query, &mut fast);
                batch.score_exact_into(&query, &mut exact).unwrap();
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| fast[b].total_cmp(&fast[a]).then(a.cmp(&b)));
                let mut cand = order[..(4 * k).max(k + 32)].to_vec();
                cand.sort_by(|&a, &b| exact[b].total_cmp(&exact[a]).then(a.cmp(&b)));
                let want: Vec<usize> = cand[..k].to_vec();
                let idx: Vec<usize> = got.iter().map(|h| h.index).collect();
                assert_eq!(idx, want, "bits {bits} seed {seed}");
                for h in &got {
                    assert!(
                        (h.score - exact[h.index]).abs() <= 1e-4 * (1.0 + exact[h.index].abs())
                    );
                }
                // The search tables are the coarser grid, not the scoring tables; at 5 and 8 bits
                // the candidates are the integer dots (the fast scores).
                if bits >= 5 {
                    assert!(query.int.is_some() && query.has_fast_path());
                    continue;
                }
                let Some(t) = query.tables.as_ref() else {
                    panic!("bits {bits}: no tables")
                };
                let coarse = t.for_search();
                assert!(
                    coarse
                        .fast()
                        .tables
                        .iter()
                        .all(|&t| t <= score::SEARCH_MAX_ENTRY)
                );
                assert!(t.fast().tables.iter().any(|&t| t > score::SEARCH_MAX_ENTRY));
            }
        }
    }
}
