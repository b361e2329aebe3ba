//! The dense Haar rotation: Gaussian rows orthonormalised by CGS2, bit-identical everywhere.

use std::sync::Arc;

use crate::rng::{SeededRng, stream};
use crate::shared::WeakCache;

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
pub(super) fn shared_haar_matrix(d: usize, seed: u64) -> Arc<[f32]> {
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
