//! AVX transposes of 8 rows into lanes and back, and the butterfly passes over the transposed
//! rows, for the Hadamard path: the rotation's only unsafe code.

use super::LANES;
use super::hadamard::Post;
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

/// Butterfly stages `h, 2h, .., (R/2)h` of the transposed block transform, each element one
/// register: the AVX twin of `hadamard::radix_pass` (same operations in the same order, so
/// bit-identical). `pre` multiplies each element as it is loaded, `post` as it is stored.
///
/// # Safety
/// The CPU supports AVX, `R` is a power of two, `x.len()` is a multiple of `R · h`, and `pre` and
/// the signs of `Post::Signs`, when given, hold at least `x.len()` values.
#[target_feature(enable = "avx")]
pub(super) unsafe fn radix_pass<const R: usize>(
    x: &mut [[f32; LANES]],
    h: usize,
    pre: Option<&[f32]>,
    post: Post<'_>,
) {
    let n = x.len();
    debug_assert!(n.is_multiple_of(R * h));
    debug_assert!(pre.is_none_or(|s| s.len() >= n));
    debug_assert!(!matches!(post, Post::Signs(s) if s.len() < n));
    let p = x.as_mut_ptr() as *mut f32;
    if h == 1 {
        // Consecutive elements: constant offsets from one pointer (the general loop below keeps
        // one induction pointer per element and spills them).
        for j in (0..n).step_by(R) {
            // SAFETY: elements j..j + R < n, as the caller guarantees.
            unsafe { butterflies::<R>(p, j, 1, pre, post) };
        }
    } else {
        for base in (0..n).step_by(R * h) {
            for j in base..base + h {
                // SAFETY: elements j + k·h < base + R·h <= n.
                unsafe { butterflies::<R>(p, j, h, pre, post) };
            }
        }
    }
}

/// The `R`-point butterfly on elements `j, j + h, .., j + (R - 1)·h` of the transposed rows at
/// `p` (8 floats each), with `pre` / `post` as in [`radix_pass`].
///
/// # Safety
/// AVX (it is inlined into `radix_pass`, whose target features it takes); those elements, and
/// the signs at the same indices, are in bounds.
#[inline(always)]
unsafe fn butterflies<const R: usize>(
    p: *mut f32,
    j: usize,
    h: usize,
    pre: Option<&[f32]>,
    post: Post<'_>,
) {
    // SAFETY: AVX is enabled in the caller this is inlined into; elements `j + k·h` and their
    // signs are in bounds by the caller's contract.
    unsafe {
        let mut v = [_mm256_setzero_ps(); R];
        for (k, vk) in v.iter_mut().enumerate() {
            *vk = _mm256_loadu_ps(p.add((j + k * h) * LANES));
            if let Some(s) = pre {
                let s = *s.get_unchecked(j + k * h);
                *vk = _mm256_mul_ps(*vk, _mm256_set1_ps(s));
            }
        }
        let mut span = 1;
        while span < R {
            for k in 0..R {
                if k & span == 0 {
                    let (a, c) = (v[k], v[k + span]);
                    v[k] = _mm256_add_ps(a, c);
                    v[k + span] = _mm256_sub_ps(a, c);
                }
            }
            span *= 2;
        }
        for (k, vk) in v.iter().enumerate() {
            let out = match post {
                Post::None => *vk,
                Post::Scale(s) => _mm256_mul_ps(*vk, _mm256_set1_ps(s)),
                Post::Signs(s) => {
                    let s = *s.get_unchecked(j + k * h);
                    _mm256_mul_ps(*vk, _mm256_set1_ps(s))
                }
            };
            _mm256_storeu_ps(p.add((j + k * h) * LANES), out);
        }
    }
}
