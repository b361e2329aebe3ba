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

use std::sync::Arc;

use ndarray::{ArrayView2, ArrayViewMut2, linalg::general_mat_mul};
use serde::{Deserialize, Serialize};

use crate::rng::{SeededRng, stream};
use crate::shared::WeakCache;
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
                out.copy_from_slice(x);
                self.hadamard_rows(out, false);
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
                self.hadamard_rows(out, true);
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
                self.hadamard_rows(out, inverse);
            }
        }
        Ok(())
    }

    /// Applies the Hadamard rotation (or its inverse) to every `d`-row of `rows` in place, inside
    /// one SIMD dispatch. Groups of [`LANES`] rows are transposed so that every butterfly is a
    /// vertical SIMD operation across rows; a lone row takes the row-wise path. Both paths perform
    /// the same floating-point operations on every element, so results are bit-identical however
    /// rows are grouped (a vector gets the same code alone or in a batch).
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

    fn hadamard_rows(&self, rows: &mut [f32], inverse: bool) {
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
            rows,
            rounds,
            d,
            p,
            norm,
            inverse,
        });
    }
}

struct HadamardOp<'a> {
    rows: &'a mut [f32],
    rounds: &'a [Round],
    d: usize,
    p: usize,
    norm: Option<f32>,
    inverse: bool,
}

impl pulp::WithSimd for HadamardOp<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let HadamardOp {
            rows,
            rounds,
            d,
            p,
            norm,
            inverse,
        } = self;
        let n = rows.len() / d;
        let mut done = 0;
        if n >= 2 {
            let mut buf = vec![[0f32; LANES]; d];
            let mut tmp = vec![[0f32; LANES]; d];
            while done < n {
                let group = (n - done).min(LANES);
                let chunk = &mut rows[done * d..(done + group) * d];
                transpose_in(chunk, d, &mut buf);
                lanes_rounds(&mut buf, &mut tmp, rounds, p, norm, inverse);
                transpose_out(&buf, d, chunk);
                done += group;
            }
        }
        if done < n {
            let mut tmp = vec![0f32; d];
            for x in rows[done * d..].chunks_exact_mut(d) {
                row_rounds(x, &mut tmp, rounds, p, norm, inverse);
            }
        }
    }
}

/// Rows transformed together by the transposed Hadamard path.
pub const LANES: usize = 8;

/// Rows `chunk` (`group <= 8` rows of `d`) into lanes: `buf[j][l] = row_l[j]`.
#[inline(always)]
fn transpose_in(chunk: &[f32], d: usize, buf: &mut [[f32; LANES]]) {
    let group = chunk.len() / d;
    #[cfg(target_arch = "x86_64")]
    {
        if group == LANES
            && chunk.len() == LANES * d
            && buf.len() == d
            && x86_transpose::available()
        {
            // SAFETY: AVX is present (checked at run time), `chunk` is exactly 8 rows of `d` and
            // `buf` has `d` lanes: the preconditions of `rows_to_lanes`.
            unsafe { x86_transpose::rows_to_lanes(chunk, d, buf) };
            return;
        }
    }
    for (l, row) in chunk.chunks_exact(d).enumerate() {
        for (b, &v) in buf.iter_mut().zip(row) {
            b[l] = v;
        }
    }
}

