//! The `search` workload: maximum-inner-product search recall for TurboQuant against baselines
//! computed on the same data in the same run: exact float search, per-dimension uniform scalar
//! quantization (SQ) at the same bits, and product quantization (PQ) with k-means codebooks and
//! 256-entry look-up tables at the same bits per coordinate.
//!
//! Bits per vector count every stored scalar: TurboQuant's norm / scale, SQ's nothing (its per-
//! dimension ranges are global), PQ's nothing (codebooks are global).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use rayon::prelude::*;
use serde::Serialize;
use tq_core::{RotationKind, SeededRng, rng::stream, simd};
use tq_quant::{
    MseBatch, MseConfig, MseQuantizer, ProdBatch, ProdConfig, ProdQuantizer, ScaleMode, SketchKind,
};

use tq_bench::data::Vectors;

/// One method at one bit width.
#[derive(Debug, Clone, Serialize)]
pub struct SearchRow {
    /// `float`, `tq-mse`, `tq-prod`, `sq` or `pq`.
    pub method: String,
    /// Nominal bits per coordinate (32 for float).
    pub bits: u32,
    /// Stored bits per vector, scalars included.
    pub bits_per_vector: f64,
    /// Fraction of queries whose exact top-1 is among the method's top-k.
    pub recall_1_at_k: BTreeMap<String, f64>,
    /// Time to build the index (quantize / train), seconds.
    pub index_seconds: f64,
    /// Time to score all queries against all vectors and select top-k, seconds.
    pub search_seconds: f64,
}

/// Positions (0-based) of each query's exact top-1 in a method's ranking, capped at `kmax`.
fn recall(
    scores_of: impl Fn(usize, &mut [f32]) + Sync,
    n: usize,
    nq: usize,
    truth: &[usize],
    ks: &[usize],
) -> BTreeMap<String, f64> {
    let kmax = ks.iter().copied().max().unwrap_or(1).min(n);
    let found: Vec<Option<usize>> = (0..nq)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; n],
            |s, qi| {
                scores_of(qi, s);
                let t = s[truth[qi]];
                // rank = number of rows scoring strictly higher (ties resolved in its favour)
                let above = s.iter().filter(|&&v| v > t).count();
                (above < kmax).then_some(above)
            },
        )
        .collect();
    ks.iter()
        .map(|&k| {
            (
                k.to_string(),
                found.iter().filter(|f| f.is_some_and(|r| r < k)).count() as f64 / nq.max(1) as f64,
            )
        })
        .collect()
}

/// Exact top-1 of every query.
pub fn exact_top1(base: &Vectors, queries: &Vectors) -> Vec<usize> {
    (0..queries.rows)
        .into_par_iter()
        .map(|qi| {
            let q = queries.row(qi);
            (0..base.rows)
                .map(|i| (i, simd::dot(q, base.row(i))))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0, |(i, _)| i)
        })
        .collect()
}

/// Settings of one search run.
pub struct SearchSettings {
    pub bits: Vec<u32>,
    pub ks: Vec<usize>,
    pub rotation: RotationKind,
    pub scale: ScaleMode,
    pub seed: u64,
}

