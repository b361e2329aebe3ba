//! Dot products and axpy over IEEE binary16 rows (stored as their `u16` bit patterns) widened to
//! f32 as they are read: F16C + FMA on x86-64 CPUs that have them, a portable twin elsewhere. The
//! f16 reference caches that quantized caches are measured against use them, and the quantized
//! caches widen their stored f16 parameters (e.g. KIVI's per-channel scales) with [`widen`].

/// The f32 value of the binary16 bit pattern `h` (exact: every f16 is an f32; a NaN keeps its
/// sign and payload and comes out quiet, as F16C's `vcvtph2ps` gives it).
pub fn to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    match exp {
        // Zero and subnormals: man · 2^-24.
        0 => {
            (man as f32 * f32::from_bits(0x3380_0000)).copysign(f32::from_bits(sign | 0x3f80_0000))
        }
        31 if man != 0 => f32::from_bits(sign | 0x7fc0_0000 | (man << 13)),
        31 => f32::from_bits(sign | 0x7f80_0000),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// `Σ_i q_i · k_i` with `k` binary16 bit patterns, over `min(q.len(), k.len())` entries. O(n).
pub fn dot(q: &[f32], k: &[u16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_f16c() {
            // SAFETY: AVX2, FMA and F16C are present (checked at run time).
            return unsafe { x86::dot(q, k) };
        }
    }
    dot_scalar(q, k)
}

/// Portable twin of [`dot`] (sequential sum).
pub fn dot_scalar(q: &[f32], k: &[u16]) -> f32 {
    q.iter().zip(k).map(|(&a, &b)| a * to_f32(b)).sum()
}

/// `y_i += a · x_i` with `x` binary16 bit patterns, over `min(x.len(), y.len())` entries. O(n).
pub fn axpy(a: f32, x: &[u16], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_f16c() {
            // SAFETY: AVX2, FMA and F16C are present (checked at run time).
            unsafe { x86::axpy(a, x, y) };
            return;
        }
    }
    axpy_scalar(a, x, y)
}

/// Portable twin of [`axpy`] (one fused multiply-add per entry, like the SIMD path).
pub fn axpy_scalar(a: f32, x: &[u16], y: &mut [f32]) {
    for (o, &b) in y.iter_mut().zip(x) {
        *o = a.mul_add(to_f32(b), *o);
    }
}

/// `out[i] = to_f32(h[i])` over `min(h.len(), out.len())` entries: exact (every f16 is an f32),
/// so bit-identical to [`widen_scalar`]; eight entries per `vcvtph2ps` with F16C. O(n).
pub fn widen(h: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_f16c() {
            // SAFETY: AVX2, FMA and F16C are present (checked at run time).
            unsafe { x86::widen(h, out) };
            return;
        }
    }
    widen_scalar(h, out)
}

/// Portable twin of [`widen`].
pub fn widen_scalar(h: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(h) {
        *o = to_f32(b);
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        !cfg!(miri)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(q: &[f32], k: &[u16]) -> f32 {
        let n = q.len().min(k.len());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads entries `i..i + 8 <= n` of both slices.
        unsafe {
            while i + 32 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let j = i + 8 * u;
                    let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(j) as *const __m128i));
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(j)), kv, *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), kv, acc[0]);
                i += 8;
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        let x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
        _mm_cvtss_f32(x) + super::dot_scalar(&q[i..n], &k[i..n])
    }

    /// # Safety
    /// The CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy(a: f32, x: &[u16], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        // SAFETY: every load and store touches entries `i..i + 8 <= n` of both slices.
        unsafe {
            while i + 8 <= n {
                let xv = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i));
                let p = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(p)));
                i += 8;
            }
        }
        super::axpy_scalar(a, &x[i..n], &mut y[i..n]);
    }

    /// # Safety
    /// The CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen(h: &[u16], out: &mut [f32]) {
        let n = h.len().min(out.len());
        let mut i = 0;
        // SAFETY: every load and store touches entries `i..i + 8 <= n` of both slices.
        unsafe {
            while i + 8 <= n {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().add(i) as *const __m128i));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
                i += 8;
            }
        }
        super::widen_scalar(&h[i..n], &mut out[i..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{SeededRng, stream};

    #[test]
    fn to_f32_is_exact_on_every_pattern_class() {
        // 1.0, -2.0, 65504 (max), 2^-14 (min normal), 2^-24 (min subnormal), -0, inf, NaN.
        assert_eq!(to_f32(0x3c00), 1.0);
        assert_eq!(to_f32(0xc000), -2.0);
        assert_eq!(to_f32(0x7bff), 65504.0);
        assert_eq!(to_f32(0x0400), 2f32.powi(-14));
        assert_eq!(to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(to_f32(0x83ff), -1023.0 * 2f32.powi(-24));
        assert_eq!(to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(to_f32(0x7c00), f32::INFINITY);
        assert!(to_f32(0x7e00).is_nan());
        // A signalling NaN comes out quiet with its payload, as from `vcvtph2ps`.
        assert_eq!(to_f32(0xfd00).to_bits(), 0xffe0_0000);
    }

    #[test]
    fn simd_paths_match_their_twins_on_awkward_lengths() {
        let mut r = SeededRng::new(5, stream::DATA);
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 64, 100, 129] {
            let q: Vec<f32> = (0..n).map(|_| r.gaussian() as f32).collect();
            // Finite f16 patterns of moderate size (exponent field 10..20).
            let k: Vec<u16> = (0..n)
                .map(|_| {
                    let v = r.next_u64();
                    (v as u16 & 0x83ff) | (((10 + v % 11) as u16) << 10)
                })
                .collect();
            let (a, b) = (dot(&q, &k), dot_scalar(&q, &k));
            let mag: f32 = q.iter().zip(&k).map(|(x, &y)| (x * to_f32(y)).abs()).sum();
            // Two summation orders of n products: each is within n·eps·Σ|q·k| of the exact sum.
            let tol = 2.0 * n as f32 * f32::EPSILON * mag;
            assert!((a - b).abs() <= tol, "n={n}: {a} vs {b}");
            let (mut y1, mut y2) = (q.clone(), q.clone());
            axpy(0.75, &k, &mut y1);
            axpy_scalar(0.75, &k, &mut y2);
            assert_eq!(y1, y2, "n={n}");
            // Every pattern class, NaN payloads and subnormals included, bit for bit.
            let all: Vec<u16> = (0..n).map(|_| r.next_u64() as u16).collect();
            let (mut w1, mut w2) = (vec![0.5f32; n + 1], vec![0.5f32; n + 1]);
            widen(&all, &mut w1);
            widen_scalar(&all, &mut w2);
            let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&w1), bits(&w2), "n={n}");
            assert_eq!(w1[n], 0.5, "n={n}: past the input");
        }
    }
}