/// Lanes back into rows: `row_l[j] = buf[j][l]` for the `chunk.len() / d` rows of `chunk`.
#[inline(always)]
fn transpose_out(buf: &[[f32; LANES]], d: usize, chunk: &mut [f32]) {
    let group = chunk.len() / d;
    #[cfg(target_arch = "x86_64")]
    {
        if group == LANES
            && chunk.len() == LANES * d
            && buf.len() == d
            && x86_transpose::available()
        {
            // SAFETY: AVX is present (checked at run time), `chunk` is exactly 8 rows of `d` and
            // `buf` has `d` lanes: the preconditions of `lanes_to_rows`.
            unsafe { x86_transpose::lanes_to_rows(buf, d, chunk) };
            return;
        }
    }
    for (l, row) in chunk.chunks_exact_mut(d).enumerate() {
        for (v, b) in row.iter_mut().zip(buf) {
            *v = b[l];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_transpose {
    use super::LANES;
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        use std::sync::OnceLock;
        static AVX: OnceLock<bool> = OnceLock::new();
        *AVX.get_or_init(|| !cfg!(miri) && std::arch::is_x86_feature_detected!("avx"))
    }

    /// 8×8 transpose of the registers `r` in place (unpack, shuffle, lane permute).
    #[inline]
    #[target_feature(enable = "avx")]
    fn transpose8(r: &mut [__m256; 8]) {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        r[0] = _mm256_permute2f128_ps::<0x20>(u0, u4);
        r[1] = _mm256_permute2f128_ps::<0x20>(u1, u5);
        r[2] = _mm256_permute2f128_ps::<0x20>(u2, u6);
        r[3] = _mm256_permute2f128_ps::<0x20>(u3, u7);
        r[4] = _mm256_permute2f128_ps::<0x31>(u0, u4);
        r[5] = _mm256_permute2f128_ps::<0x31>(u1, u5);
        r[6] = _mm256_permute2f128_ps::<0x31>(u2, u6);
        r[7] = _mm256_permute2f128_ps::<0x31>(u3, u7);
    }

    /// `buf[j][l] = rows[l·d + j]` for 8 rows.
    ///
    /// # Safety
    /// The CPU supports AVX, `rows.len() == 8 · d` and `buf.len() == d`: the unaligned 8-float
    /// loads at `l·d + j` and stores at lane `j + k` (`j + 8 <= d`) stay inside the slices.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn rows_to_lanes(rows: &[f32], d: usize, buf: &mut [[f32; LANES]]) {
        debug_assert!(rows.len() == 8 * d && buf.len() == d);
        let full = d / 8 * 8;
        for j in (0..full).step_by(8) {
            let mut r = [_mm256_setzero_ps(); 8];
            for (l, v) in r.iter_mut().enumerate() {
                // SAFETY: l·d + j + 8 <= 8·d.
                *v = unsafe { _mm256_loadu_ps(rows.as_ptr().add(l * d + j)) };
            }
            transpose8(&mut r);
            for (k, v) in r.iter().enumerate() {
                // SAFETY: j + k < d; each element is 8 floats.
                unsafe { _mm256_storeu_ps(buf.as_mut_ptr().add(j + k) as *mut f32, *v) };
            }
        }
        for j in full..d {
            for l in 0..8 {
                buf[j][l] = rows[l * d + j];
            }
        }
    }

    /// `rows[l·d + j] = buf[j][l]` for 8 rows.
    ///
    /// # Safety
    /// The CPU supports AVX, `rows.len() == 8 · d` and `buf.len() == d`: the unaligned 8-float
    /// loads at lane `j + k` and stores at `l·d + j` (`j + 8 <= d`) stay inside the slices.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn lanes_to_rows(buf: &[[f32; LANES]], d: usize, rows: &mut [f32]) {
        debug_assert!(rows.len() == 8 * d && buf.len() == d);
        let full = d / 8 * 8;
        for j in (0..full).step_by(8) {
            let mut r = [_mm256_setzero_ps(); 8];
            for (k, v) in r.iter_mut().enumerate() {
                // SAFETY: j + k < d.
                *v = unsafe { _mm256_loadu_ps(buf.as_ptr().add(j + k) as *const f32) };
            }
            transpose8(&mut r);
            for (l, v) in r.iter().enumerate() {
                // SAFETY: l·d + j + 8 <= 8·d.
                unsafe { _mm256_storeu_ps(rows.as_mut_ptr().add(l * d + j), *v) };
            }
        }
        for j in full..d {
            for l in 0..8 {
                rows[l * d + j] = buf[j][l];
            }
        }
    }
}

/// One forward or inverse round on one row.
#[inline(always)]
fn row_step(x: &mut [f32], tmp: &mut [f32], r: &Round, p: usize, norm: Option<f32>, forward: bool) {
    let d = x.len();
    if forward {
        for (v, s) in x.iter_mut().zip(&r.signs) {
            *v *= *s;
        }
        if !r.perm.is_empty() {
            tmp.copy_from_slice(x);
            for (o, &i) in x.iter_mut().zip(&r.perm) {
                *o = tmp[i as usize];
            }
        }
        block_pass(&mut x[..p], norm);
        if p < d {
            block_pass(&mut x[d - p..], norm);
        }
    } else {
        if p < d {
            block_pass(&mut x[d - p..], norm);
        }
        block_pass(&mut x[..p], norm);
        if !r.perm.is_empty() {
            tmp.copy_from_slice(x);
            for (&v, &i) in tmp.iter().zip(&r.perm) {
                x[i as usize] = v;
            }
        }
        for (v, s) in x.iter_mut().zip(&r.signs) {
            *v *= *s;
        }
    }
}

/// All rounds on one row (see [`Rotation::hadamard_rows`]).
#[inline(always)]
fn row_rounds(
    x: &mut [f32],
    tmp: &mut [f32],
    rounds: &[Round],
    p: usize,
    norm: Option<f32>,
    inverse: bool,
) {
    if inverse {
        for r in rounds.iter().rev() {
            row_step(x, tmp, r, p, norm, false);
        }
    } else {
        for r in rounds {
            row_step(x, tmp, r, p, norm, true);
        }
    }
}

#[inline(always)]
fn lanes_signs(x: &mut [[f32; LANES]], signs: &[f32]) {
    for (v, &s) in x.iter_mut().zip(signs) {
        for l in v.iter_mut() {
            *l *= s;
        }
    }
}

