//! PolarQuant (Han et al., arXiv 2502.02617), experimental: a recursive polar transform of the
//! rotated vector, with Lloyd-Max codebooks for the angles of each level.
//!
//! **Transform.** `y = Π x/‖x‖` (the shared tq-core rotation) is cut into blocks of `2^L`
//! coordinates. Level 1 turns each pair `(a, b)` into an angle `θ = atan2(b, a) ∈ [0, 2π)` and a
//! radius `sqrt(a² + b²)`; each level `l >= 2` turns a pair of radii `(r₁, r₂)` into
//! `ψ = atan2(r₂, r₁) ∈ [0, π/2]` and `sqrt(r₁² + r₂²)`. One radius per block remains.
//!
//! **Codebooks.** For a rotated (uniformly random) direction the level-1 angles are uniform on
//! `[0, 2π)` and the level-`l` angles have density `∝ sin^(2^(l-1) - 1)(2ψ)` on `[0, π/2]`; each
//! level has its own Lloyd-Max codebook of `bits[l-1]` bits for that law, built once per
//! configuration by the tabulated Lloyd iteration of [`lloyd_max_on`].
//!
//! **Storage per vector.** The angle codes, packed LSB-first level by level inside each block
//! (level 1's `2^(L-1)` codes, then level 2's, ...); one **f16** radius per block (of the unit
//! vector, so in `[0, 1]`); one f32 norm. Bits per coordinate:
//! `(Σ_l 2^(L-l) b_l + 16) / 2^L + 32/d`; the paper's `L = 4`, bits `4,2,2,2` give 3.875 plus the
//! norm (4.125 at d = 128).
//!
//! **Dimensions** must be multiples of `2^L` (a typed error otherwise; there is no tail rule).
//!
//! **Scoring** decodes each row in the rotated domain (cosines and sines of the centroids are
//! tabulated, so decoding is multiplications only) and takes its dot product with `Π q`: O(d) per
//! row, no inverse rotation per row.

use std::sync::Arc;

use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tq_core::bitpack::{BitReader, write_bits};
pub use tq_core::codebook::lloyd_max_on;
use tq_core::{Rotation, RotationKind, simd};

use crate::error::{check_batch, check_dim, check_finite, check_len};
use crate::score::{self, Hit};
use crate::{Error, Result};

/// Configuration of a [`PolarQuantizer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolarConfig {
    /// Dimension, a multiple of `2^levels`.
    pub dim: usize,
    /// Bits of each level's angles, level 1 first (`levels = bits.len()`, `1..=6`, each `1..=8`).
    pub level_bits: Vec<u32>,
    /// The random rotation.
    pub rotation: RotationKind,
    /// Seed of the rotation.
    pub seed: u64,
}

impl PolarConfig {
    /// The paper's setting: 4 levels, 4 bits at level 1 and 2 bits at levels 2-4.
    pub fn paper(dim: usize, rotation: RotationKind, seed: u64) -> Self {
        Self {
            dim,
            level_bits: vec![4, 2, 2, 2],
            rotation,
            seed,
        }
    }

    /// Validates the configuration.
    ///
    /// # Errors
    /// [`Error::BitsOutOfRange`] for a level outside `1..=8` or a level count outside `1..=6`,
    /// [`Error::DimMismatch`] when `dim` is not a positive multiple of `2^levels`.
    pub fn validate(&self) -> Result<()> {
        let l = self.level_bits.len();
        if !(1..=6).contains(&l) {
            return Err(Error::BitsOutOfRange {
                quantizer: "PolarQuant levels",
                bits: l as u32,
                min: 1,
                max: 6,
            });
        }
        if let Some(&b) = self.level_bits.iter().find(|b| !(1..=8).contains(*b)) {
            return Err(Error::BitsOutOfRange {
                quantizer: "PolarQuant level",
                bits: b,
                min: 1,
                max: 8,
            });
        }
        crate::config::check_dim(self.dim, self.rotation == RotationKind::Haar)?;
        let block = 1usize << l;
        if !self.dim.is_multiple_of(block) {
            return Err(Error::DimMismatch {
                expected: self.dim.div_ceil(block) * block,
                got: self.dim,
            });
        }
        Ok(())
    }

