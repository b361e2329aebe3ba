//! Seeded random rotations: dense Haar and randomized Hadamard.
//!
//! **Dense Haar.** `d × d` standard Gaussians are drawn row by row from the seed's
//! [`stream::HAAR`](crate::rng::stream::HAAR) stream (f64), and the rows are orthonormalised in
//! order by classical Gram-Schmidt with one re-orthogonalisation pass (CGS2). This is the `Q` factor
//! of the QR decomposition of the transposed Gaussian matrix with the signs of `diag(R)` made
//! positive, hence exactly Haar-distributed. The rotation is `Π` with those rows (`y = Π x`), stored
//! as f32. Apply costs O(d²) per vector; the batch path is one matrix product (`matrixmultiply`
//! through ndarray).
//!
//! **Randomized Hadamard.** [`HADAMARD_ROUNDS`] rounds, each `x ← H_blocks · P · D x` with `D` a
//! random ±1 diagonal and, when `d` is not a power of two, `P` a random permutation. Let `p` be the
//! largest power of two `<= d`. `H_blocks` applies the normalised Walsh-Hadamard transform to the
//! first `p` coordinates and then, if `p < d`, to the last `p` coordinates (the two blocks overlap,
//! so every coordinate is mixed and nothing is padded: a row still has exactly `d` coordinates).
//! Every step is orthogonal, so the whole map is exactly orthogonal; apply costs O(d log d).
//! Three rounds make structured inputs (one-hot, constant and Walsh vectors, for which one round
//! leaves every coordinate at exactly `±1/sqrt(d)`) behave like random ones; the tests measure it.
//!
//! **Baked into stored codes:** the stream tags, the draw order (Haar: row-major Gaussians;
//! Hadamard: per round, `d` signs then the permutation), the block rule and the round count.

use ndarray::{ArrayView2, ArrayViewMut2, linalg::general_mat_mul};
use serde::{Deserialize, Serialize};

use crate::rng::{SeededRng, stream};
use crate::simd;
use crate::{Error, Result};

/// Rounds of the randomized Hadamard rotation.
pub const HADAMARD_ROUNDS: usize = 3;

/// Which random rotation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RotationKind {
    /// Dense Haar-distributed orthogonal matrix: exact theory, O(d²) per vector.
    Haar,
    /// Randomized Hadamard transform (signs, permutations, overlapping power-of-two blocks):
    /// O(d log d) per vector.
    #[default]
    Hadamard,
}

impl RotationKind {
    /// Lower-case name, as used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            RotationKind::Haar => "haar",
            RotationKind::Hadamard => "hadamard",
        }
    }
}

