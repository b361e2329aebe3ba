//! `TurboQuant_prod`: unbiased inner products from `b - 1` bits of MSE codes plus a 1-bit QJL sketch
//! of the residual.
//!
//! A vector `x` is stored as `‖x‖`, the `(b-1)`-bit MSE codes of `y = Π x/‖x‖`, the residual norm
//! `γ = ‖y - ỹ‖` and the signs of `S (y - ỹ)` with `S` an `m × d` QJL matrix, `m = d`. The inner
//! product estimate is `‖x‖ · (⟨Π q, ỹ⟩ + γ · sqrt(π/2)/m · ⟨S Π q, sign(S r)⟩)`. The sketch acts on
//! the residual in the rotated domain: `S Π` has the same law as the paper's `S` (Gaussian, or
//! orthogonal rows), so the estimator is the paper's while quantization never rotates back.
//! For `b = 1` there are no MSE codes and the sketch is applied to `x/‖x‖` itself (pure QJL).
//!
//! Row layout: `ceil(d(b-1)/8)` code bytes, `ceil(d/8)` sign bytes, two f32 scalars (`‖x‖`, `γ`).

use std::sync::Arc;

use rayon::prelude::*;
use tq_core::scan::{self, BLOCK};
use tq_core::simd;

use crate::config::{MseConfig, ProdConfig, QjlConfig};
use crate::error::{check_batch, check_dim, check_finite, check_len};
use crate::mse::{MseQuantizer, MseQuery, Scratch};
use crate::packed::PackedRows;
use crate::qjl::{QjlSketch, SQRT_PI_OVER_2, signed_sum};
use crate::score::{self, Hit, Tables};
use crate::{Error, Result};

/// A `TurboQuant_prod` quantizer.
#[derive(Debug, Clone)]
pub struct ProdQuantizer {
    config: ProdConfig,
    mse: Option<MseQuantizer>,
    qjl: QjlSketch,
}

impl ProdQuantizer {
    /// Builds the quantizer: an MSE quantizer at `bits - 1` (none at `bits = 1`) and the QJL matrix,
    /// both regenerated from the seed (independent streams).
    ///
    /// # Errors
    /// See [`ProdConfig::validate`].
    pub fn new(config: ProdConfig) -> Result<Self> {
        config.validate()?;
        let mse = if config.bits > 1 {
            Some(MseQuantizer::new(MseConfig::new(
                config.dim,
                config.bits - 1,
                config.rotation,
                config.seed,
            ))?)
        } else {
            None
        };
        let qjl = QjlSketch::new(QjlConfig {
            dim: config.dim,
            sketch_dim: config.dim,
            sketch: config.sketch,
            seed: config.seed,
        })?;
        Ok(Self { config, mse, qjl })
    }

    /// The configuration.
    pub fn config(&self) -> &ProdConfig {
        &self.config
    }

    /// Dimension `d`.
    pub fn dim(&self) -> usize {
        self.config.dim
    }

    /// Total bits per coordinate.
    pub fn bits(&self) -> u32 {
        self.config.bits
    }

    /// The `(b-1)`-bit MSE stage (`None` at `b = 1`).
    pub fn mse(&self) -> Option<&MseQuantizer> {
        self.mse.as_ref()
    }

    /// The QJL stage.
    pub fn qjl(&self) -> &QjlSketch {
        &self.qjl
    }

    /// MSE code bytes per vector, `ceil(d(b-1)/8)`.
    pub fn code_bytes(&self) -> usize {
        self.mse.as_ref().map_or(0, |m| m.row_bytes())
    }

    /// Sign bytes per vector, `ceil(d/8)`.
    pub fn sign_bytes(&self) -> usize {
        self.qjl.sign_bytes()
    }

    /// Stored bytes per vector: codes, signs, norm and residual norm.
    pub fn bytes_per_vector(&self) -> usize {
        self.code_bytes() + self.sign_bytes() + 8
    }

    /// The scale `sqrt(π/2)/m` of the sign term.
    fn sign_scale(&self) -> f32 {
        SQRT_PI_OVER_2 / self.qjl.sketch_dim() as f32
    }