    /// Block length `2^L`.
    pub fn block(&self) -> usize {
        1 << self.level_bits.len()
    }

    /// Angle-code bits per block.
    pub fn code_bits_per_block(&self) -> usize {
        let l = self.level_bits.len();
        self.level_bits
            .iter()
            .enumerate()
            .map(|(i, &b)| (1usize << (l - 1 - i)) * b as usize)
            .sum()
    }
}

/// One level's angle codebook: centroids with their cosines and sines, and cell boundaries.
#[derive(Debug, Clone)]
struct AngleBook {
    bits: u32,
    centroids: Vec<f64>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Ascending interior boundaries (midpoints); level 1 wraps around `2π`.
    bounds: Vec<f64>,
    circular: bool,
}

impl AngleBook {
    fn new(level: usize, bits: u32) -> Self {
        let levels = 1usize << bits;
        let (centroids, circular) = if level == 1 {
            // Uniform law on the circle: the optimal cells are equal arcs.
            let w = std::f64::consts::TAU / levels as f64;
            ((0..levels).map(|i| (i as f64 + 0.5) * w).collect(), true)
        } else {
            let p = (1i32 << (level - 1)) - 1;
            (
                lloyd_max_on(
                    |t| libm::sin(2.0 * t).max(0.0).powi(p),
                    0.0,
                    std::f64::consts::FRAC_PI_2,
                    levels,
                ),
                false,
            )
        };
        let bounds = centroids.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        Self {
            bits,
            cos: centroids.iter().map(|&t| libm::cos(t) as f32).collect(),
            sin: centroids.iter().map(|&t| libm::sin(t) as f32).collect(),
            centroids,
            bounds,
            circular,
        }
    }

    fn quantize(&self, angle: f64) -> u8 {
        if self.circular {
            let n = self.centroids.len() as f64;
            let k = (angle / std::f64::consts::TAU * n).floor();
            return (k.clamp(0.0, n - 1.0)) as u8;
        }
        self.bounds.partition_point(|&b| b < angle) as u8
    }
}

/// A query prepared for one [`PolarQuantizer`]: the rotated query `Π q`.
#[derive(Debug, Clone)]
pub struct PolarQuery {
    rotated: Vec<f32>,
}

impl PolarQuery {
    /// The rotated query `Π q`.
    pub fn rotated(&self) -> &[f32] {
        &self.rotated
    }
}

/// A PolarQuant quantizer.
#[derive(Debug, Clone)]
pub struct PolarQuantizer {
    config: PolarConfig,
    rotation: Rotation,
    books: Vec<AngleBook>,
    /// Bytes of angle codes per row.
    code_bytes: usize,
}