impl std::str::FromStr for RotationKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "haar" => Ok(Self::Haar),
            "hadamard" => Ok(Self::Hadamard),
            other => Err(format!(
                "unknown rotation '{other}' (expected haar or hadamard)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
struct Round {
    signs: Vec<f32>,
    /// `perm[i]` is the source index of output `i`; empty when `d` is a power of two.
    perm: Vec<u32>,
}

#[derive(Debug, Clone)]
enum Inner {
    /// Row-major `d × d`, `y = M x`.
    Dense(Vec<f32>),
    Hadamard {
        block: usize,
        rounds: Vec<Round>,
    },
}

/// A seeded orthogonal map `Π` of `R^d` (see the module docs for the constructions).
#[derive(Debug, Clone)]
pub struct Rotation {
    dim: usize,
    seed: u64,
    kind: RotationKind,
    inner: Inner,
}

impl Rotation {
    /// Builds the rotation of kind `kind` for dimension `dim` from `seed`. Deterministic on every
    /// platform. Cost: Haar O(d³) (about 1 s at d = 1536), Hadamard O(d).
    ///
    /// # Errors
    /// [`Error::DimTooSmall`] for `dim < 2`.
    pub fn new(kind: RotationKind, dim: usize, seed: u64) -> Result<Self> {
        if dim < 2 {
            return Err(Error::DimTooSmall { dim, min: 2 });
        }
        let inner = match kind {
            RotationKind::Haar => Inner::Dense(haar_matrix(dim, seed)),
            RotationKind::Hadamard => {
                let block = 1usize << (usize::BITS - 1 - dim.leading_zeros());
                let mut rng = SeededRng::new(seed, stream::HADAMARD);
                let rounds = (0..HADAMARD_ROUNDS)
                    .map(|_| {
                        let signs = (0..dim).map(|_| rng.sign()).collect();
                        let perm = if block < dim {
                            rng.permutation(dim)
                        } else {
                            Vec::new()
                        };
                        Round { signs, perm }
                    })
                    .collect();
                Inner::Hadamard { block, rounds }
            }
        };
        Ok(Self {
            dim,
            seed,
            kind,
            inner,
        })
    }

    /// The dimension `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The seed it was built from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The construction.
    pub fn kind(&self) -> RotationKind {
        self.kind
    }

    /// The dense matrix (row-major, `y = M x`) for Haar rotations, `None` for Hadamard.
    pub fn dense_matrix(&self) -> Option<&[f32]> {
        match &self.inner {
            Inner::Dense(m) => Some(m),
            Inner::Hadamard { .. } => None,
        }
    }

    fn check(&self, what: &'static str, len: usize, expected: usize) -> Result<()> {
        if len != expected {
            return Err(Error::LengthMismatch {
                what,
                expected,
                got: len,
            });
        }
        Ok(())
    }

    /// `out = Π x`. O(d²) for Haar, O(d log d) for Hadamard; no allocation.
    ///
    /// # Errors
    /// [`Error::DimMismatch`] if `x` or `out` is not of length `d`.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        if x.len() != self.dim || out.len() != self.dim {
            return Err(Error::DimMismatch {
                expected: self.dim,
                got: x.len().min(out.len()),
            });
        }
        self.apply_unchecked(x, out);
        Ok(())
    }

    /// [`Rotation::apply`] without the length checks (they are `debug_assert!`s).
    pub fn apply_unchecked(&self, x: &[f32], out: &mut [f32]) {
        debug_assert!(x.len() == self.dim && out.len() == self.dim);
        match &self.inner {
            Inner::Dense(m) => {
                for (o, row) in out.iter_mut().zip(m.chunks_exact(self.dim)) {
                    *o = simd::dot(row, x);
                }
            }
            Inner::Hadamard { .. } => {
                out.copy_from_slice(x);
                self.hadamard_forward(out);
            }
        }
    }

    /// `out = Πᵀ y`, the inverse map. Same costs and errors as [`Rotation::apply`].
    ///
    /// # Errors
    /// [`Error::DimMismatch`] if `y` or `out` is not of length `d`.
    pub fn apply_inverse(&self, y: &[f32], out: &mut [f32]) -> Result<()> {
        if y.len() != self.dim || out.len() != self.dim {
            return Err(Error::DimMismatch {
                expected: self.dim,
                got: y.len().min(out.len()),
            });
        }
        self.apply_inverse_unchecked(y, out);
        Ok(())
    }

    /// [`Rotation::apply_inverse`] without the length checks.
    pub fn apply_inverse_unchecked(&self, y: &[f32], out: &mut [f32]) {
        debug_assert!(y.len() == self.dim && out.len() == self.dim);
        match &self.inner {
            Inner::Dense(m) => {
                out.fill(0.0);
                for (row, &yi) in m.chunks_exact(self.dim).zip(y) {
                    for (o, &r) in out.iter_mut().zip(row) {
                        *o += yi * r;
                    }
                }
            }
            Inner::Hadamard { .. } => {
                out.copy_from_slice(y);
                self.hadamard_inverse(out);
            }
        }
    }

    /// Rotates `n = xs.len() / d` row-major vectors: `out[i] = Π xs[i]`. The Haar path is one matrix
    /// product `X Πᵀ`; the Hadamard path transforms each row in place.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `xs.len()` is not a multiple of `d` or `out.len() != xs.len()`.
    pub fn apply_batch(&self, xs: &[f32], out: &mut [f32]) -> Result<()> {
        self.batch(xs, out, false)
    }

    /// Inverse of [`Rotation::apply_batch`]: `out[i] = Πᵀ ys[i]`. Same errors.
    ///
    /// # Errors
    /// As [`Rotation::apply_batch`].
    pub fn apply_inverse_batch(&self, ys: &[f32], out: &mut [f32]) -> Result<()> {
        self.batch(ys, out, true)
    }

    fn batch(&self, xs: &[f32], out: &mut [f32], inverse: bool) -> Result<()> {
        let d = self.dim;
        if !xs.len().is_multiple_of(d) {
            return Err(Error::LengthMismatch {
                what: "batch of vectors",
                expected: xs.len() / d * d,
                got: xs.len(),
            });
        }
        self.check("batch output", out.len(), xs.len())?;
        let n = xs.len() / d;
        match &self.inner {
            Inner::Dense(m) => {
                let to_err = |_| Error::LengthMismatch {
                    what: "batch of vectors",
                    expected: n * d,
                    got: xs.len(),
                };
                let x = ArrayView2::from_shape((n, d), xs).map_err(to_err)?;
                let mat = ArrayView2::from_shape((d, d), m).map_err(to_err)?;
                let mut y = ArrayViewMut2::from_shape((n, d), out).map_err(to_err)?;
                if inverse {
                    general_mat_mul(1.0, &x, &mat, 0.0, &mut y);
                } else {
                    general_mat_mul(1.0, &x, &mat.t(), 0.0, &mut y);
                }
            }
            Inner::Hadamard { .. } => {
                out.copy_from_slice(xs);
                for row in out.chunks_exact_mut(d) {
                    if inverse {
                        self.hadamard_inverse(row);
                    } else {
                        self.hadamard_forward(row);
                    }
                }
            }
        }
        Ok(())
    }

    fn hadamard_forward(&self, x: &mut [f32]) {
        let Inner::Hadamard { block, rounds } = &self.inner else {
            return;
        };
        let (d, p) = (self.dim, *block);
        let norm = 1.0 / (p as f32).sqrt();
        let mut tmp = [0f32; 1024];
        for r in rounds {
            simd::mul_in_place(x, &r.signs);
            if !r.perm.is_empty() {
                permute(x, &r.perm, &mut tmp, false);
            }
            simd::fwht(&mut x[..p]);
            simd::scale_in_place(&mut x[..p], norm);
            if p < d {
                simd::fwht(&mut x[d - p..]);
                simd::scale_in_place(&mut x[d - p..], norm);
            }
        }
    }

    fn hadamard_inverse(&self, x: &mut [f32]) {
        let Inner::Hadamard { block, rounds } = &self.inner else {
            return;
        };
        let (d, p) = (self.dim, *block);
        let norm = 1.0 / (p as f32).sqrt();
        let mut tmp = [0f32; 1024];
        for r in rounds.iter().rev() {
            if p < d {
                simd::fwht(&mut x[d - p..]);
                simd::scale_in_place(&mut x[d - p..], norm);
            }
            simd::fwht(&mut x[..p]);
            simd::scale_in_place(&mut x[..p], norm);
            if !r.perm.is_empty() {
                permute(x, &r.perm, &mut tmp, true);
            }
            simd::mul_in_place(x, &r.signs);
        }
    }
}

