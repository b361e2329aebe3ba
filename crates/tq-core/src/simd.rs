//! Float kernels with runtime SIMD dispatch (pulp) and their scalar twins.
//!
//! Each kernel `foo` dispatches once per call through a process-wide [`pulp::Arch`] chosen at first
//! use; `foo_scalar` is the specification it is tested against. Reductions use several independent
//! accumulators, so their rounding differs from the scalar twin by a few ulps (the parity tests
//! bound it); element-wise kernels are bit-identical to their twins.

use std::sync::OnceLock;

use pulp::{Arch, Simd, WithSimd};

/// The process-wide SIMD dispatcher.
#[inline]
pub fn arch() -> Arch {
    static ARCH: OnceLock<Arch> = OnceLock::new();
    *ARCH.get_or_init(Arch::new)
}

struct Dot<'a>(&'a [f32], &'a [f32]);

impl WithSimd for Dot<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let (a, at) = S::as_simd_f32s(self.0);
        let (b, bt) = S::as_simd_f32s(self.1);
        let mut acc = [simd.splat_f32s(0.0); 4];
        let mut ac = a.chunks_exact(4);
        let mut bc = b.chunks_exact(4);
        for (x, y) in (&mut ac).zip(&mut bc) {
            for k in 0..4 {
                acc[k] = simd.mul_add_f32s(x[k], y[k], acc[k]);
            }
        }
        for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
            acc[0] = simd.mul_add_f32s(*x, *y, acc[0]);
        }
        let s = simd.add_f32s(simd.add_f32s(acc[0], acc[1]), simd.add_f32s(acc[2], acc[3]));
        let mut total = simd.reduce_sum_f32s(s);
        for (x, y) in at.iter().zip(bt) {
            total += x * y;
        }
        total
    }
}

/// `Σ a_i b_i`. `a` and `b` must have equal lengths (checked with `debug_assert!`). O(n).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    arch().dispatch(Dot(a, b))
}

/// Scalar twin of [`dot`] (sequential sum).
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `Σ x_i²` with a summation order that does not depend on the CPU: 8 interleaved partial sums
/// combined pairwise, no fused multiply-add. Vectorises to one 8-lane register where available and
/// gives the same bits everywhere, so norms (and the codes derived from them) are portable. O(n).
#[inline]
pub fn sum_squares_fixed(x: &[f32]) -> f32 {
    struct Op<'a>(&'a [f32]);
    impl WithSimd for Op<'_> {
        type Output = f32;
        #[inline(always)]
        fn with_simd<S: Simd>(self, _simd: S) -> f32 {
            sum_squares_body(self.0)
        }
    }
    arch().dispatch(Op(x))
}

/// Scalar twin of [`sum_squares_fixed`] (the same operations, without dispatch).
pub fn sum_squares_fixed_scalar(x: &[f32]) -> f32 {
    sum_squares_body(x)
}

