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

//!
//! Files: `haar.rs` (the dense construction), `hadamard.rs` (rounds and their SIMD application),
//! `x86.rs` (the AVX lane transposes, the only unsafe code here), `tests.rs`.

mod haar;
mod hadamard;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::Arc;

use ndarray::{ArrayView2, ArrayViewMut2, linalg::general_mat_mul};
use serde::{Deserialize, Serialize};

pub use haar::orthonormal_rows;
use haar::shared_haar_matrix;
pub use hadamard::LANES;
use hadamard::{HadamardOp, Round};

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
enum Inner {
    /// Row-major `d × d`, `y = M x`, shared by every rotation of the same `(d, seed)`.
    Dense(Arc<[f32]>),
    Hadamard {
        block: usize,
        rounds: Vec<Round>,
    },
}

/// The parameters of a randomized Hadamard rotation, for kernels that apply it outside this crate
/// (the WGSL kernels of tq-gpu). Applying round by round, in order: multiply by `signs`, gather
/// through `perm` (`x[i] = x_old[perm[i]]`, skipped when empty), then the normalised
/// Walsh-Hadamard transform (standard radix-2 butterflies, `h = 1, 2, 4, ...`) of the first
/// `block` coordinates and, when `block < d`, of the last `block` coordinates, each followed by a
/// multiplication by `block_scale` when it is `Some` (otherwise the scale is folded into the
/// signs).
#[derive(Debug, Clone, PartialEq)]
pub struct HadamardParams<'a> {
    /// The power-of-two block `p <= d`.
    pub block: usize,
    /// `1/sqrt(p)` applied after each block transform, or `None` when folded into the signs.
    pub block_scale: Option<f32>,
    /// `(signs, perm)` of each round.
    pub rounds: Vec<(&'a [f32], &'a [u32])>,
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
    /// platform. Cost: Haar O(d³) (about 1 s at d = 1536) the first time a `(d, seed)` is asked
    /// for while no rotation of it is alive, O(1) after that (the matrix is shared, like the
    /// codebooks: the many heads of a KV cache hold one); Hadamard O(d).
    ///
    /// # Errors
    /// [`Error::DimTooSmall`] for `dim < 2`.
    pub fn new(kind: RotationKind, dim: usize, seed: u64) -> Result<Self> {
        if dim < 2 {
            return Err(Error::DimTooSmall { dim, min: 2 });
        }
        let inner = match kind {
            RotationKind::Haar => Inner::Dense(shared_haar_matrix(dim, seed)),
            RotationKind::Hadamard => {
                let block = 1usize << (usize::BITS - 1 - dim.leading_zeros());
                let mut rng = SeededRng::new(seed, stream::HADAMARD);
                let rounds = (0..HADAMARD_ROUNDS)
                    .map(|_| {
                        // With one block per round (d a power of two) the 1/sqrt(d) normalisation
                        // is folded into the signs, saving a pass over the vector.
                        let fold = if block == dim {
                            1.0 / (dim as f32).sqrt()
                        } else {
                            1.0
                        };
                        let signs = (0..dim).map(|_| rng.sign() * fold).collect();
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
                self.hadamard_rows(x, out, false);
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
                self.hadamard_rows(y, out, true);
            }
        }
    }

    /// Rotates `n = xs.len() / d` row-major vectors: `out[i] = Π xs[i]`. The Haar path is one matrix
    /// product `X Πᵀ`; the Hadamard path transforms the rows as it reads them from `xs`.
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
            Inner::Hadamard { .. } => self.hadamard_rows(xs, out, inverse),
        }
        Ok(())
    }

    /// The Hadamard parameters (`None` for a dense Haar rotation).
    pub fn hadamard_params(&self) -> Option<HadamardParams<'_>> {
        let Inner::Hadamard { block, rounds } = &self.inner else {
            return None;
        };
        Some(HadamardParams {
            block: *block,
            block_scale: (*block < self.dim).then(|| 1.0 / (*block as f32).sqrt()),
            rounds: rounds
                .iter()
                .map(|r| (r.signs.as_slice(), r.perm.as_slice()))
                .collect(),
        })
    }

    /// Applies the Hadamard rotation (or its inverse) to every `d`-row of `src`, writing `rows`
    /// (as long as `src`), inside one SIMD dispatch; the rows are read from `src` as they are
    /// transformed, not copied first.
    /// Groups of [`LANES`] rows are transposed so that every butterfly is a vertical SIMD
    /// operation across rows; a lone row takes the row-wise path. Both paths perform the same
    /// floating-point operations on every element, so results are bit-identical however rows are
    /// grouped (a vector gets the same code alone or in a batch).
    fn hadamard_rows(&self, src: &[f32], rows: &mut [f32], inverse: bool) {
        debug_assert_eq!(src.len(), rows.len());
        let Inner::Hadamard { block, rounds } = &self.inner else {
            return;
        };
        let (d, p) = (self.dim, *block);
        // `None`: the normalisation is folded into the signs (single block per round).
        let norm = if p < d {
            Some(1.0 / (p as f32).sqrt())
        } else {
            None
        };
        simd::arch().dispatch(HadamardOp {
            src,
            rows,
            rounds,
            d,
            p,
            norm,
            inverse,
        });
    }
}
