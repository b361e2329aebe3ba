//! The KV-cache workloads: `trace` (attention quality on a K/V trace) and `attention` (decode-step
//! speed against an f32 baseline).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use half::f16;
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;
use tq_core::{SeededRng, half_simd, rng::stream, simd};
use tq_kv::{
    HeadCalibration, HeadConfig, KeyStrategy, KvTrace, MultiHeadCache, OutlierChoice, ValueStrategy,
};

/// Attention metrics of one configuration (overall or for one layer).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttentionMetrics {
    /// Mean `‖õ - o‖ / ‖o‖` of the attention outputs.
    pub output_rel_error: f64,
    /// Root mean square error of the scaled scores `q·k/sqrt(d)` over all attended tokens.
    pub score_rmse: f64,
    /// Largest absolute score error.
    pub max_score_error: f64,
    /// Fraction of queries whose highest-scoring token is unchanged.
    pub top1_agreement: f64,
    /// Mean overlap of the top-8 tokens (fraction).
    pub topk_overlap: f64,
    /// Mean `KL(p_exact ‖ p_quantized)` of the attention distributions (nats).
    pub kl_divergence: f64,
}

#[derive(Default)]
struct Acc {
    n: usize,
    rel: f64,
    se: f64,
    se_n: usize,
    max: f64,
    top1: usize,
    topk: f64,
    kl: f64,
}

impl Acc {
    fn add(&mut self, o: &Acc) {
        self.n += o.n;
        self.rel += o.rel;
        self.se += o.se;
        self.se_n += o.se_n;
        self.max = self.max.max(o.max);
        self.top1 += o.top1;
        self.topk += o.topk;
        self.kl += o.kl;
    }
    fn metrics(&self) -> AttentionMetrics {
        let n = self.n.max(1) as f64;
        AttentionMetrics {
            output_rel_error: self.rel / n,
            score_rmse: (self.se / self.se_n.max(1) as f64).sqrt(),
            max_score_error: self.max,
            top1_agreement: self.top1 as f64 / n,
            topk_overlap: self.topk / n,
            kl_divergence: self.kl / n,
        }
    }
}

/// One `trace` result row.
#[derive(Debug, Clone, Serialize)]
pub struct TraceRow {
    pub key_bits: f64,
    pub value_bits: f64,
    pub key_precision: String,
    pub value_precision: String,
    pub key_strategy: KeyStrategy,
    pub value_strategy: ValueStrategy,
    /// KIVI's group size, when keys or values use KIVI.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// Per-vector scalar of the MSE keys and values.
    pub scale: tq_quant::ScaleMode,
    /// Stored width of that scalar (`f32`, `f16`).
    pub scale_precision: tq_quant::ScalePrecision,
    /// Keys and values centred on per-head means.
    pub centered: bool,
    pub window: usize,
    /// First tokens kept unquantized for good.
    pub sink: usize,
    /// Stored width of the sink and window rows (`f32`, `f16`).
    pub window_precision: tq_kv::WindowPrecision,
    #[serde(flatten)]
    pub overall: AttentionMetrics,
    /// `f16_bytes / cache_bytes`: how many times smaller than an f16 cache.
    pub memory_ratio_vs_f16: f64,
    /// Stored bits per cached coordinate over keys and values: codes, every scale and zero, and
    /// rows held unquantized (window, KIVI residual) at their width.
    pub bits_per_coordinate: f64,
    pub cache_bytes: usize,
    pub f16_bytes: usize,
    pub per_layer: Vec<BTreeMap<String, f64>>,
}

const TOPK: usize = 8;