#[inline(always)]
fn sum_squares_body(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    for (l, v) in chunks.remainder().iter().enumerate() {
        acc[l] += v * v;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// `out[i] = #{ j : ys[i] > sorted[j] }`: the code of each value for a sorted boundary list (ties
/// take the lower code, NaN gives 0). `out.len() == ys.len()` (checked with `debug_assert!`).
/// O(n · sorted.len()); used for `sorted.len() <= 15`. Counts are kept in 32-bit lanes (one compare
/// and one subtract per boundary and 8 values with AVX2).
///
/// With AVX2 (x86-64, checked at run time) and at most 15 boundaries, each lane runs a branch-free
/// binary search instead: one compare per level against the boundary its partial code selects
/// (`vpermps` from a per-level table), 4 levels for 15 boundaries, and the codes are narrowed to
/// bytes 32 at a time. Codes are integers: both paths give the scalar twin's exactly.
pub fn count_below(sorted: &[f32], ys: &[f32], out: &mut [u8]) {
    debug_assert_eq!(ys.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if sorted.len() <= 15 && x86::has_avx2() {
        // SAFETY: AVX2 is present (checked at run time); lengths are equal (debug-checked above,
        // and the kernel reads `ys` and writes `out` only up to the shorter of the two).
        unsafe { x86::count_below_avx2(sorted, ys, out) };
        return;
    }
    arch().dispatch(CountBelow { sorted, ys, out })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub(super) fn has_avx2() -> bool {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| !cfg!(miri) && std::arch::is_x86_feature_detected!("avx2"))
    }

    /// [`super::count_below`] for at most 15 sorted boundaries by a per-lane binary search.
    /// The boundaries are padded with `+inf` to `2^L - 1` (no value is above `+inf`, so the
    /// counts do not change); at level `l` a lane whose code so far is `c` (a multiple of
    /// `2^(L-l)`) compares against boundary `c + 2^(L-l-1) - 1`, read from an 8-entry table by
    /// `vpermps` at index `c >> (L-l)`, and adds `2^(L-l-1)` when above it. NaN compares false
    /// everywhere and gets code 0, as in the scalar twin.
    ///
    /// # Safety
    /// The CPU must support AVX2; `sorted.len() <= 15`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn count_below_avx2(sorted: &[f32], ys: &[f32], out: &mut [u8]) {
        let n = ys.len().min(out.len());
        let levels = (usize::BITS - sorted.len().leading_zeros()) as usize;
        let mut padded = [f32::INFINITY; 15];
        padded[..sorted.len()].copy_from_slice(sorted);
        let mut tables = [_mm256_setzero_ps(); 4];
        let mut steps = [_mm256_setzero_si256(); 4];
        let mut shifts = [_mm_setzero_si128(); 4];
        for l in 0..levels {
            let step = 1usize << (levels - 1 - l);
            let mut t = [0f32; 8];
            for (j, v) in t.iter_mut().enumerate().take(1 << l) {
                *v = padded[j * 2 * step + step - 1];
            }
            // SAFETY: `t` holds 8 floats.
            tables[l] = unsafe { _mm256_loadu_ps(t.as_ptr()) };
            steps[l] = _mm256_set1_epi32(step as i32);
            shifts[l] = _mm_cvtsi32_si128((levels - l) as i32);
        }
        // The code of 8 values, one per 32-bit lane.
        let code = |v: __m256| {
            let mut c = _mm256_setzero_si256();
            for l in 0..levels {
                let t = _mm256_permutevar8x32_ps(tables[l], _mm256_srl_epi32(c, shifts[l]));
                let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, t));
                c = _mm256_add_epi32(c, _mm256_and_si256(above, steps[l]));
            }
            c
        };
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut i = 0;
        while i + 32 <= n {
            let v = &ys[i..i + 32];
            // SAFETY: `v` holds 32 floats.
            let (c0, c1, c2, c3) = unsafe {
                let p = v.as_ptr();
                (
                    code(_mm256_loadu_ps(p)),
                    code(_mm256_loadu_ps(p.add(8))),
                    code(_mm256_loadu_ps(p.add(16))),
                    code(_mm256_loadu_ps(p.add(24))),
                )
            };
            // Codes fit a byte: pack to 16 then 8 bits (per 128-bit lane), then put the dwords
            // back in value order.
            let w = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
            let bytes = _mm256_permutevar8x32_epi32(w, order);
            let o = &mut out[i..i + 32];
            // SAFETY: `o` holds 32 bytes.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), bytes) };
            i += 32;
        }
        while i + 8 <= n {
            let mut lanes = [0u32; 8];
            let v = &ys[i..i + 8];
            // SAFETY: `v` holds 8 floats and `lanes` 8 u32s.
            unsafe {
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), code(_mm256_loadu_ps(v.as_ptr())))
            };
            for (o, &c) in out[i..i + 8].iter_mut().zip(&lanes) {
                *o = c as u8;
            }
            i += 8;
        }
        for (o, &y) in out[i..n].iter_mut().zip(&ys[i..n]) {
            *o = sorted.iter().filter(|&&b| y > b).count() as u8;
        }
    }
}

struct CountBelow<'a> {
    sorted: &'a [f32],
    ys: &'a [f32],
    out: &'a mut [u8],
}