    /// Encodes up to 32 trusted rows into slot `first_slot..` of a code block (if any) and a sign
    /// block, writing norms and residual norms.
    fn encode_block(&self, xs: &[f32], first_slot: usize, out: BlockOut<'_>, s: &mut Scratch) {
        let BlockOut {
            codes: code_block,
            signs: sign_block,
            norms,
            gammas,
        } = out;
        let d = self.dim();
        let n = xs.len() / d;
        s.ys.resize(n * d, 0.0);
        match (&self.mse, code_block) {
            (Some(mse), Some(block)) => {
                let rb = mse.row_bytes();
                s.codes.resize(d, 0);
                s.packed.resize(n * rb, 0);
                mse.rotate_unit(xs, &mut s.ys, norms);
                let c = mse.codebook().centroids();
                for (y, p) in s.ys.chunks_exact_mut(d).zip(s.packed.chunks_exact_mut(rb)) {
                    mse.code_row(y, &mut s.codes, p);
                    for (v, &code) in y.iter_mut().zip(s.codes.iter()) {
                        *v -= c[code as usize];
                    }
                }
                scan::write_rows(&s.packed, rb, block, first_slot);
            }
            _ => {
                s.ys.copy_from_slice(xs);
                for (y, n) in s.ys.chunks_exact_mut(d).zip(norms.iter_mut()) {
                    let norm = simd::sum_squares_fixed(y).sqrt();
                    *n = norm;
                    if norm > 0.0 {
                        simd::scale_in_place(y, 1.0 / norm);
                    }
                }
            }
        }
        for (r, g) in s.ys.chunks_exact(d).zip(gammas.iter_mut()) {
            *g = simd::sum_squares_fixed(r).sqrt();
        }
        let m = self.qjl.sketch_dim();
        let sb = self.sign_bytes();
        let mut proj = vec![0.0f32; n * m];
        self.qjl.project_batch_unchecked(&s.ys, &mut proj);
        let mut signs = vec![0u8; n * sb];
        for (p, out) in proj.chunks_exact(m).zip(signs.chunks_exact_mut(sb)) {
            QjlSketch::pack_signs(p, out);
        }
        scan::write_rows(&signs, sb, sign_block, first_slot);
    }

