//! The QJL sketch (arXiv 2406.03482): one sign bit per row of a random projection.
//!
//! A key `k` is stored as `sign(S k)` (`m` bits, bit `j` is 1 when `(S k)_j >= 0`) and `‖k‖`. For a
//! query `q` the asymmetric estimator `sqrt(π/2)/m · ‖k‖ · ⟨S q, sign(S k)⟩` is unbiased for `⟨q, k⟩`
//! when `S` has i.i.d. standard Gaussian entries (for each row `s`, `E[⟨s,q⟩ sign⟨s,k⟩] =
//! sqrt(2/π) ⟨q, k/‖k‖⟩`). With [`SketchKind::Orthogonal`] each block of `d` rows is a Haar
//! orthogonal matrix scaled by `sqrt(d)`: every row is still a Gaussian-like direction of the same
//! norm distribution in expectation, the estimator stays unbiased and its variance drops because the
//! rows are not redundant.
//!
//! **Baked into stored codes:** `S` is drawn from the seed's
//! [`QJL`](tq_core::rng::stream::QJL) stream, row-major (Gaussian) or as successive orthogonal
//! blocks (Orthogonal), and the sign bits are packed LSB-first as 1-bit codes.

use ndarray::{ArrayView2, ArrayViewMut2, linalg::general_mat_mul};
use std::sync::Arc;

use tq_core::shared::WeakCache;
use tq_core::{SeededRng, bitpack, rng::stream, rotation::orthonormal_rows, simd};

use crate::Result;
use crate::config::{QjlConfig, SketchKind};
use crate::error::{check_dim, check_finite, check_len};

/// `sqrt(π/2)`, the QJL de-biasing constant.
pub const SQRT_PI_OVER_2: f32 = 1.253_314_1;

/// A seeded QJL sketch `x ↦ sign(S x)` with `S` of shape `m × d`.
#[derive(Debug, Clone)]
pub struct QjlSketch {
    config: QjlConfig,
    /// Row-major `m × d`, shared by every sketch of the same configuration.
    matrix: Arc<[f32]>,
}

impl QjlSketch {
    /// Draws `S` for `config`: O(m·d) for Gaussian, O(m·d²) for Orthogonal, the first time a
    /// configuration is asked for while no sketch of it is alive; O(1) after that (the matrix is
    /// shared, [`tq_core::shared::WeakCache`]).
    ///
    /// # Errors
    /// See [`QjlConfig::validate`].
    pub fn new(config: QjlConfig) -> Result<Self> {
        config.validate()?;
        static CACHE: WeakCache<QjlConfig> = WeakCache::new();
        let matrix = CACHE.get_or_build(&config, || {
            let (m, d) = (config.sketch_dim, config.dim);
            let mut rng = SeededRng::new(config.seed, stream::QJL);
            match config.sketch {
                SketchKind::Gaussian => (0..m * d).map(|_| rng.gaussian() as f32).collect(),
                SketchKind::Orthogonal => {
                    let scale = (d as f32).sqrt();
                    let mut rows = Vec::with_capacity(m.div_ceil(d) * d * d);
                    while rows.len() < m * d {
                        rows.extend(orthonormal_rows(&mut rng, d).into_iter().map(|v| v * scale));
                    }
                    rows.truncate(m * d);
                    rows
                }
            }
        });
        Ok(Self { config, matrix })
    }

    /// The configuration.
    pub fn config(&self) -> &QjlConfig {
        &self.config
    }

    /// Input dimension `d`.
    pub fn dim(&self) -> usize {
        self.config.dim
    }

    /// Sketch size `m`.
    pub fn sketch_dim(&self) -> usize {
        self.config.sketch_dim
    }

    /// Bytes of packed signs per vector: `ceil(m / 8)`.
    pub fn sign_bytes(&self) -> usize {
        bitpack::packed_len(self.config.sketch_dim, 1)
    }

    /// The matrix `S`, row-major `m × d`.
    pub fn matrix(&self) -> &[f32] {
        &self.matrix
    }

    /// `out = S x` without checks (`x.len() == d`, `out.len() == m`). O(m·d).
    pub(crate) fn project_unchecked(&self, x: &[f32], out: &mut [f32]) {
        for (o, row) in out
            .iter_mut()
            .zip(self.matrix.chunks_exact(self.config.dim))
        {
            *o = simd::dot(row, x);
        }
    }

    /// `out[i] = S xs[i]` for `n` row-major vectors, as one matrix product. Lengths are trusted
    /// (`xs.len() == n·d`, `out.len() == n·m`).
    pub(crate) fn project_batch_unchecked(&self, xs: &[f32], out: &mut [f32]) {
        let (m, d) = (self.config.sketch_dim, self.config.dim);
        let n = xs.len() / d;
        let (Ok(x), Ok(s), Ok(mut y)) = (
            ArrayView2::from_shape((n, d), xs),
            ArrayView2::from_shape((m, d), &self.matrix[..]),
            ArrayViewMut2::from_shape((n, m), out),
        ) else {
            debug_assert!(false, "project_batch_unchecked: shapes");
            return;
        };
        general_mat_mul(1.0, &x, &s.t(), 0.0, &mut y);
    }

    /// Packs the signs of a projection (`bit j = proj[j] >= 0`) into `out` (`ceil(m/8)` bytes).
    pub(crate) fn pack_signs(proj: &[f32], out: &mut [u8]) {
        out.fill(0);
        let mut chunks = proj.chunks_exact(8);
        for (o, c) in out.iter_mut().zip(&mut chunks) {
            let mut byte = 0u8;
            for (k, &v) in c.iter().enumerate() {
                byte |= ((v >= 0.0) as u8) << k;
            }
            *o = byte;
        }
        let full = proj.len() / 8;
        for (k, &v) in chunks.remainder().iter().enumerate() {
            out[full] |= ((v >= 0.0) as u8) << k;
        }
    }