impl WithSimd for CountBelow<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let CountBelow { sorted, ys, out } = self;
        let lanes = S::F32_LANES;
        let (head, tail) = S::as_simd_f32s(ys);
        let mut buf = [0u32; 64];
        for (k, &y) in head.iter().enumerate() {
            let (one, zero) = (simd.splat_u32s(1), simd.splat_u32s(0));
            let mut acc = zero;
            for &b in sorted {
                let m = simd.greater_than_f32s(y, simd.splat_f32s(b));
                acc = simd.add_u32s(acc, simd.select_u32s(m, one, zero));
            }
            let (cells, _) = S::as_mut_simd_u32s(&mut buf[..lanes]);
            cells[0] = acc;
            for (o, &c) in out[k * lanes..(k + 1) * lanes]
                .iter_mut()
                .zip(&buf[..lanes])
            {
                *o = c as u8;
            }
        }
        let done = head.len() * lanes;
        for (o, &y) in out[done..].iter_mut().zip(tail) {
            *o = sorted.iter().filter(|&&b| y > b).count() as u8;
        }
    }
}

/// Scalar twin of [`count_below`].
pub fn count_below_scalar(sorted: &[f32], ys: &[f32], out: &mut [u8]) {
    for (o, &y) in out.iter_mut().zip(ys) {
        *o = sorted.iter().filter(|&&b| y > b).count() as u8;
    }
}

/// `max_i x_i` (`-inf` for an empty slice). NaN-free input (checked with `debug_assert!`). O(n).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    debug_assert!(x.iter().all(|v| !v.is_nan()));
    struct Op<'a>(&'a [f32]);
    impl WithSimd for Op<'_> {
        type Output = f32;
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) -> f32 {
            let (head, tail) = S::as_simd_f32s(self.0);
            let mut acc = [simd.splat_f32s(f32::NEG_INFINITY); 4];
            let mut chunks = head.chunks_exact(4);
            for c in &mut chunks {
                for k in 0..4 {
                    acc[k] = simd.max_f32s(acc[k], c[k]);
                }
            }
            for v in chunks.remainder() {
                acc[0] = simd.max_f32s(acc[0], *v);
            }
            let m = simd.max_f32s(simd.max_f32s(acc[0], acc[1]), simd.max_f32s(acc[2], acc[3]));
            tail.iter().fold(simd.reduce_max_f32s(m), |a, &b| a.max(b))
        }
    }
    arch().dispatch(Op(x))
}

/// Scalar twin of [`max`].
pub fn max_scalar(x: &[f32]) -> f32 {
    x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

// `exp` on f32 lanes: `x = n·ln2 + r` with `n = round(x·log2 e)` (read from the low mantissa
// bits of `x·log2 e + 1.5·2^23 + 127`, which are also `n + 127`, the exponent of `2^n`), `r` by a
// two-part `ln 2` (Cody-Waite), `e^r` by Cephes' degree-7 minimax form on `|r| <= ln2/2`.
// Arguments are clamped to `[-87, 88]` so `2^n` stays a normal float. About 2 ulp.
const EXP_LO: f32 = -87.0;
const EXP_HI: f32 = 88.0;
const EXP_MAGIC: f32 = 12_583_039.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// One lane of the vector `exp` (the same fused operations in the same order).
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let t = x.mul_add(std::f32::consts::LOG2_E, EXP_MAGIC);
    let n = t - EXP_MAGIC;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r + 1.0);
    y * f32::from_bits(t.to_bits() << 23)
}

#[inline(always)]
fn exp_lanes<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    let x = simd.min_f32s(
        simd.max_f32s(x, simd.splat_f32s(EXP_LO)),
        simd.splat_f32s(EXP_HI),
    );
    let magic = simd.splat_f32s(EXP_MAGIC);
    let t = simd.mul_add_f32s(x, simd.splat_f32s(std::f32::consts::LOG2_E), magic);
    let n = simd.sub_f32s(t, magic);
    let r = simd.mul_add_f32s(n, simd.splat_f32s(-LN2_HI), x);
    let r = simd.mul_add_f32s(n, simd.splat_f32s(-LN2_LO), r);
    let mut p = simd.splat_f32s(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = simd.mul_add_f32s(p, r, simd.splat_f32s(c));
    }
    let y = simd.mul_add_f32s(
        p,
        simd.mul_f32s(r, r),
        simd.add_f32s(r, simd.splat_f32s(1.0)),
    );
    let bits = simd.wrapping_dyn_shl_u32s(simd.transmute_u32s_f32s(t), simd.splat_u32s(23));
    simd.mul_f32s(y, simd.transmute_f32s_u32s(bits))
}