/// Runs every method at every bit width.
pub fn run(base: &Vectors, queries: &Vectors, s: &SearchSettings) -> Result<Vec<SearchRow>> {
    ensure!(s.ks.iter().all(|&k| k > 0), "--k values must be positive");
    let (n, d, nq) = (base.rows, base.dim, queries.rows);
    let truth = exact_top1(base, queries);
    let mut rows = Vec::new();
    let t = Instant::now();
    let rec = recall(
        |qi, out| (0..n).for_each(|i| out[i] = simd::dot(queries.row(qi), base.row(i))),
        n,
        nq,
        &truth,
        &s.ks,
    );
    rows.push(SearchRow {
        method: "float".into(),
        bits: 32,
        bits_per_vector: 32.0 * d as f64,
        recall_1_at_k: rec,
        index_seconds: 0.0,
        search_seconds: t.elapsed().as_secs_f64(),
    });
    for &b in &s.bits {
        // TurboQuant_mse
        let t = Instant::now();
        let q = Arc::new(MseQuantizer::new(
            MseConfig::new(d, b, s.rotation, s.seed).with_scale(s.scale),
        )?);
        let mut batch = MseBatch::new(q.clone());
        batch.extend(&base.data)?;
        let index_seconds = t.elapsed().as_secs_f64();
        let queries_prepared = (0..nq)
            .map(|i| q.prepare_query(queries.row(i)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let t = Instant::now();
        let rec = recall(
            |qi, out| drop(batch.score_into(&queries_prepared[qi], out)),
            n,
            nq,
            &truth,
            &s.ks,
        );
        rows.push(SearchRow {
            method: format!("tq-mse ({})", s.scale.name()),
            bits: b,
            bits_per_vector: 8.0 * batch.bytes_per_vector() as f64,
            recall_1_at_k: rec,
            index_seconds,
            search_seconds: t.elapsed().as_secs_f64(),
        });
        // TurboQuant_prod
        let t = Instant::now();
        let pq = Arc::new(ProdQuantizer::new(ProdConfig {
            dim: d,
            bits: b,
            rotation: s.rotation,
            sketch: SketchKind::Gaussian,
            seed: s.seed,
        })?);
        let mut pbatch = ProdBatch::new(pq.clone());
        pbatch.extend(&base.data)?;
        let index_seconds = t.elapsed().as_secs_f64();
        let prepared = (0..nq)
            .map(|i| pq.prepare_query(queries.row(i)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let t = Instant::now();
        let rec = recall(
            |qi, out| drop(pbatch.score_into(&prepared[qi], out)),
            n,
            nq,
            &truth,
            &s.ks,
        );
        rows.push(SearchRow {
            method: "tq-prod".into(),
            bits: b,
            bits_per_vector: 8.0 * pbatch.bytes_per_vector() as f64,
            recall_1_at_k: rec,
            index_seconds,
            search_seconds: t.elapsed().as_secs_f64(),
        });
        // Uniform scalar quantization
        let t = Instant::now();
        let sq = Sq::train(base, b);
        let codes = sq.encode(base);
        let index_seconds = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let rec = recall(
            |qi, out| sq.scores(queries.row(qi), &codes, out),
            n,
            nq,
            &truth,
            &s.ks,
        );
        rows.push(SearchRow {
            method: "sq".into(),
            bits: b,
            bits_per_vector: (b as usize * d) as f64,
            recall_1_at_k: rec,
            index_seconds,
            search_seconds: t.elapsed().as_secs_f64(),
        });
        // Product quantization, 256 centroids per sub-space
        if 8 % b == 0 {
            let t = Instant::now();
            let pq = Pq::train(base, (8 / b) as usize, s.seed);
            let codes = pq.encode(base);
            let index_seconds = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let rec = recall(
                |qi, out| pq.scores(queries.row(qi), &codes, out),
                n,
                nq,
                &truth,
                &s.ks,
            );
            rows.push(SearchRow {
                method: format!("pq {}x8", pq.subspaces.len()),
                bits: b,
                bits_per_vector: 8.0 * pq.subspaces.len() as f64,
                recall_1_at_k: rec,
                index_seconds,
                search_seconds: t.elapsed().as_secs_f64(),
            });
        }
    }
    Ok(rows)
}

/// Per-dimension uniform scalar quantization with ranges trained on the data.
struct Sq {
    bits: u32,
    lo: Vec<f32>,
    step: Vec<f32>,
}

impl Sq {
    fn train(base: &Vectors, bits: u32) -> Self {
        let d = base.dim;
        let (mut lo, mut hi) = (vec![f32::INFINITY; d], vec![f32::NEG_INFINITY; d]);
        for row in base.data.chunks_exact(d) {
            for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                *l = l.min(v);
                *h = h.max(v);
            }
        }
        let levels = ((1u32 << bits) - 1) as f32;
        let step = lo
            .iter()
            .zip(&hi)
            .map(|(l, h)| ((h - l) / levels).max(f32::MIN_POSITIVE))
            .collect();
        Self { bits, lo, step }
    }

    fn encode(&self, base: &Vectors) -> Vec<u8> {
        let max = ((1u32 << self.bits) - 1) as f32;
        base.data
            .chunks_exact(base.dim)
            .flat_map(|row| {
                row.iter()
                    .zip(&self.lo)
                    .zip(&self.step)
                    .map(move |((&v, &l), &s)| ((v - l) / s).round().clamp(0.0, max) as u8)
            })
            .collect()
    }

    /// `q · decode(row)` through a per-dimension table of `q_j · value`.
    fn scores(&self, q: &[f32], codes: &[u8], out: &mut [f32]) {
        let levels = 1usize << self.bits;
        let table: Vec<f32> = q
            .iter()
            .zip(&self.lo)
            .zip(&self.step)
            .flat_map(|((&qj, &l), &s)| (0..levels).map(move |k| qj * (l + s * k as f32)))
            .collect();
        let d = q.len();
        for (o, row) in out.iter_mut().zip(codes.chunks_exact(d)) {
            *o = row
                .iter()
                .enumerate()
                .map(|(j, &c)| table[j * levels + c as usize])
                .sum();
        }
    }
}

/// Product quantization: sub-spaces of `sub` coordinates (the last may be shorter), 256 k-means
/// centroids each (8-bit codes), scored with one 256-entry table per sub-space.
struct Pq {
    /// `(start, len, centroids)` with centroids row-major `256 × len`.
    subspaces: Vec<(usize, usize, Vec<f32>)>,
}

impl Pq {
    fn train(base: &Vectors, sub: usize, seed: u64) -> Self {
        let d = base.dim;
        let n = base.rows.min(20_000);
        let subspaces = (0..d.div_ceil(sub))
            .into_par_iter()
            .map(|m| {
                let (start, len) = (m * sub, sub.min(d - m * sub));
                let pts: Vec<f32> = (0..n)
                    .flat_map(|i| base.row(i)[start..start + len].to_vec())
                    .collect();
                (
                    start,
                    len,
                    kmeans(&pts, len, 256, 12, seed.wrapping_add(m as u64)),
                )
            })
            .collect();
        Self { subspaces }
    }

    fn encode(&self, base: &Vectors) -> Vec<u8> {
        let m = self.subspaces.len();
        let mut codes = vec![0u8; base.rows * m];
        codes
            .par_chunks_mut(m)
            .zip(base.data.par_chunks(base.dim))
            .for_each(|(c, row)| {
                for (o, (start, len, cents)) in c.iter_mut().zip(&self.subspaces) {
                    *o = nearest(&row[*start..start + len], cents, *len) as u8;
                }
            });
        codes
    }

    fn scores(&self, q: &[f32], codes: &[u8], out: &mut [f32]) {
        let m = self.subspaces.len();
        let table: Vec<f32> = self
            .subspaces
            .iter()
            .flat_map(|(start, len, cents)| {
                cents
                    .chunks_exact(*len)
                    .map(move |c| simd::dot_scalar(&q[*start..start + len], c))
            })
            .collect();
        for (o, row) in out.iter_mut().zip(codes.chunks_exact(m)) {
            *o = row
                .iter()
                .enumerate()
                .map(|(s, &c)| table[s * 256 + c as usize])
                .sum();
        }
    }
}

fn nearest(x: &[f32], cents: &[f32], len: usize) -> usize {
    cents
        .chunks_exact(len)
        .enumerate()
        .map(|(i, c)| {
            (
                i,
                x.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
            )
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0, |(i, _)| i)
}

/// Lloyd's k-means on `pts` (row-major, `len` wide) from `k` seeded distinct samples.
fn kmeans(pts: &[f32], len: usize, k: usize, iters: usize, seed: u64) -> Vec<f32> {
    let n = pts.len() / len;
    let mut r = SeededRng::new(seed, stream::DATA);
    let perm = r.permutation(n);
    let mut cents: Vec<f32> = (0..k)
        .flat_map(|i| pts[(perm[i % n] as usize) * len..(perm[i % n] as usize + 1) * len].to_vec())
        .collect();
    let mut assign = vec![0usize; n];
    for _ in 0..iters {
        for (a, p) in assign.iter_mut().zip(pts.chunks_exact(len)) {
            *a = nearest(p, &cents, len);
        }
        let mut sum = vec![0f64; k * len];
        let mut count = vec![0usize; k];
        for (&a, p) in assign.iter().zip(pts.chunks_exact(len)) {
            count[a] += 1;
            for (s, &v) in sum[a * len..(a + 1) * len].iter_mut().zip(p) {
                *s += v as f64;
            }
        }
        for c in 0..k {
            if count[c] > 0 {
                for j in 0..len {
                    cents[c * len + j] = (sum[c * len + j] / count[c] as f64) as f32;
                }
            }
        }
    }
    cents
}