fn softmax(s: &[f64]) -> Vec<f64> {
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

fn top_indices(s: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..s.len()).collect();
    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Builds one layer's cache for a configuration.
fn layer_cache(
    trace: &KvTrace,
    layer: usize,
    cfg: &HeadConfig,
    split: &OutlierChoice,
) -> Result<MultiHeadCache> {
    let outliers = (0..trace.kv_heads)
        .map(|h| {
            HeadCalibration::from_samples(
                cfg,
                trace.keys_of(layer, h),
                trace.values_of(layer, h),
                split,
            )
            .with_context(|| format!("calibrating layer {layer} with --split {split}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut cache = MultiHeadCache::new(trace.q_heads, trace.kv_heads, cfg, &outliers)?;
    let s = trace.kv_heads * trace.tokens * trace.head_dim;
    cache.append(
        &trace.keys[layer * s..(layer + 1) * s],
        &trace.values[layer * s..(layer + 1) * s],
    )?;
    Ok(cache)
}

/// Replays every query of every head of `trace` against a quantized cache built with `cfg`.
pub fn eval_trace(
    trace: &KvTrace,
    cfg: &HeadConfig,
    split: &OutlierChoice,
    progress: &ProgressBar,
) -> Result<TraceRow> {
    let d = trace.head_dim;
    let group = trace.q_heads / trace.kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut total = Acc::default();
    let mut per_layer = Vec::new();
    let (mut cache_bytes, mut f16_bytes) = (0, 0);
    for layer in 0..trace.layers {
        let cache = layer_cache(trace, layer, cfg, split)?;
        cache_bytes += cache.memory_bytes();
        f16_bytes += cache.f16_bytes();
        let jobs: Vec<(usize, usize)> = (0..trace.q_heads)
            .flat_map(|h| (0..trace.n_queries()).map(move |i| (h, i)))
            .collect();
        let accs: Vec<Acc> = jobs
            .par_iter()
            .map(|&(h, i)| -> Result<Acc> {
                let kv = h / group;
                let head = cache.head(kv).context("kv head")?;
                let keys = trace.keys_of(layer, kv);
                let values = trace.values_of(layer, kv);
                let q = &trace.queries_of(layer, h)[i * d..(i + 1) * d];
                let p = trace.query_positions[i];
                let exact: Vec<f64> = keys
                    .chunks_exact(d)
                    .take(p)
                    .map(|k| {
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mut qs = vec![0f32; head.len()];
                head.scores(q, &mut qs)?;
                let quant: Vec<f64> = qs[..p].iter().map(|&x| x as f64).collect();
                let (pe, pq) = (softmax(&exact), softmax(&quant));
                let mut o = vec![0f64; d];
                for (w, v) in pe.iter().zip(values.chunks_exact(d)) {
                    for (a, &x) in o.iter_mut().zip(v) {
                        *a += w * x as f64;
                    }
                }
                let mut oq = vec![0f32; d];
                head.attend_block(q, &[p], &mut oq)?;
                let num: f64 = o
                    .iter()
                    .zip(&oq)
                    .map(|(a, &b)| (a - b as f64).powi(2))
                    .sum();
                let den: f64 = o.iter().map(|a| a * a).sum::<f64>().max(1e-300);
                let mut acc = Acc {
                    n: 1,
                    rel: (num / den).sqrt(),
                    se_n: p,
                    ..Acc::default()
                };
                for (a, b) in exact.iter().zip(&quant) {
                    let e = (a - b).abs();
                    acc.se += e * e;
                    acc.max = acc.max.max(e);
                }
                let (te, tq) = (
                    top_indices(&exact, TOPK.min(p)),
                    top_indices(&quant, TOPK.min(p)),
                );
                acc.top1 = (te[0] == tq[0]) as usize;
                acc.topk = te.iter().filter(|i| tq.contains(i)).count() as f64 / te.len() as f64;
                acc.kl = pe
                    .iter()
                    .zip(&pq)
                    .filter(|(a, _)| **a > 0.0)
                    .map(|(a, b)| a * (a.ln() - b.max(1e-300).ln()))
                    .sum::<f64>()
                    .max(0.0);
                progress.inc(1);
                Ok(acc)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut layer_acc = Acc::default();
        accs.iter().for_each(|a| layer_acc.add(a));
        let m = layer_acc.metrics();
        let mut row = BTreeMap::new();
        row.insert("layer".to_string(), layer as f64);
        row.insert("output_rel_error".to_string(), m.output_rel_error);
        row.insert("score_rmse".to_string(), m.score_rmse);
        row.insert("top1_agreement".to_string(), m.top1_agreement);
        row.insert("topk_overlap".to_string(), m.topk_overlap);
        row.insert("kl_divergence".to_string(), m.kl_divergence);
        per_layer.push(row);
        total.add(&layer_acc);
    }
    Ok(TraceRow {
        key_bits: cfg.key_precision.bits_per_coordinate(d),
        value_bits: cfg.value_precision.bits_per_coordinate(d),
        key_precision: cfg.key_precision.to_string(),
        value_precision: cfg.value_precision.to_string(),
        key_strategy: cfg.key_strategy,
        value_strategy: cfg.value_strategy,
        group: uses_groups(cfg).then_some(cfg.group),
        scale: cfg.scale,
        scale_precision: cfg.scale_precision,
        centered: cfg.center,
        window: cfg.window,
        sink: cfg.sink,
        window_precision: cfg.window_precision,
        overall: total.metrics(),
        memory_ratio_vs_f16: f16_bytes as f64 / cache_bytes.max(1) as f64,
        bits_per_coordinate: 16.0 * cache_bytes as f64 / f16_bytes.max(1) as f64,
        cache_bytes,
        f16_bytes,
        per_layer,
    })
}

/// `true` when keys or values use a grouped strategy (KIVI, gmse: the group size matters).
pub fn uses_groups(cfg: &HeadConfig) -> bool {
    matches!(cfg.key_strategy, KeyStrategy::Kivi | KeyStrategy::Gmse)
        || matches!(
            cfg.value_strategy,
            ValueStrategy::Kivi | ValueStrategy::Gmse
        )
}

/// One `attention` result row.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionRow {
    /// The named configuration (`--config`) the cache was built with, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<&'static str>,
    pub tokens: usize,
    pub bits: f64,
    pub key_strategy: KeyStrategy,
    pub value_strategy: ValueStrategy,
    /// KIVI's group size, when keys or values use KIVI.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// Stored width of the MSE streams' per-vector scales (`f32`, `f16`).
    pub scale_precision: tq_quant::ScalePrecision,
    /// Stored bits per cached coordinate (codes, scales, zeros, residual rows).
    pub bits_per_coordinate: f64,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
    /// Independent caches the timed steps cycle through (`--layers`), each step reading one.
    pub layers: usize,
    /// Worker threads of this row.
    pub threads: usize,
    /// One decode step (one query per head) with the f32 baseline (median over timing rounds).
    pub f32_seconds_per_query: f64,
    /// The same step with the f16 baseline (rows widened to f32 as they are read).
    pub f16_seconds_per_query: f64,
    /// The same step on the quantized cache.
    pub quantized_seconds_per_query: f64,
    /// `f32_seconds_per_query / quantized_seconds_per_query`.
    pub speedup: f64,
    /// `f16_seconds_per_query / quantized_seconds_per_query`.
    pub f16_speedup: f64,
    pub cache_bytes: usize,
    pub f16_bytes: usize,
    pub f32_bytes: usize,
}

/// What a dense baseline cache stores per coordinate: `f32`, or binary16 bit patterns (`u16`)
/// widened to f32 in registers as they are read (F16C where the CPU has it).
trait DenseElem: Sync + Sized {
    fn dot(q: &[f32], k: &[Self]) -> f32;
    fn axpy(a: f32, x: &[Self], y: &mut [f32]);
}

impl DenseElem for f32 {
    fn dot(q: &[f32], k: &[f32]) -> f32 {
        simd::dot(q, k)
    }
    fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        simd::axpy(a, x, y)
    }
}

impl DenseElem for u16 {
    fn dot(q: &[f32], k: &[u16]) -> f32 {
        half_simd::dot(q, k)
    }
    fn axpy(a: f32, x: &[u16], y: &mut [f32]) {
        half_simd::axpy(a, x, y)
    }
}

/// Dense decode attention for one head: SIMD dot products over contiguous keys, the same SIMD
/// softmax as the quantized cache's, SIMD axpy over contiguous values.
fn dense_attend<T: DenseElem>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    out: &mut [f32],
    scores: &mut [f32],
) {
    let d = q.len();
    let scale = 1.0 / (d as f32).sqrt();
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(d)) {
        *s = T::dot(q, k);
    }
    simd::softmax_in_place(scores, scale);
    out.fill(0.0);
    for (s, v) in scores.iter().zip(values.chunks_exact(d)) {
        T::axpy(*s, v, out);
    }
}

/// One decode step of a dense baseline cache: query head `h` (`out`'s chunk `h`) attends with
/// [`dense_attend`] over kv head `h / group` of `keys` and `values` (`[kv_heads, T, d]`, `d` the
/// head dimension), heads in parallel on the current rayon pool.
fn dense_step<T: DenseElem>(
    queries: &[f32],
    keys: &[T],
    values: &[T],
    d: usize,
    group: usize,
    out: &mut [f32],
) {
    let kv_heads = (out.len() / d / group).max(1);
    let per = keys.len() / kv_heads;
    let tokens = per / d;
    out.par_chunks_mut(d).enumerate().for_each_init(
        || vec![0.0f32; tokens],
        |scores, (h, o)| {
            let kv = h / group;
            dense_attend(
                &queries[h * d..(h + 1) * d],
                &keys[kv * per..(kv + 1) * per],
                &values[kv * per..(kv + 1) * per],
                o,
                scores,
            )
        },
    );
}

/// Times the closures in alternating rounds until `budget` seconds per closure have passed and at
/// least 7 rounds ran (each round runs every closure `reps` times, `reps` chosen so the slowest
/// takes about 5 ms); returns each closure's median seconds per run over the rounds. Alternating
/// gives every closure the same machine state, and the median drops rounds disturbed by other
/// load, so ratios between the closures hold on a noisy machine.
fn time_interleaved(budget: f64, fs: &mut [&mut dyn FnMut() -> Result<()>]) -> Result<Vec<f64>> {
    let mut slowest = 1e-9f64;
    for f in fs.iter_mut() {
        let t = Instant::now();
        f()?;
        slowest = slowest.max(t.elapsed().as_secs_f64());
    }
    let reps = ((0.005 / slowest).ceil() as usize).clamp(1, 100_000);
    let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); fs.len()];
    let start = Instant::now();
    let total = budget * fs.len() as f64;
    while rounds[0].len() < 7 || start.elapsed().as_secs_f64() < total {
        for (f, r) in fs.iter_mut().zip(rounds.iter_mut()) {
            let t = Instant::now();
            for _ in 0..reps {
                f()?;
            }
            r.push(t.elapsed().as_secs_f64() / reps as f64);
        }
    }
    Ok(rounds
        .into_iter()
        .map(|mut r| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        })
        .collect())
}

/// One layer of the `attention` workload: a quantized cache and the dense baselines of the same
/// generated tokens.
struct AttentionLayer {
    cache: MultiHeadCache,
    keys: Vec<f32>,
    values: Vec<f32>,
    keys16: Vec<u16>,
    values16: Vec<u16>,
}

/// Decode-step attention over `tokens` random cached tokens for `heads` query heads sharing
/// `kv_heads` kv heads, each head's cache configured by `cfg` (its dimension, precisions,
/// strategies and seed). With `layers > 1` each cache (quantized, f32, f16) has that many
/// independent copies of its own generated tokens and the timed steps cycle through them, as a
/// decoder's layers do: once the copies outgrow the CPU's last-level cache, every step reads its
/// cache from memory. The row's times are per step (one layer). Layer 0 holds the tokens a
/// one-layer run generates.
pub fn eval_attention(
    cfg: &HeadConfig,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    budget: f64,
) -> Result<AttentionRow> {
    let (dim, seed) = (cfg.head_dim, cfg.seed);
    ensure!(
        tokens > 0 && heads > 0 && kv_heads > 0 && layers > 0,
        "tokens, heads and layers must be positive"
    );
    ensure!(
        heads.is_multiple_of(kv_heads),
        "--heads {heads} is not a multiple of --kv-heads {kv_heads}"
    );
    let group = heads / kv_heads;
    let mut r = SeededRng::new(seed, stream::DATA);
    let n = kv_heads * tokens * dim;
    let mut queries = Vec::new();
    let mut all = Vec::with_capacity(layers);
    for layer in 0..layers {
        let keys: Vec<f32> = (0..n).map(|_| r.gaussian() as f32).collect();
        let values: Vec<f32> = (0..n).map(|_| r.gaussian() as f32).collect();
        if layer == 0 {
            queries = (0..heads * dim).map(|_| r.gaussian() as f32).collect();
        }
        // One calibration per kv head (the caches hold kv heads; query heads share them).
        let outliers = (0..kv_heads)
            .map(|h| {
                let rows = h * tokens * dim..(h + 1) * tokens * dim;
                HeadCalibration::from_samples(
                    cfg,
                    &keys[rows.clone()],
                    &values[rows],
                    &OutlierChoice::Auto,
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut cache = MultiHeadCache::new(heads, kv_heads, cfg, &outliers)?;
        cache.append(&keys, &values)?;
        let half =
            |x: &[f32]| -> Vec<u16> { x.iter().map(|&x| f16::from_f32(x).to_bits()).collect() };
        all.push(AttentionLayer {
            cache,
            keys16: half(&keys),
            values16: half(&values),
            keys,
            values,
        });
    }
    let (mut out, mut f32_out, mut f16_out) = (
        vec![0.0f32; heads * dim],
        vec![0.0f32; heads * dim],
        vec![0.0f32; heads * dim],
    );
    // Each closure steps through the layers in turn.
    fn next<'a>(layers: &'a [AttentionLayer], at: &mut usize) -> &'a AttentionLayer {
        let l = &layers[*at];
        *at = (*at + 1) % layers.len();
        l
    }
    let (mut at_q, mut at_32, mut at_16) = (0, 0, 0);
    let mut quantized = || Ok(next(&all, &mut at_q).cache.attend(&queries, &mut out)?);
    let mut f32_run = || {
        let l = next(&all, &mut at_32);
        dense_step(&queries, &l.keys, &l.values, dim, group, &mut f32_out);
        Ok(())
    };
    let mut f16_run = || {
        let l = next(&all, &mut at_16);
        dense_step(&queries, &l.keys16, &l.values16, dim, group, &mut f16_out);
        Ok(())
    };
    let times = time_interleaved(budget, &mut [&mut quantized, &mut f32_run, &mut f16_run])?;
    let (quantized, f32_time, f16_time) = (times[0], times[1], times[2]);
    let cache = &all[0].cache;
    Ok(AttentionRow {
        config: None,
        tokens,
        bits: cfg.key_precision.bits_per_coordinate(dim),
        key_strategy: cfg.key_strategy,
        value_strategy: cfg.value_strategy,
        group: uses_groups(cfg).then_some(cfg.group),
        scale_precision: cfg.scale_precision,
        bits_per_coordinate: 16.0 * cache.memory_bytes() as f64 / cache.f16_bytes().max(1) as f64,
        heads,
        kv_heads,
        dim,
        layers,
        threads: rayon::current_num_threads(),
        f32_seconds_per_query: f32_time,
        f16_seconds_per_query: f16_time,
        quantized_seconds_per_query: quantized,
        speedup: f32_time / quantized,
        f16_speedup: f16_time / quantized,
        cache_bytes: cache.memory_bytes(),
        f16_bytes: cache.f16_bytes(),
        f32_bytes: 2 * n * 4,
    })
}