/// The softmax numerator in place: `x_i ← exp(scale · x_i − shift)` (one fused multiply-add for
/// the argument), returning `Σ_i x_i`. Each element is bit-identical to
/// [`exp_affine_sum_scalar`]'s; the sum keeps 8-lane partial sums, folded into an `f64` every
/// 512 elements (on AVX-512 F the elements come 16 at a time, their two halves added to the
/// 8-lane sums in order: the same sums as on AVX2). Arguments below −87 give `e^−87` (about
/// 1.6e-38) instead of smaller values, so the softmax weight of a token more than 87 nats below
/// the maximum is at most that. About 2 ulp per element. O(n).
pub fn exp_affine_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::scan::avx512f_native() && matches!(arch(), Arch::V3(_)) {
        // SAFETY: AVX-512 F, AVX2 and FMA are present (checked at run time).
        return unsafe { x86_exp::exp_affine_sum_512(x, scale, shift) };
    }
    exp_affine_sum_lanes(x, scale, shift)
}

/// The pulp body of [`exp_affine_sum`] (8 lanes on AVX2).
fn exp_affine_sum_lanes(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    struct Op<'a>(&'a mut [f32], f32, f32);
    impl WithSimd for Op<'_> {
        type Output = f32;
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) -> f32 {
            let Op(x, scale, shift) = self;
            let (head, tail) = S::as_mut_simd_f32s(x);
            let (sc, sh) = (simd.splat_f32s(scale), simd.splat_f32s(-shift));
            let mut total = 0.0f64;
            for chunk in head.chunks_mut(512 / S::F32_LANES.max(1)) {
                let mut acc = simd.splat_f32s(0.0);
                // Two registers per step, so two `exp` chains are in flight (the same sums in the
                // same order as one at a time).
                let mut pairs = chunk.chunks_exact_mut(2);
                for p in &mut pairs {
                    let a = exp_lanes(simd, simd.mul_add_f32s(p[0], sc, sh));
                    let b = exp_lanes(simd, simd.mul_add_f32s(p[1], sc, sh));
                    (p[0], p[1]) = (a, b);
                    acc = simd.add_f32s(simd.add_f32s(acc, a), b);
                }
                for v in pairs.into_remainder() {
                    *v = exp_lanes(simd, simd.mul_add_f32s(*v, sc, sh));
                    acc = simd.add_f32s(acc, *v);
                }
                total += simd.reduce_sum_f32s(acc) as f64;
            }
            for v in tail.iter_mut() {
                *v = exp_lane(v.mul_add(scale, -shift));
                total += *v as f64;
            }
            total as f32
        }
    }
    arch().dispatch(Op(x, scale, shift))
}

/// [`exp_affine_sum`] on 512-bit lanes.
#[cfg(target_arch = "x86_64")]
mod x86_exp {
    use super::{EXP_HI, EXP_LO, EXP_MAGIC, EXP_P, LN2_HI, LN2_LO, exp_lane};
    use std::arch::x86_64::*;