/// Normalised Walsh-Hadamard transform of transposed rows. Two butterfly stages are fused per
/// pass (radix 4) to halve the memory traffic; every element still sees exactly the additions of
/// [`block_pass`], in the same order, so the results are bit-identical.
#[inline(always)]
fn lanes_pass(x: &mut [[f32; LANES]], norm: Option<f32>) {
    let n = x.len();
    // Flat views: element j's lanes are floats 8j..8j+8, so a block of h elements is one
    // contiguous run of 8h floats and every butterfly is a plain element-wise loop.
    let flat = x.as_flattened_mut();
    let mut h = 1;
    while 4 * h <= n {
        let w = h * LANES;
        for blk in flat.chunks_exact_mut(4 * w) {
            let (ab, ce) = blk.split_at_mut(2 * w);
            let (a, b) = ab.split_at_mut(w);
            let (c, e) = ce.split_at_mut(w);
            for i in 0..w {
                let (s0, d0) = (a[i] + b[i], a[i] - b[i]);
                let (s1, d1) = (c[i] + e[i], c[i] - e[i]);
                a[i] = s0 + s1;
                c[i] = s0 - s1;
                b[i] = d0 + d1;
                e[i] = d0 - d1;
            }
        }
        h *= 4;
    }
    if h < n {
        let w = h * LANES;
        for blk in flat.chunks_exact_mut(2 * w) {
            let (a, b) = blk.split_at_mut(w);
            for i in 0..w {
                let (s, t) = (a[i] + b[i], a[i] - b[i]);
                a[i] = s;
                b[i] = t;
            }
        }
    }
    if let Some(norm) = norm {
        for v in flat.iter_mut() {
            *v *= norm;
        }
    }
}

/// All rounds on [`LANES`] transposed rows: element `j` holds coordinate `j` of every row.
#[inline(always)]
fn lanes_rounds(
    x: &mut [[f32; LANES]],
    tmp: &mut [[f32; LANES]],
    rounds: &[Round],
    p: usize,
    norm: Option<f32>,
    inverse: bool,
) {
    let d = x.len();
    if inverse {
        for r in rounds.iter().rev() {
            if p < d {
                lanes_pass(&mut x[d - p..], norm);
            }
            lanes_pass(&mut x[..p], norm);
            if !r.perm.is_empty() {
                tmp.copy_from_slice(x);
                for (v, &i) in tmp.iter().zip(&r.perm) {
                    x[i as usize] = *v;
                }
            }
            lanes_signs(x, &r.signs);
        }
    } else {
        for r in rounds {
            lanes_signs(x, &r.signs);
            if !r.perm.is_empty() {
                tmp.copy_from_slice(x);
                for (o, &i) in x.iter_mut().zip(&r.perm) {
                    *o = tmp[i as usize];
                }
            }
            lanes_pass(&mut x[..p], norm);
            if p < d {
                lanes_pass(&mut x[d - p..], norm);
            }
        }
    }
}

/// Normalised Walsh-Hadamard transform of one power-of-two block (inlined into the dispatch).
#[inline(always)]
fn block_pass(x: &mut [f32], norm: Option<f32>) {
    simd::fwht_inline(x);
    if let Some(norm) = norm {
        for v in x.iter_mut() {
            *v *= norm;
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

/// The Haar matrix of `(d, seed)`, built once while any rotation holds it
/// ([`crate::shared::WeakCache`]).
fn shared_haar_matrix(d: usize, seed: u64) -> Arc<[f32]> {
    static CACHE: WeakCache<(usize, u64)> = WeakCache::new();
    CACHE.get_or_build(&(d, seed), || haar_matrix(d, seed))
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

    /// Batched (transposed) and single-row Hadamard paths must agree bit for bit.
    #[test]
    fn hadamard_batch_is_bitwise_equal_to_single_rows() {
        for d in [2usize, 3, 8, 80, 128, 200] {
            let rot = Rotation::new(RotationKind::Hadamard, d, 4).unwrap();
            let n = 13;
            let xs: Vec<f32> = (0..n)
                .flat_map(|i| gaussian_vec(d, 50 + i as u64))
                .collect();
            let mut ys = vec![0.0; n * d];
            rot.apply_batch(&xs, &mut ys).unwrap();
            let mut back = vec![0.0; n * d];
            rot.apply_inverse_batch(&ys, &mut back).unwrap();
            for i in 0..n {
                let mut y = vec![0.0; d];
                rot.apply(&xs[i * d..(i + 1) * d], &mut y).unwrap();
                assert_eq!(y, ys[i * d..(i + 1) * d], "d={d} row {i}");
                let mut x = vec![0.0; d];
                rot.apply_inverse(&y, &mut x).unwrap();
                assert_eq!(x, back[i * d..(i + 1) * d], "d={d} row {i}");
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