    /// Prepares a query: `Π q` and its MSE tables, `S Π q` and its sign tables. O(d² ) for the sketch.
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`].
    pub fn prepare_query(&self, q: &[f32]) -> Result<ProdQuery> {
        check_dim(q, self.dim())?;
        check_finite(q)?;
        let (mse, rotated) = match &self.mse {
            Some(m) => {
                let mq = m.prepare_query(q)?;
                let r = mq.rotated().to_vec();
                (Some(mq), r)
            }
            None => (None, q.to_vec()),
        };
        let mut sq = vec![0.0; self.qjl.sketch_dim()];
        self.qjl.project_unchecked(&rotated, &mut sq);
        let tables = Tables::new(
            score::TableKind::Nibble,
            score::nibble_tables(&sq, &[-1.0, 1.0], 1, 2 * self.sign_bytes()),
        );
        Ok(ProdQuery {
            mse,
            sq,
            tables,
            scale: self.sign_scale(),
        })
    }

    /// Decodes one vector from its parts: `‖x‖ · Πᵀ(ỹ + γ·sqrt(π/2)/m · Sᵀ sign)`.
    fn decode(&self, codes: &[u8], signs: &[u8], norm: f32, gamma: f32, out: &mut [f32]) {
        let d = self.dim();
        let mut y = vec![0.0f32; d];
        if let Some(m) = &self.mse {
            let mut scratch = vec![0u8; d];
            m.decode_rotated(codes, &mut scratch, &mut y);
        }
        let w = gamma * self.sign_scale();
        for (j, row) in self.qjl.matrix().chunks_exact(d).enumerate() {
            let s = if (signs[j / 8] >> (j % 8)) & 1 == 1 {
                w
            } else {
                -w
            };
            for (v, &a) in y.iter_mut().zip(row) {
                *v += s * a;
            }
        }
        match &self.mse {
            Some(m) => m.rotation().apply_inverse_unchecked(&y, out),
            None => out.copy_from_slice(&y),
        }
        simd::scale_in_place(out, norm);
    }
}

/// The destinations of one encoded block: code block (if any), sign block, norms, residual norms.
struct BlockOut<'a> {
    codes: Option<&'a mut [u8]>,
    signs: &'a mut [u8],
    norms: &'a mut [f32],
    gammas: &'a mut [f32],
}

/// A query prepared for one [`ProdQuantizer`].
#[derive(Debug, Clone)]
pub struct ProdQuery {
    mse: Option<MseQuery>,
    sq: Vec<f32>,
    tables: Tables,
    scale: f32,
}

impl ProdQuery {
    /// The projected query `S Π q`.
    pub fn projected(&self) -> &[f32] {
        &self.sq
    }
}

/// A growable batch of `TurboQuant_prod` codes: MSE codes and sign bits in the 32-row block layout,
/// norms and residual norms. Bytes per vector: `ceil(d(b-1)/8) + ceil(d/8) + 8`.
#[derive(Debug, Clone)]
pub struct ProdBatch {
    quantizer: Arc<ProdQuantizer>,
    codes: Option<PackedRows>,
    signs: PackedRows,
    norms: Vec<f32>,
    residual_norms: Vec<f32>,
}

impl ProdBatch {
    /// An empty batch.
    pub fn new(quantizer: Arc<ProdQuantizer>) -> Self {
        let codes = quantizer.mse().map(|m| PackedRows::new(m.row_bytes()));
        let signs = PackedRows::new(quantizer.sign_bytes());
        Self {
            quantizer,
            codes,
            signs,
            norms: Vec::new(),
            residual_norms: Vec::new(),
        }
    }

    /// Assembles a batch from parts (deserialization).
    ///
    /// # Errors
    /// [`Error::ConfigMismatch`] when the parts disagree.
    pub fn from_parts(
        quantizer: Arc<ProdQuantizer>,
        codes: Option<PackedRows>,
        signs: PackedRows,
        norms: Vec<f32>,
        residual_norms: Vec<f32>,
    ) -> Result<Self> {
        let n = norms.len();
        let codes_ok = match (&codes, quantizer.mse()) {
            (Some(c), Some(m)) => c.row_bytes() == m.row_bytes() && c.len() == n,
            (None, None) => true,
            _ => false,
        };
        if !codes_ok
            || signs.row_bytes() != quantizer.sign_bytes()
            || signs.len() != n
            || residual_norms.len() != n
        {
            return Err(Error::ConfigMismatch(
                "prod batch parts disagree in length or row size".into(),
            ));
        }
        Ok(Self {
            quantizer,
            codes,
            signs,
            norms,
            residual_norms,
        })
    }

    /// The quantizer.
    pub fn quantizer(&self) -> &Arc<ProdQuantizer> {
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

    /// The MSE codes (`None` at `b = 1`).
    pub fn codes(&self) -> Option<&PackedRows> {
        self.codes.as_ref()
    }

    /// The QJL sign bits.
    pub fn signs(&self) -> &PackedRows {
        &self.signs
    }

    /// Norms `‖x‖`.
    pub fn norms(&self) -> &[f32] {
        &self.norms
    }

    /// Residual norms `γ` (of the unit vector's residual).
    pub fn residual_norms(&self) -> &[f32] {
        &self.residual_norms
    }

    /// Exact stored bytes per vector.
    pub fn bytes_per_vector(&self) -> usize {
        self.quantizer.bytes_per_vector()
    }

    /// Bytes held in memory (with block padding).
    pub fn memory_bytes(&self) -> usize {
        self.codes.as_ref().map_or(0, |c| c.memory_bytes())
            + self.signs.memory_bytes()
            + 8 * self.len()
    }

    /// Appends one vector.
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`].
    pub fn push(&mut self, x: &[f32]) -> Result<()> {
        check_dim(x, self.quantizer.dim())?;
        self.extend(x)
    }

    /// Appends `xs.len() / d` row-major vectors, whole blocks in parallel.
    ///
    /// # Errors
    /// [`Error::DimMismatch`], [`Error::NonFinite`] (nothing is appended then).
    pub fn extend(&mut self, xs: &[f32]) -> Result<()> {
        let d = self.quantizer.dim();
        let n = check_batch(xs, d)?;
        let start = self.len();
        let total = start + n;
        if let Some(c) = &mut self.codes {
            c.resize_rows(total);
        }
        self.signs.resize_rows(total);
        self.norms.resize(total, 0.0);
        self.residual_norms.resize(total, 0.0);
        let q = &*self.quantizer;
        let head = ((BLOCK - start % BLOCK) % BLOCK).min(n);
        if head > 0 {
            let b = start / BLOCK;
            let mut s = Scratch::default();
            let cb = self.codes.as_mut().map(|c| c.block_mut(b));
            let out = BlockOut {
                codes: cb,
                signs: self.signs.block_mut(b),
                norms: &mut self.norms[start..start + head],
                gammas: &mut self.residual_norms[start..start + head],
            };
            q.encode_block(&xs[..head * d], start % BLOCK, out, &mut s);
        }
        let fb = (start + head) / BLOCK;
        let sbb = scan::block_bytes(q.sign_bytes());
        let cbb = scan::block_bytes(q.code_bytes().max(1));
        let sign_blocks = self.signs.blocks_mut_from(fb).chunks_mut(sbb);
        let code_blocks: Vec<Option<&mut [u8]>> = match &mut self.codes {
            Some(c) => c.blocks_mut_from(fb).chunks_mut(cbb).map(Some).collect(),
            None => (0..sign_blocks.len()).map(|_| None).collect(),
        };
        let jobs: Vec<_> = code_blocks
            .into_iter()
            .zip(sign_blocks)
            .zip(xs[head * d..].chunks(BLOCK * d))
            .zip(self.norms[start + head..].chunks_mut(BLOCK))
            .zip(self.residual_norms[start + head..].chunks_mut(BLOCK))
            .collect();
        jobs.into_par_iter()
            .for_each_init(Scratch::default, |s, ((((cb, sb), x), nr), g)| {
                q.encode_block(
                    x,
                    0,
                    BlockOut {
                        codes: cb,
                        signs: sb,
                        norms: nr,
                        gammas: g,
                    },
                    s,
                )
            });
        Ok(())
    }

    /// Keeps the first `n` rows.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            if let Some(c) = &mut self.codes {
                c.resize_rows(n);
            }
            self.signs.resize_rows(n);
            self.norms.truncate(n);
            self.residual_norms.truncate(n);
        }
    }

    /// Decodes row `i` (`‖x‖ Πᵀ(ỹ + γ sqrt(π/2)/m Sᵀ sign)`, the paper's `DeQuant_prod`).
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
        let mut codes = vec![0u8; self.quantizer.code_bytes()];
        if let Some(c) = &self.codes {
            c.read_row(i, &mut codes);
        }
        let mut signs = vec![0u8; self.quantizer.sign_bytes()];
        self.signs.read_row(i, &mut signs);
        self.quantizer
            .decode(&codes, &signs, self.norms[i], self.residual_norms[i], out);
        Ok(())
    }

    fn check_out(&self, out: &[f32]) -> Result<()> {
        check_len("score output", self.len(), out.len())?;
        Ok(())
    }

    fn score_blocks(&self, query: &ProdQuery, out: &mut [f32], fast: bool) {
        let bits = self.quantizer.mse().map_or(0, |m| m.bits());
        score::for_each_block(out, |b, o| {
            let mut mse = [0.0f32; BLOCK];
            if let (Some(mq), Some(codes)) = (&query.mse, &self.codes) {
                if fast {
                    mq.block_dots_fast(codes, b, bits, &mut mse[..o.len()]);
                } else {
                    mq.block_dots_exact(codes, b, bits, &mut mse[..o.len()]);
                }
            }
            let mut sign = [0.0f32; BLOCK];
            if fast {
                query.tables.block_fast(self.signs.block(b), &mut sign);
            } else {
                query.tables.block_exact(self.signs.block(b), &mut sign);
            }
            let base = b * BLOCK;
            for (k, v) in o.iter_mut().enumerate() {
                *v = self.norms[base + k]
                    * (mse[k] + query.scale * self.residual_norms[base + k] * sign[k]);
            }
        });
    }

    /// Unbiased inner-product estimates for every row through the `u8` tables (fast path).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `out.len() != len`.
    pub fn score_into(&self, query: &ProdQuery, out: &mut [f32]) -> Result<()> {
        self.check_out(out)?;
        self.score_blocks(query, out, true);
        Ok(())
    }

    /// As [`ProdBatch::score_into`] with the exact `f32` tables.
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `out.len() != len`.
    pub fn score_exact_into(&self, query: &ProdQuery, out: &mut [f32]) -> Result<()> {
        self.check_out(out)?;
        self.score_blocks(query, out, false);
        Ok(())
    }

    /// Exact estimate for one row.
    fn row_score_exact(
        &self,
        query: &ProdQuery,
        i: usize,
        packed: &mut [u8],
        codes: &mut [u8],
        signs: &mut [u8],
    ) -> f32 {
        let mut mse = 0.0;
        if let (Some(mq), Some(c), Some(m)) = (&query.mse, &self.codes, self.quantizer.mse()) {
            c.read_row(i, packed);
            mse = mq.row_dot(packed, m.bits(), codes);
        }
        self.signs.read_row(i, signs);
        self.norms[i] * (mse + query.scale * self.residual_norms[i] * signed_sum(&query.sq, signs))
    }

    /// The `k` best rows: fast scores, then the best `max(4k, k+32)` re-scored exactly.
    pub fn top_k(&self, query: &ProdQuery, k: usize) -> Vec<Hit> {
        let mut scores = vec![0.0; self.len()];
        self.score_blocks(query, &mut scores, true);
        let cand = score::top_candidates(&scores, score::rerank_candidates(k));
        let mut packed = vec![0u8; self.quantizer.code_bytes()];
        let mut codes = vec![0u8; self.quantizer.dim()];
        let mut signs = vec![0u8; self.quantizer.sign_bytes()];
        let hits = cand
            .into_iter()
            .map(|i| Hit {
                index: i,
                score: self.row_score_exact(query, i, &mut packed, &mut codes, &mut signs),
            })
            .collect();
        score::finish_hits(hits, k)
    }

    /// The exact top-k over all rows.
    pub fn top_k_exact(&self, query: &ProdQuery, k: usize) -> Vec<Hit> {
        let mut scores = vec![0.0; self.len()];
        self.score_blocks(query, &mut scores, false);
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