    /// Sketches `k`: writes `sign(S k)` packed into `signs` and returns `‖k‖`.
    ///
    /// # Errors
    /// [`Error::DimMismatch`](crate::Error::DimMismatch) / [`Error::NonFinite`](crate::Error::NonFinite) for a bad `k`, `Core(LengthMismatch)` for a
    /// `signs` buffer that is not [`QjlSketch::sign_bytes`] long.
    pub fn sketch_into(&self, k: &[f32], signs: &mut [u8]) -> Result<f32> {
        check_dim(k, self.dim())?;
        check_finite(k)?;
        check_len("QJL signs", self.sign_bytes(), signs.len())?;
        let mut proj = vec![0.0; self.sketch_dim()];
        self.project_unchecked(k, &mut proj);
        Self::pack_signs(&proj, signs);
        Ok(simd::sum_squares_fixed(k).sqrt())
    }

    /// Sketches `k`, returning the packed signs and `‖k‖`.
    ///
    /// # Errors
    /// As [`QjlSketch::sketch_into`].
    pub fn sketch(&self, k: &[f32]) -> Result<(Vec<u8>, f32)> {
        let mut signs = vec![0u8; self.sign_bytes()];
        let norm = self.sketch_into(k, &mut signs)?;
        Ok((signs, norm))
    }

    /// Projects a query once: `S q` (length `m`), the input of [`QjlSketch::estimate`].
    ///
    /// # Errors
    /// [`Error::DimMismatch`](crate::Error::DimMismatch), [`Error::NonFinite`](crate::Error::NonFinite).
    pub fn prepare_query(&self, q: &[f32]) -> Result<Vec<f32>> {
        check_dim(q, self.dim())?;
        check_finite(q)?;
        let mut out = vec![0.0; self.sketch_dim()];
        self.project_unchecked(q, &mut out);
        Ok(out)
    }

    /// The unbiased estimate `sqrt(π/2)/m · norm · ⟨S q, ±1⟩` of `⟨q, k⟩` from a prepared query
    /// (`S q`) and a stored sketch. O(m).
    ///
    /// # Errors
    /// `Core(LengthMismatch)` when `projected_query` is not `m` long or `signs` not `ceil(m/8)`.
    pub fn estimate(&self, projected_query: &[f32], signs: &[u8], norm: f32) -> Result<f32> {
        let m = self.sketch_dim();
        check_len("projected query", m, projected_query.len())?;
        check_len("QJL signs", self.sign_bytes(), signs.len())?;
        Ok(SQRT_PI_OVER_2 / m as f32 * norm * signed_sum(projected_query, signs))
    }
}

/// `Σ_j v_j · (2·bit_j - 1)` for packed sign bits. O(len).
pub(crate) fn signed_sum(v: &[f32], signs: &[u8]) -> f32 {
    let mut s = 0.0f32;
    for (j, &x) in v.iter().enumerate() {
        let bit = (signs[j / 8] >> (j % 8)) & 1;
        s += if bit == 1 { x } else { -x };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn unit(d: usize, seed: u64) -> Vec<f32> {
        let mut r = SeededRng::new(seed, stream::DATA);
        let v: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
        let n = simd::dot_scalar(&v, &v).sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// Unbiasedness of the QJL estimator over independent sketches (seeds). For unit q, k the
    /// per-sketch variance is at most (π/2 - ⟨q,k⟩²)/m (Gaussian S), so the standard error of the
    /// mean over T trials is sqrt(π/(2 m T)); the test allows 4 standard errors.
    #[test]
    fn estimator_is_unbiased_for_any_m() {
        let d = 64;
        let (q, k) = (unit(d, 1), unit(d, 2));
        let truth = simd::dot_scalar(&q, &k);
        for m in [16usize, 64, 200] {
            for kind in [SketchKind::Gaussian, SketchKind::Orthogonal] {
                let trials = 1500;
                let mut sum = 0.0f64;
                for t in 0..trials {
                    let s = QjlSketch::new(QjlConfig {
                        dim: d,
                        sketch_dim: m,
                        sketch: kind,
                        seed: t,
                    })
                    .unwrap();
                    let (signs, norm) = s.sketch(&k).unwrap();
                    let sq = s.prepare_query(&q).unwrap();
                    sum += s.estimate(&sq, &signs, norm).unwrap() as f64;
                }
                let mean = sum / trials as f64;
                let se = (std::f64::consts::PI / (2.0 * m as f64 * trials as f64)).sqrt();
                assert!(
                    (mean - truth as f64).abs() < 4.0 * se,
                    "m={m} {kind:?} mean {mean} truth {truth}"
                );
            }
        }
    }

    #[test]
    fn errors_are_typed() {
        let bad = QjlConfig {
            dim: 8,
            sketch_dim: 0,
            sketch: SketchKind::Gaussian,
            seed: 0,
        };
        assert!(matches!(
            QjlSketch::new(bad),
            Err(Error::SketchSizeOutOfRange { .. })
        ));
        let s = QjlSketch::new(QjlConfig {
            dim: 8,
            sketch_dim: 12,
            sketch: SketchKind::Gaussian,
            seed: 0,
        })
        .unwrap();
        assert!(matches!(
            s.sketch(&[0.0; 7]),
            Err(Error::DimMismatch {
                expected: 8,
                got: 7
            })
        ));
        let mut v = [0.0f32; 8];
        v[3] = f32::NAN;
        assert!(matches!(
            s.sketch(&v),
            Err(Error::NonFinite { index: 3, .. })
        ));
        assert_eq!(s.sign_bytes(), 2);
    }
}