impl PolarQuantizer {
    /// Builds the quantizer (rotation from the seed, one codebook per level).
    ///
    /// # Errors
    /// See [`PolarConfig::validate`].
    pub fn new(config: PolarConfig) -> Result<Self> {
        config.validate()?;
        let rotation = Rotation::new(config.rotation, config.dim, config.seed)?;
        let books = config
            .level_bits
            .iter()
            .enumerate()
            .map(|(i, &b)| AngleBook::new(i + 1, b))
            .collect();
        let code_bytes = (config.dim / config.block() * config.code_bits_per_block()).div_ceil(8);
        Ok(Self {
            config,
            rotation,
            books,
            code_bytes,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PolarConfig {
        &self.config
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        self.config.dim
    }

    /// Bytes of angle codes per vector.
    pub fn code_bytes(&self) -> usize {
        self.code_bytes
    }

    /// Angle-code bits actually used per vector (the rest of the last byte is zero).
    pub fn code_bits(&self) -> usize {
        self.dim() / self.config.block() * self.config.code_bits_per_block()
    }

    /// Stored bytes per vector: angle codes, one f16 radius per block, one f32 norm.
    pub fn bytes_per_vector(&self) -> usize {
        self.code_bytes + 2 * (self.dim() / self.config.block()) + 4
    }

    /// Prepares a query for scoring: `Π q`, once. O(d log d) (Hadamard) or O(d²) (Haar).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`].
    pub fn prepare_query(&self, q: &[f32]) -> Result<PolarQuery> {
        check_dim(q, self.dim())?;
        check_finite(q)?;
        let mut rotated = vec![0.0f32; self.dim()];
        self.rotation.apply_unchecked(q, &mut rotated);
        Ok(PolarQuery { rotated })
    }

    /// The centroids of level `l` (1-based), ascending, in radians.
    pub fn level_centroids(&self, level: usize) -> Option<&[f64]> {
        self.books
            .get(level.checked_sub(1)?)
            .map(|b| b.centroids.as_slice())
    }

    /// The forward polar transform of one block (no quantization): angles level by level (level 1
    /// first) and the final radius.
    pub fn polar_transform(block: &[f32]) -> (Vec<Vec<f64>>, f64) {
        let mut radii: Vec<f64> = block.iter().map(|&v| v as f64).collect();
        let mut angles = Vec::new();
        let mut level = 1;
        while radii.len() > 1 {
            let mut next = Vec::with_capacity(radii.len() / 2);
            let mut ang = Vec::with_capacity(radii.len() / 2);
            for p in radii.chunks_exact(2) {
                let mut t = libm::atan2(p[1], p[0]);
                if level == 1 && t < 0.0 {
                    t += std::f64::consts::TAU;
                }
                ang.push(t);
                next.push(libm::hypot(p[0], p[1]));
            }
            angles.push(ang);
            radii = next;
            level += 1;
        }
        (angles, radii[0])
    }

    /// The inverse of [`PolarQuantizer::polar_transform`].
    pub fn polar_inverse(angles: &[Vec<f64>], radius: f64, out: &mut [f32]) {
        let mut radii = vec![radius];
        for ang in angles.iter().rev() {
            radii = radii
                .iter()
                .zip(ang)
                .flat_map(|(&r, &t)| [r * libm::cos(t), r * libm::sin(t)])
                .collect();
        }
        for (o, r) in out.iter_mut().zip(radii) {
            *o = r as f32;
        }
    }

    /// Encodes one trusted row: packed angle codes, per-block f16 radii, returns the norm.
    fn encode_row(&self, x: &[f32], codes: &mut [u8], radii: &mut [u16], y: &mut Vec<f32>) -> f32 {
        let d = self.dim();
        let norm = simd::sum_squares_fixed(x).sqrt();
        y.resize(d, 0.0);
        self.rotation.apply_unchecked(x, y);
        if norm > 0.0 {
            simd::scale_in_place(y, 1.0 / norm);
        }
        // The transform of `polar_transform`, in place: level by level, pair i's radius replaces
        // slot i (read before any later write reaches it), and each angle's code is written as
        // soon as it is known, in the stored order (level 1's codes first within a block).
        codes.fill(0);
        let mut pos = 0usize;
        let mut buf = [0f64; 64];
        for (blk, r) in y.chunks_exact(self.config.block()).zip(radii.iter_mut()) {
            for (b, &v) in buf.iter_mut().zip(blk) {
                *b = v as f64;
            }
            let mut width = blk.len();
            for (level, book) in self.books.iter().enumerate() {
                for i in 0..width / 2 {
                    let (a, b) = (buf[2 * i], buf[2 * i + 1]);
                    let mut t = libm::atan2(b, a);
                    if level == 0 && t < 0.0 {
                        t += std::f64::consts::TAU;
                    }
                    write_bits(codes, &mut pos, book.quantize(t), book.bits);
                    buf[i] = libm::hypot(a, b);
                }
                width /= 2;
            }
            *r = f16::from_f64(buf[0]).to_bits();
        }
        norm
    }

    /// Decodes one row into the rotated domain at unit scale times `norm`. Radii are expanded
    /// top-down in place: after level `l` the first `2^(L-l+1)` slots of the block hold that
    /// level's radii, in order (no allocation per row).
    fn decode_rotated(&self, codes: &[u8], radii: &[u16], norm: f32, out: &mut [f32]) {
        let mut reader = BitReader::new(codes);
        let l = self.books.len();
        let block = self.config.block();
        let mut level_codes = [[0u8; 32]; 6];
        for (blk, &r) in out.chunks_exact_mut(block).zip(radii) {
            for (level, book) in self.books.iter().enumerate() {
                for c in level_codes[level]
                    .iter_mut()
                    .take(1usize << (l - 1 - level))
                {
                    *c = reader.read(book.bits);
                }
            }
            blk[0] = f16::from_bits(r).to_f32() * norm;
            let mut width = 1usize;
            for level in (0..l).rev() {
                let book = &self.books[level];
                // Expand back to front so each radius is read before its slot is overwritten.
                for i in (0..width).rev() {
                    let (rad, k) = (blk[i], level_codes[level][i] as usize);
                    blk[2 * i] = rad * book.cos[k];
                    blk[2 * i + 1] = rad * book.sin[k];
                }
                width *= 2;
            }
        }
    }
}

/// A growable batch of PolarQuant codes: row-major angle codes, f16 block radii and f32 norms.
#[derive(Debug, Clone)]
pub struct PolarBatch {
    quantizer: Arc<PolarQuantizer>,
    codes: Vec<u8>,
    radii: Vec<u16>,
    norms: Vec<f32>,
}

impl PolarBatch {
    /// An empty batch.
    pub fn new(quantizer: Arc<PolarQuantizer>) -> Self {
        Self {
            quantizer,
            codes: Vec::new(),
            radii: Vec::new(),
            norms: Vec::new(),
        }
    }

    /// The quantizer.
    pub fn quantizer(&self) -> &Arc<PolarQuantizer> {
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

    /// Stored bytes per vector.
    pub fn bytes_per_vector(&self) -> usize {
        self.quantizer.bytes_per_vector()
    }

    /// Bytes held in memory: angle codes, f16 radii and norms.
    pub fn memory_bytes(&self) -> usize {
        self.codes.len() + 2 * self.radii.len() + 4 * self.norms.len()
    }

    /// Row-major angle codes (`len · code_bytes`).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// Block radii as f16 bit patterns (`len · blocks`).
    pub fn radii(&self) -> &[u16] {
        &self.radii
    }

    /// Norms.
    pub fn norms(&self) -> &[f32] {
        &self.norms
    }

    /// Assembles a batch from validated parts (deserialization).
    ///
    /// # Errors
    /// [`Error::ConfigMismatch`] when the lengths disagree.
    pub fn from_parts(
        quantizer: Arc<PolarQuantizer>,
        codes: Vec<u8>,
        radii: Vec<u16>,
        norms: Vec<f32>,
    ) -> Result<Self> {
        let n = norms.len();
        let rb = quantizer.dim() / quantizer.config.block();
        if codes.len() != n * quantizer.code_bytes || radii.len() != n * rb {
            return Err(Error::ConfigMismatch(
                "polar batch parts disagree in length".into(),
            ));
        }
        Ok(Self {
            quantizer,
            codes,
            radii,
            norms,
        })
    }

    fn blocks_per_row(&self) -> usize {
        self.quantizer.dim() / self.quantizer.config.block()
    }

    /// Appends row-major vectors (in parallel).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`] (nothing appended then).
    pub fn extend(&mut self, xs: &[f32]) -> Result<()> {
        let d = self.quantizer.dim();
        let n = check_batch(xs, d)?;
        let (cb, rb) = (self.quantizer.code_bytes, self.blocks_per_row());
        let start = self.len();
        self.codes.resize((start + n) * cb, 0);
        self.radii.resize((start + n) * rb, 0);
        self.norms.resize(start + n, 0.0);
        let q = &*self.quantizer;
        self.codes[start * cb..]
            .par_chunks_mut(cb.max(1))
            .zip(self.radii[start * rb..].par_chunks_mut(rb))
            .zip(self.norms[start..].par_iter_mut())
            .zip(xs.par_chunks(d))
            .for_each_init(Vec::new, |y, (((c, r), n), x)| {
                *n = q.encode_row(x, c, r, y)
            });
        Ok(())
    }

    fn decode_row_rotated(&self, i: usize, out: &mut [f32]) {
        let (cb, rb) = (self.quantizer.code_bytes, self.blocks_per_row());
        self.quantizer.decode_rotated(
            &self.codes[i * cb..(i + 1) * cb],
            &self.radii[i * rb..(i + 1) * rb],
            self.norms[i],
            out,
        );
    }

    /// Decodes row `i` (`d` values).
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
        check_dim(out, self.quantizer.dim())?;
        let mut y = vec![0.0f32; self.quantizer.dim()];
        self.decode_row_rotated(i, &mut y);
        self.quantizer.rotation.apply_inverse_unchecked(&y, out);
        Ok(())
    }

    /// Keeps the first `n` rows.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.codes.truncate(n * self.quantizer.code_bytes);
            self.radii.truncate(n * self.blocks_per_row());
            self.norms.truncate(n);
        }
    }

    /// `out = Σ_i weights[i] · x̃_i`: rows decoded in the rotated domain, summed, rotated back once.
    /// O(n · d).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` unless `weights.len() == len`; [`Error::DimMismatch`] for `out`.
    pub fn weighted_sum(&self, weights: &[f32], out: &mut [f32]) -> Result<()> {
        let d = self.quantizer.dim();
        check_len("weights", self.len(), weights.len())?;
        check_dim(out, d)?;
        let (mut acc, mut y) = (vec![0.0f32; d], vec![0.0f32; d]);
        for (i, &w) in weights.iter().enumerate() {
            if w != 0.0 {
                self.decode_row_rotated(i, &mut y);
                simd::axpy(w, &y, &mut acc);
            }
        }
        self.quantizer.rotation.apply_inverse_unchecked(&acc, out);
        Ok(())
    }

    /// Decodes every row.
    pub fn dequantize_all(&self) -> Vec<f32> {
        let d = self.quantizer.dim();
        let mut out = vec![0.0; self.len() * d];
        out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
            let _ = self.dequantize_row(i, o);
        });
        out
    }

    /// Inner-product estimates `⟨q, x̃_i⟩` for every row: `Π q` once, each row decoded in the
    /// rotated domain (parallel for large batches).
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`], `Core(LengthMismatch)` for `out`.
    pub fn score_into(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        let q = self.quantizer.prepare_query(q)?;
        self.score_query_into(&q, out)
    }

    /// As [`PolarBatch::score_into`] for a query prepared once (by [`PolarQuantizer::prepare_query`]).
    ///
    /// # Errors
    /// [`Error::DimMismatch`] for a query of another dimension, `Core(LengthMismatch)` for `out`.
    pub fn score_query_into(&self, q: &PolarQuery, out: &mut [f32]) -> Result<()> {
        let d = self.quantizer.dim();
        check_dim(&q.rotated, d)?;
        check_len("score output", self.len(), out.len())?;
        let rq = &q.rotated;
        let work = |(i, o): (usize, &mut f32), y: &mut Vec<f32>| {
            self.decode_row_rotated(i, y);
            *o = simd::dot(rq, y);
        };
        if score::split_rows(self.len()) {
            out.par_iter_mut()
                .enumerate()
                .for_each_init(|| vec![0.0f32; d], |y, p| work(p, y));
        } else {
            let mut y = vec![0.0f32; d];
            out.iter_mut().enumerate().for_each(|p| work(p, &mut y));
        }
        Ok(())
    }

    /// The `k` rows with the largest estimated inner product.
    ///
    /// # Errors
    /// As [`PolarBatch::score_into`].
    pub fn top_k(&self, q: &[f32], k: usize) -> Result<Vec<Hit>> {
        self.top_k_query(&self.quantizer.prepare_query(q)?, k)
    }

    /// As [`PolarBatch::top_k`] for a prepared query.
    ///
    /// # Errors
    /// As [`PolarBatch::score_query_into`].
    pub fn top_k_query(&self, q: &PolarQuery, k: usize) -> Result<Vec<Hit>> {
        let mut s = vec![0.0; self.len()];
        self.score_query_into(q, &mut s)?;
        let idx = score::top_candidates(&s, k);
        Ok(score::finish_hits(
            idx.into_iter()
                .map(|i| Hit {
                    index: i,
                    score: s[i],
                })
                .collect(),
            k,
        ))
    }
}

/// Bits per coordinate a configuration stores at dimension `d` (codes, radii and the norm).
pub fn bits_per_coordinate(config: &PolarConfig) -> f64 {
    let b = config.block();
    (config.code_bits_per_block() as f64 + 16.0) / b as f64 + 32.0 / config.dim as f64
}