    /// `exp_lanes` on 16 lanes: the same operations in the same order.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(EXP_LO)),
            _mm512_set1_ps(EXP_HI),
        );
        let magic = _mm512_set1_ps(EXP_MAGIC);
        let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), magic);
        let n = _mm512_sub_ps(t, magic);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_P[0]);
        for &c in &EXP_P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(
            p,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let bits = _mm512_slli_epi32::<23>(_mm512_castps_si512(t));
        _mm512_mul_ps(y, _mm512_castsi512_ps(bits))
    }

    /// The eight lanes of `acc` summed as pulp's AVX2 `reduce_sum_f32s` does: the two halves
    /// added, then lanes (0 + 2) + (1 + 3).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn reduce8(acc: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let hi = _mm_movehl_ps(r, r);
        let r0 = _mm_add_ps(r, hi);
        let shuffled = _mm_shuffle_ps::<0b0001>(r0, r0);
        _mm_cvtss_f32(_mm_add_ss(r0, shuffled))
    }

    /// The AVX2 body of `exp_affine_sum` on 16 lanes: per 512 elements an 8-lane sum that adds
    /// each register's low half then its high half (the AVX2 body's order of 8-lane vectors),
    /// folded into an `f64`; the last `len mod 8` elements one at a time, as there.
    ///
    /// # Safety
    /// AVX-512 F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn exp_affine_sum_512(x: &mut [f32], scale: f32, shift: f32) -> f32 {
        let (sc, sh) = (_mm512_set1_ps(scale), _mm512_set1_ps(-shift));
        let head = x.len() / 8 * 8;
        let (body, tail) = x.split_at_mut(head);
        let mut total = 0.0f64;
        for chunk in body.chunks_mut(512) {
            let mut acc = _mm256_setzero_ps();
            let p = chunk.as_mut_ptr();
            let whole = chunk.len() / 16 * 16;
            for at in (0..whole).step_by(16) {
                // SAFETY: `at + 16 <= chunk.len()`.
                let e = unsafe {
                    let e = exp16(_mm512_fmadd_ps(_mm512_loadu_ps(p.add(at)), sc, sh));
                    _mm512_storeu_ps(p.add(at), e);
                    e
                };
                let lo = _mm512_castps512_ps256(e);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
                acc = _mm256_add_ps(_mm256_add_ps(acc, lo), hi);
            }
            if whole < chunk.len() {
                // One 8-lane vector left (chunks hold whole vectors of 8).
                // SAFETY: the masked load and store touch `whole..whole + 8`, inside.
                let e = unsafe {
                    let v = _mm512_maskz_loadu_ps(0xFF, p.add(whole));
                    let e = exp16(_mm512_fmadd_ps(v, sc, sh));
                    _mm512_mask_storeu_ps(p.add(whole), 0xFF, e);
                    e
                };
                acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
            }
            total += reduce8(acc) as f64;
        }
        for v in tail.iter_mut() {
            *v = exp_lane(v.mul_add(scale, -shift));
            total += *v as f64;
        }
        total as f32
    }
}

/// Scalar twin of [`exp_affine_sum`] (sequential `f64` sum).
pub fn exp_affine_sum_scalar(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut total = 0.0f64;
    for v in x.iter_mut() {
        *v = exp_lane(v.mul_add(scale, -shift));
        total += *v as f64;
    }
    total as f32
}

/// Softmax of `scale · x` in place, in three passes: the largest score `m`, then `exp(scale · x_i −
/// scale · m)` (one fused multiply-add per argument, so the largest one's is within half an ulp
/// of `scale · m` of zero) and its sum on SIMD lanes ([`exp_affine_sum`]), then one multiply by
/// `1 / Σ`. A scale that is not positive and finite, or a shift `scale · m` that overflows, scales
/// the scores first instead (four passes). The attention of the quantized caches and the dense
/// baselines it is measured against share it. NaN-free input; an empty slice is left as is. O(n).
pub fn softmax_in_place(x: &mut [f32], scale: f32) {
    if x.is_empty() {
        return;
    }
    let sum = softmax_numerators(x, scale);
    scale_in_place(x, 1.0 / sum);
}

/// The first two passes of [`softmax_in_place`]: `x_i ← exp(scale · x_i − scale · m)` (`m` the
/// largest `x_i`), returning their sum `Σ`, so the softmax is `x_i / Σ`. For callers that
/// divide a weighted sum by `Σ` once instead of every weight (attention). The largest score
/// gives about 1, so `Σ >= 1` less a few ulp for non-empty input; an empty slice gives 0.
/// NaN-free input. O(n).
pub fn softmax_numerators(x: &mut [f32], scale: f32) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    let m = max(x);
    let shift = scale * m;
    if scale > 0.0 && scale.is_finite() && shift.is_finite() {
        exp_affine_sum(x, scale, shift)
    } else {
        scale_in_place(x, scale);
        let m = max(x);
        exp_affine_sum(x, 1.0, m)
    }
}

/// Unnormalised fast Walsh-Hadamard transform in place (`x ← H x` with `H` the ±1 Sylvester matrix).
/// `x.len()` must be a power of two (checked with `debug_assert!`). O(n log n).
pub fn fwht(x: &mut [f32]) {
    debug_assert!(x.len().is_power_of_two());
    struct Op<'a>(&'a mut [f32]);
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _simd: S) {
            fwht_body(self.0)
        }
    }
    arch().dispatch(Op(x))
}

/// Scalar twin of [`fwht`] (same butterflies, no SIMD dispatch).
pub fn fwht_scalar(x: &mut [f32]) {
    fwht_body(x)
}