/// `x ← x[perm]` (or its inverse), through a stack buffer for `d <= 1024` and the heap beyond.
fn permute(x: &mut [f32], perm: &[u32], stack: &mut [f32; 1024], inverse: bool) {
    let mut heap;
    let src: &mut [f32] = if x.len() <= stack.len() {
        &mut stack[..x.len()]
    } else {
        heap = vec![0f32; x.len()];
        &mut heap
    };
    src.copy_from_slice(x);
    if inverse {
        for (i, &p) in perm.iter().enumerate() {
            x[p as usize] = src[i];
        }
    } else {
        for (o, &p) in x.iter_mut().zip(perm) {
            *o = src[p as usize];
        }
    }
}

/// Sequential f64 dot product with a fixed summation order (4 interleaved partial sums, no fused
/// multiply-add), so the Haar matrix is bit-identical on every platform.
fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let mut s = [0.0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..4 {
            s[k] += x[k] * y[k];
        }
    }
    let mut t = (s[0] + s[1]) + (s[2] + s[3]);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        t += x * y;
    }
    t
}

fn haar_matrix(d: usize, seed: u64) -> Vec<f32> {
    orthonormal_rows(&mut SeededRng::new(seed, stream::HAAR), d)
}

/// A Haar-distributed `d × d` orthogonal matrix (row-major f32) drawn from `rng`: `d²` Gaussians
/// row by row, orthonormalised in order by CGS2 (see the module docs). Deterministic for a given
/// generator state on every platform. O(d³).
pub fn orthonormal_rows(rng: &mut SeededRng, d: usize) -> Vec<f32> {
    let mut q: Vec<f64> = (0..d * d).map(|_| rng.gaussian()).collect();
    let mut coeff = vec![0.0f64; d];
    for k in 0..d {
        let (done, rest) = q.split_at_mut(k * d);
        let v = &mut rest[..d];
        for _pass in 0..2 {
            for (c, qi) in coeff.iter_mut().zip(done.chunks_exact(d)) {
                *c = dot_f64(qi, v);
            }
            for (c, qi) in coeff.iter().zip(done.chunks_exact(d)) {
                for (vj, &qj) in v.iter_mut().zip(qi) {
                    *vj -= c * qj;
                }
            }
        }
        let norm = libm::sqrt(dot_f64(v, v));
        for vj in v.iter_mut() {
            *vj /= norm;
        }
    }
    q.iter().map(|&v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_vec(d: usize, seed: u64) -> Vec<f32> {
        let mut r = SeededRng::new(seed, stream::DATA);
        (0..d).map(|_| r.gaussian() as f32).collect()
    }

    fn norm(x: &[f32]) -> f32 {
        x.iter().map(|v| v * v).sum::<f32>().sqrt()
    }

    #[test]
    fn rotations_are_orthogonal_for_awkward_dims() {
        for kind in [RotationKind::Haar, RotationKind::Hadamard] {
            for d in [2usize, 3, 5, 7, 8, 80, 96, 128, 200, 576] {
                let rot = Rotation::new(kind, d, 11).unwrap();
                let x = gaussian_vec(d, d as u64);
                let mut y = vec![0.0; d];
                let mut back = vec![0.0; d];
                rot.apply(&x, &mut y).unwrap();
                rot.apply_inverse(&y, &mut back).unwrap();
                let (nx, ny) = (norm(&x), norm(&y));
                assert!(
                    (nx - ny).abs() < 1e-5 * nx,
                    "{kind:?} d={d} norm {nx} vs {ny}"
                );
                for (a, b) in x.iter().zip(&back) {
                    assert!((a - b).abs() < 1e-5 * nx, "{kind:?} d={d}");
                }
            }
        }
    }

    #[test]
    fn haar_rows_are_orthonormal() {
        let d = 64;
        let rot = Rotation::new(RotationKind::Haar, d, 5).unwrap();
        let m = rot.dense_matrix().unwrap();
        for i in 0..d {
            for j in 0..d {
                let v = simd::dot_scalar(&m[i * d..(i + 1) * d], &m[j * d..(j + 1) * d]);
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn batch_matches_single() {
        for kind in [RotationKind::Haar, RotationKind::Hadamard] {
            for d in [7usize, 96, 128] {
                let rot = Rotation::new(kind, d, 3).unwrap();
                let n = 13;
                let xs: Vec<f32> = (0..n)
                    .flat_map(|i| gaussian_vec(d, 100 + i as u64))
                    .collect();
                let mut ys = vec![0.0; n * d];
                rot.apply_batch(&xs, &mut ys).unwrap();
                let mut back = vec![0.0; n * d];
                rot.apply_inverse_batch(&ys, &mut back).unwrap();
                for i in 0..n {
                    let mut y = vec![0.0; d];
                    rot.apply(&xs[i * d..(i + 1) * d], &mut y).unwrap();
                    for (a, b) in y.iter().zip(&ys[i * d..(i + 1) * d]) {
                        assert!((a - b).abs() < 1e-5, "{kind:?} d={d}");
                    }
                }
                for (a, b) in xs.iter().zip(&back) {
                    assert!((a - b).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn same_seed_same_rotation_different_seed_different() {
        for kind in [RotationKind::Haar, RotationKind::Hadamard] {
            let a = Rotation::new(kind, 96, 1).unwrap();
            let b = Rotation::new(kind, 96, 1).unwrap();
            let c = Rotation::new(kind, 96, 2).unwrap();
            let x = gaussian_vec(96, 9);
            let (mut ya, mut yb, mut yc) = (vec![0.0; 96], vec![0.0; 96], vec![0.0; 96]);
            a.apply(&x, &mut ya).unwrap();
            b.apply(&x, &mut yb).unwrap();
            c.apply(&x, &mut yc).unwrap();
            assert_eq!(ya, yb);
            assert_ne!(ya, yc);
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(
            Rotation::new(RotationKind::Haar, 1, 0),
            Err(Error::DimTooSmall { .. })
        ));
        let r = Rotation::new(RotationKind::Hadamard, 8, 0).unwrap();
        let mut out = vec![0.0; 8];
        assert!(matches!(
            r.apply(&[0.0; 7], &mut out),
            Err(Error::DimMismatch { .. })
        ));
        let mut out = vec![0.0; 15];
        assert!(matches!(
            r.apply_batch(&[0.0; 15], &mut out),
            Err(Error::LengthMismatch { .. })
        ));
    }
}
