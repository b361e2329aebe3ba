//! Batch quantization and scoring benchmarks (d = 128 and the "ugly" d = 200).
//!
//! Run with `cargo bench -p tq-quant`. Scoring uses a pool of 1 M vectors (68 MB of codes at
//! 4 bits), larger than the caches, so the numbers include streaming codes from memory.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_quant::{
    AnyQuantizer, Index, Metric, MseBatch, MseConfig, MseQuantizer, ProdBatch, ProdConfig,
    ProdQuantizer, ScaleMode, SketchKind,
};

fn gaussians(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n).map(|_| r.gaussian() as f32).collect()
}

fn one_thread<R>(f: impl FnOnce() -> R + Send) -> R
where
    R: Send,
{
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool")
        .install(f)
}

fn quantize(c: &mut Criterion) {
    let mut g = c.benchmark_group("quantize_1thread");
    let n = 32 * 1024;
    for d in [128usize, 200] {
        let xs = gaussians(n * d, 1);
        g.throughput(Throughput::Elements(n as u64));
        for rotation in [RotationKind::Hadamard, RotationKind::Haar] {
            let q = Arc::new(MseQuantizer::new(MseConfig::new(d, 4, rotation, 1)).expect("config"));
            g.bench_with_input(
                BenchmarkId::new(format!("mse4_{}", rotation.name()), d),
                &d,
                |b, _| {
                    b.iter(|| {
                        one_thread(|| {
                            let mut batch = MseBatch::new(q.clone());
                            batch.extend(black_box(&xs)).expect("valid");
                            batch
                        })
                    })
                },
            );
        }
        let pq = Arc::new(
            ProdQuantizer::new(ProdConfig {
                dim: d,
                bits: 4,
                rotation: RotationKind::Hadamard,
                sketch: SketchKind::Gaussian,
                seed: 1,
            })
            .expect("config"),
        );
        g.bench_with_input(BenchmarkId::new("prod4_hadamard", d), &d, |b, _| {
            b.iter(|| {
                one_thread(|| {
                    let mut batch = ProdBatch::new(pq.clone());
                    batch.extend(black_box(&xs)).expect("valid");
                    batch
                })
            })
        });
    }
    g.finish();
}

fn score(c: &mut Criterion) {
    let mut g = c.benchmark_group("score_1thread");
    let d = 128;
    let n = 1 << 20;
    let xs = gaussians(n * d, 2);
    let qv = gaussians(d, 3);
    g.throughput(Throughput::Elements(n as u64));
    for bits in [2u32, 3, 4] {
        let q = Arc::new(
            MseQuantizer::new(MseConfig::new(d, bits, RotationKind::Hadamard, 1)).expect("config"),
        );
        let mut batch = MseBatch::new(q.clone());
        batch.extend(&xs).expect("valid");
        let query = q.prepare_query(&qv).expect("valid");
        let mut out = vec![0.0; n];
        g.bench_function(BenchmarkId::new("mse_fast", bits), |b| {
            b.iter(|| one_thread(|| batch.score_into(black_box(&query), &mut out)))
        });
        if bits == 4 {
            g.bench_function(BenchmarkId::new("mse_exact", bits), |b| {
                b.iter(|| one_thread(|| batch.score_exact_into(black_box(&query), &mut out)))
            });
        }
    }
    for bits in [2u32, 4] {
        let cfg = ProdConfig {
            dim: d,
            bits,
            rotation: RotationKind::Hadamard,
            sketch: SketchKind::Gaussian,
            seed: 1,
        };
        let q = Arc::new(ProdQuantizer::new(cfg).expect("config"));
        let mut batch = ProdBatch::new(q.clone());
        batch.extend(&xs).expect("valid");
        let query = q.prepare_query(&qv).expect("valid");
        let mut out = vec![0.0; n];
        g.bench_function(BenchmarkId::new("prod_fast", bits), |b| {
            b.iter(|| one_thread(|| batch.score_into(black_box(&query), &mut out)))
        });
    }
    g.finish();
}

/// Many-query search through [`Index`] at GloVe's shape (d = 50, 100 000 vectors, 4 bits, 1 000
/// queries, k = 10, one thread): codes stay in cache, so the scan, the per-query set-up and the
/// selection set the rate. Throughput is queries.
fn index_search(c: &mut Criterion) {
    let mut g = c.benchmark_group("index_search_1thread");
    let (d, n, nq) = (50usize, 100_000usize, 1000usize);
    let xs = gaussians(n * d, 4);
    let qs = gaussians(nq * d, 5);
    let mut cfg = MseConfig::new(d, 4, RotationKind::Hadamard, 1);
    cfg.scale = ScaleMode::Unbiased;
    let q = AnyQuantizer::Mse(Arc::new(MseQuantizer::new(cfg).expect("config")));
    let mut index = Index::new(&q, Metric::InnerProduct);
    index.add(&xs).expect("valid");
    g.throughput(Throughput::Elements(nq as u64));
    g.bench_function("mse4_d50_k10", |b| {
        b.iter(|| one_thread(|| index.search(black_box(&qs), 10).expect("valid")))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    targets = quantize, score, index_search
}
criterion_main!(benches);