/// The body of [`fwht`] for callers that are already inside a SIMD dispatch (it is inlined into
/// their target-feature context).
#[inline(always)]
pub fn fwht_inline(x: &mut [f32]) {
    fwht_body(x)
}

#[inline(always)]
fn fwht_body(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    if n >= 8 {
        // Stages h = 1, 2, 4 as one 8-point transform per chunk.
        for c in x.chunks_exact_mut(8) {
            let (a0, a1) = (c[0] + c[1], c[0] - c[1]);
            let (a2, a3) = (c[2] + c[3], c[2] - c[3]);
            let (a4, a5) = (c[4] + c[5], c[4] - c[5]);
            let (a6, a7) = (c[6] + c[7], c[6] - c[7]);
            let (b0, b2) = (a0 + a2, a0 - a2);
            let (b1, b3) = (a1 + a3, a1 - a3);
            let (b4, b6) = (a4 + a6, a4 - a6);
            let (b5, b7) = (a5 + a7, a5 - a7);
            c[0] = b0 + b4;
            c[4] = b0 - b4;
            c[1] = b1 + b5;
            c[5] = b1 - b5;
            c[2] = b2 + b6;
            c[6] = b2 - b6;
            c[3] = b3 + b7;
            c[7] = b3 - b7;
        }
        h = 8;
    }
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, t) = (*u + *v, *u - *v);
                *u = s;
                *v = t;
            }
        }
        h *= 2;
    }
}

/// `y[i] += a · x[i]` (SIMD dispatched; lengths must match, checked with `debug_assert!`).
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    struct Op<'a>(f32, &'a [f32], &'a mut [f32]);
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let Op(a, x, y) = self;
            let (xh, xt) = S::as_simd_f32s(x);
            let (yh, yt) = S::as_mut_simd_f32s(y);
            let av = simd.splat_f32s(a);
            for (yv, xv) in yh.iter_mut().zip(xh) {
                *yv = simd.mul_add_f32s(av, *xv, *yv);
            }
            for (yv, xv) in yt.iter_mut().zip(xt) {
                *yv += a * xv;
            }
        }
    }
    arch().dispatch(Op(a, x, y))
}

/// `x[i] *= s`.
#[inline]
pub fn scale_in_place(x: &mut [f32], s: f32) {
    struct Op<'a>(&'a mut [f32], f32);
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _simd: S) {
            for a in self.0.iter_mut() {
                *a *= self.1;
            }
        }
    }
    arch().dispatch(Op(x, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{SeededRng, stream};

    const SIZES: [usize; 14] = [0, 1, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1000];

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SeededRng::new(seed, stream::DATA);
        (0..n).map(|_| r.gaussian() as f32).collect()
    }

    /// SIMD and scalar sums differ only by reassociation: each partial sum carries at most
    /// n·eps·Σ|a_i b_i| of rounding error, so that bound (with eps = 2^-23) is the tolerance.
    #[test]
    fn dot_parity() {
        for n in SIZES {
            let (a, b) = (data(n, 1), data(n, 2));
            let bound = n as f32
                * f32::EPSILON
                * dot_scalar(
                    &a.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                    &b.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                );
            assert!(
                (dot(&a, &b) - dot_scalar(&a, &b)).abs() <= bound + 1e-30,
                "n={n}"
            );
        }
    }

    #[test]
    fn sum_squares_is_bitwise_equal_to_its_twin() {
        for n in SIZES {
            let x = data(n, 5);
            assert_eq!(
                sum_squares_fixed(&x).to_bits(),
                sum_squares_fixed_scalar(&x).to_bits(),
                "n={n}"
            );
        }
    }

    #[test]
    fn axpy_parity() {
        for n in SIZES {
            let (x, y) = (data(n, 7), data(n, 8));
            let mut a = y.clone();
            axpy(0.75, &x, &mut a);
            for ((u, v), w) in a.iter().zip(&x).zip(&y) {
                assert!(
                    (u - (w + 0.75 * v)).abs() <= 2.0 * f32::EPSILON * (w.abs() + (0.75 * v).abs())
                );
            }
        }
    }

    #[test]
    fn max_parity() {
        for n in SIZES {
            let x = data(n, 9);
            assert_eq!(max(&x).to_bits(), max_scalar(&x).to_bits(), "n={n}");
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    /// The 512-bit body of `exp_affine_sum` gives the AVX2 body's elements and sum bit for bit,
    /// over lengths with a last register of 8 lanes, a scalar tail and several 512-element folds.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_affine_sum_512_equals_the_avx2_body() {
        if !(crate::scan::avx512f_native() && matches!(arch(), Arch::V3(_))) {
            return;
        }
        let mut r = SeededRng::new(11, stream::DATA);
        for n in SIZES.iter().copied().chain([512, 520, 1032, 4096, 5003]) {
            let mut x: Vec<f32> = (0..n).map(|_| (r.uniform() * 95.0 - 90.0) as f32).collect();
            // Infinite scores clamp to the argument range on every path.
            for (i, inf) in [(n / 3, f32::INFINITY), (n / 2, f32::NEG_INFINITY)] {
                if i < n {
                    x[i] = inf;
                }
            }
            let (mut a, mut b) = (x.clone(), x.clone());
            // SAFETY: the test returned above unless AVX-512 F, AVX2 and FMA are present.
            let sa = unsafe { x86_exp::exp_affine_sum_512(&mut a, 0.75, 1.5) };
            let sb = exp_affine_sum_lanes(&mut b, 0.75, 1.5);
            assert_eq!(sa.to_bits(), sb.to_bits(), "n={n}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "n={n}");
        }
    }

    /// Every element against `f64::exp` (relative error within 4 ulp, measured about 2), and
    /// bit-identical to the scalar twin; the sum within the `f64` sum's rounding.
    #[test]
    fn exp_affine_sum_is_accurate_and_matches_its_twin() {
        let mut r = SeededRng::new(10, stream::DATA);
        for n in SIZES.iter().copied().chain([4096, 5000]) {
            // Arguments across [-90, 5] (past the clamp at -87 too).
            let x: Vec<f32> = (0..n).map(|_| (r.uniform() * 95.0 - 90.0) as f32).collect();
            let (scale, shift) = (1.25f32, 2.5f32);
            let (mut a, mut b) = (x.clone(), x.clone());
            let (sa, sb) = (
                exp_affine_sum(&mut a, scale, shift),
                exp_affine_sum_scalar(&mut b, scale, shift),
            );
            let mut want_sum = 0.0f64;
            for ((&u, &v), &x) in a.iter().zip(&b).zip(&x) {
                assert_eq!(u.to_bits(), v.to_bits(), "n={n} x={x}");
                let arg = x.mul_add(scale, -shift) as f64;
                let want = arg.max(EXP_LO as f64).exp();
                want_sum += want;
                assert!(
                    ((u as f64 - want) / want).abs() <= 4.0 * f32::EPSILON as f64,
                    "exp({arg}) = {u}, want {want}"
                );
            }
            // Each term is within 4 eps; the SIMD sum adds at most 512 / 8 = 64 terms per f32 lane
            // before folding into f64 (64 eps), reduces 8 lanes (8 eps) and rounds once to f32.
            let eps = f32::EPSILON as f64;
            let tol = (4.0 + 64.0 + 8.0 + 1.0) * eps * want_sum + 1e-30;
            assert!(((sa as f64) - want_sum).abs() <= tol, "n={n}");
            // The twin sums in f64: the terms' error and the final rounding.
            assert!(
                ((sb as f64) - want_sum).abs() <= (4.0 + 1.0) * eps * want_sum + 1e-30,
                "n={n}"
            );
        }
        // Exact points: e^0 = 1 and the clamps.
        let mut x = [0.0f32, -1000.0, 200.0];
        exp_affine_sum(&mut x, 1.0, 0.0);
        assert_eq!(x[0], 1.0);
        assert!(x[1] > 0.0 && (x[1] as f64 - (-87f64).exp()).abs() < 1e-44);
        assert!(x[2].is_finite() && x[2] > 1e38);
    }

    #[test]
    fn softmax_matches_an_f64_reference() {
        let mut r = SeededRng::new(11, stream::DATA);
        // A positive scale takes the three-pass route (1 / sqrt(128) is not a power of two, so
        // the fused argument's rounding differs from the scaled score's), a negative one scales
        // first.
        let cases = SIZES.iter().copied().filter(|&n| n > 0).chain([4096]);
        let scales = [0.125f32, 1.0 / 128f32.sqrt(), -0.5];
        for (n, scale) in cases.flat_map(|n| scales.map(|s| (n, s))) {
            let x: Vec<f32> = (0..n).map(|_| (r.gaussian() * 8.0) as f32).collect();
            let mut p = x.clone();
            softmax_in_place(&mut p, scale);
            let scaled: Vec<f64> = x.iter().map(|&v| (v * scale) as f64).collect();
            let m = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scaled.iter().map(|v| (v - m).exp()).sum();
            // Each probability: exp within 4 eps, the sum within 77 eps (the bound of
            // `exp_affine_sum`'s test), the subtraction of the max exact in f32 up to one rounding
            // of the argument (|arg| · eps, arguments here below 64 in size), two multiplies.
            let eps = f32::EPSILON as f64;
            for ((&got, v), &xi) in p.iter().zip(&scaled).zip(&x) {
                let want = (v - m).exp() / z;
                let tol = (4.0 + 77.0 + 64.0 + 2.0) * eps * want + 1e-30;
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "n={n} scale={scale} x={xi}: {got} vs {want}"
                );
            }
        }
        let mut empty: [f32; 0] = [];
        softmax_in_place(&mut empty, 1.0);
    }

    /// The numerators and their sum are the softmax before its last pass: dividing by the sum
    /// (as a multiply by its reciprocal) gives the same bits; the largest score's numerator is 1.
    #[test]
    fn softmax_numerators_are_the_softmax_before_normalising() {
        let mut r = SeededRng::new(12, stream::DATA);
        for (n, scale) in [(1, 0.125f32), (17, -0.5), (300, 1.0 / 8.0f32.sqrt())] {
            let x: Vec<f32> = (0..n).map(|_| (r.gaussian() * 8.0) as f32).collect();
            let (mut e, mut p) = (x.clone(), x.clone());
            let sum = softmax_numerators(&mut e, scale);
            softmax_in_place(&mut p, scale);
            let inv = 1.0 / sum;
            for (a, b) in e.iter().zip(&p) {
                assert_eq!((a * inv).to_bits(), b.to_bits(), "n={n} scale={scale}");
            }
            let top = e.iter().copied().fold(0.0f32, f32::max);
            assert!((top - 1.0).abs() <= 4.0 * f32::EPSILON, "n={n}: {top}");
            // The sum is the numerators' (summed in f64 here; the kernel's lanes and f64 folds
            // round differently by a few ulp of the total).
            let total: f64 = e.iter().map(|&v| f64::from(v)).sum();
            assert!(
                (f64::from(sum) - total).abs() <= 8.0 * f64::from(f32::EPSILON) * total,
                "n={n}: {sum} vs {total}"
            );
        }
        assert_eq!(softmax_numerators(&mut [], 1.0), 0.0);
    }

    /// Every boundary count 0-15 (the binary search pads to `2^L - 1`), every size, values that
    /// tie a boundary exactly, lie beyond the ends, or are NaN / infinite: the codes equal the
    /// scalar twin's.
    #[test]
    fn count_below_parity() {
        for len in 0..=15usize {
            let mut bounds: Vec<f32> = data(len, 30 + len as u64);
            bounds.sort_by(f32::total_cmp);
            for n in SIZES {
                let mut ys = data(n, 3);
                for (i, y) in ys.iter_mut().enumerate() {
                    match i % 11 {
                        0 if len > 0 => *y = bounds[i % len],
                        1 => *y = f32::NAN,
                        2 => *y = f32::INFINITY,
                        3 => *y = f32::NEG_INFINITY,
                        4 => *y *= 10.0,
                        _ => {}
                    }
                }
                let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
                count_below(&bounds, &ys, &mut a);
                count_below_scalar(&bounds, &ys, &mut b);
                assert_eq!(a, b, "len={len} n={n}");
            }
        }
    }

    #[test]
    fn fwht_parity_and_involution() {
        for n in [1usize, 2, 4, 8, 16, 64, 128, 1024] {
            let x = data(n, 4);
            let (mut a, mut b) = (x.clone(), x.clone());
            fwht(&mut a);
            fwht_scalar(&mut b);
            assert_eq!(a, b);
            fwht(&mut a);
            for (u, v) in a.iter().zip(&x) {
                assert!((u / n as f32 - v).abs() < 1e-5 * (1.0 + v.abs()));
            }
        }
    }
}
