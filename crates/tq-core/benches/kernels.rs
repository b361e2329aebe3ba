//! Kernel benchmarks for tq-core: rotations, codebook search, the nibble scan and the byte dots,
//! the rotated-domain value accumulation, the 5-8-bit key dots and the per-query softmax and weight
//! quantization.
#![allow(clippy::expect_used)]
//!
//! Run with `cargo bench -p tq-core`. Pools are larger than the caches where the kernel streams
//! memory, so the prefetcher sees the real access pattern.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tq_core::prefetch::Ahead;
use tq_core::{Codebook, Rotation, RotationKind, SeededRng, rng::stream, scan};

fn gaussians(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n).map(|_| r.gaussian() as f32).collect()
}

fn rotations(c: &mut Criterion) {
    let mut g = c.benchmark_group("rotate_batch");
    for d in [128usize, 200] {
        let n = 4096;
        let xs = gaussians(n * d, 1);
        let mut out = vec![0.0; n * d];
        g.throughput(Throughput::Elements(n as u64));
        for kind in [RotationKind::Haar, RotationKind::Hadamard] {
            let rot = Rotation::new(kind, d, 7).expect("valid dim");
            g.bench_with_input(BenchmarkId::new(kind.name(), d), &d, |b, _| {
                b.iter(|| {
                    rot.apply_batch(black_box(&xs), &mut out)
                        .expect("sizes match")
                })
            });
        }
    }
    // 32 rows at a time (one block of the packed layout, as batch quantize rotates them): the
    // rows stay in L1, so this is the transform's own cost without memory traffic.
    for d in [128usize, 200] {
        let n = 4096;
        let xs = gaussians(n * d, 1);
        let mut out = vec![0.0; 32 * d];
        g.throughput(Throughput::Elements(n as u64));
        let rot = Rotation::new(RotationKind::Hadamard, d, 7).expect("valid dim");
        g.bench_with_input(BenchmarkId::new("hadamard_blocks32", d), &d, |b, _| {
            b.iter(|| {
                for rows in black_box(&xs).chunks_exact(32 * d) {
                    rot.apply_batch(rows, &mut out).expect("sizes match");
                }
            })
        });
    }
    g.finish();
}

fn codebook_search(c: &mut Criterion) {
    let mut g = c.benchmark_group("quantize_slice");
    let ys: Vec<f32> = gaussians(128 * 1024, 2)
        .iter()
        .map(|v| v / 128f32.sqrt())
        .collect();
    let mut out = vec![0u8; ys.len()];
    g.throughput(Throughput::Elements(ys.len() as u64));
    for bits in [2u32, 4, 8] {
        let cb = Codebook::get(128, bits).expect("valid codebook");
        g.bench_with_input(BenchmarkId::from_parameter(bits), &bits, |b, _| {
            b.iter(|| cb.quantize_slice(black_box(&ys), &mut out))
        });
    }
    g.finish();
}

fn nibble_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan_block");
    // d = 128 at 4 bits: 64-byte rows; 64 MiB of blocks defeats the caches.
    let row_bytes = 64;
    let blocks = (64 << 20) / scan::block_bytes(row_bytes);
    let mut r = SeededRng::new(3, stream::DATA);
    let data: Vec<u8> = (0..blocks * scan::block_bytes(row_bytes))
        .map(|_| r.next_u64() as u8)
        .collect();
    let tables: Vec<u8> = (0..scan::block_bytes(row_bytes))
        .map(|_| r.next_u64() as u8)
        .collect();
    g.throughput(Throughput::Elements((blocks * scan::BLOCK) as u64));
    let mut out = [0u32; scan::BLOCK];
    g.bench_function("simd_d128_b4", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for blk in data.chunks_exact(scan::block_bytes(row_bytes)) {
                scan::scan_block(blk, &tables, &mut out);
                acc = acc.wrapping_add(out[0]);
            }
            black_box(acc)
        })
    });
    g.throughput(Throughput::Elements((blocks / 16 * scan::BLOCK) as u64));
    g.bench_function("scalar_d128_b4", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for blk in data
                .chunks_exact(scan::block_bytes(row_bytes))
                .take(blocks / 16)
            {
                scan::scan_block_scalar(blk, &tables, &mut out);
                acc = acc.wrapping_add(out[0]);
            }
            black_box(acc)
        })
    });
    g.finish();
}

/// The scan kernels with the codes in cache (256 KiB: a 4 096-key, d = 128 head at 4 bits, or a
/// search shard), where the kernel and not memory bandwidth sets the rate: 3, 4 and 5 bits.
fn scan_in_cache(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan_in_cache");
    type Kernel = fn(&[u8], &[u8], &mut [u32; scan::BLOCK]);
    let cases: [(&str, u32, Kernel, usize); 3] = [
        ("d128_b3", 3, scan::scan_block_b3, 16 * scan::coords3(48)),
        ("d128_b4", 4, scan::scan_block, 2048),
        ("d128_b5", 5, scan::scan_block_b5, 32 * scan::coords5(80)),
    ];
    for (name, bits, kernel, table_len) in cases {
        let row_bytes = 16 * bits as usize;
        let blocks = (256 << 10) / scan::block_bytes(row_bytes);
        let mut r = SeededRng::new(4, stream::DATA);
        let data: Vec<u8> = (0..blocks * scan::block_bytes(row_bytes))
            .map(|_| r.next_u64() as u8)
            .collect();
        let tables: Vec<u8> = (0..table_len).map(|_| r.next_u64() as u8).collect();
        g.throughput(Throughput::Elements((blocks * scan::BLOCK) as u64));
        let mut out = [0u32; scan::BLOCK];
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut acc = 0u32;
                for blk in data.chunks_exact(scan::block_bytes(row_bytes)) {
                    kernel(blk, &tables, &mut out);
                    acc = acc.wrapping_add(out[0]);
                }
                black_box(acc)
            })
        });
    }
    // Several queries per pass over the same 4-bit codes; throughput counts (key, query) pairs.
    let row_bytes = 64;
    let blocks = (256 << 10) / scan::block_bytes(row_bytes);
    let mut r = SeededRng::new(5, stream::DATA);
    let data: Vec<u8> = (0..blocks * scan::block_bytes(row_bytes))
        .map(|_| r.next_u64() as u8)
        .collect();
    let tables: Vec<Vec<u8>> = (0..4)
        .map(|_| (0..2048).map(|_| r.next_u64() as u8).collect())
        .collect();
    for nq in 1..=4 {
        let refs: Vec<&[u8]> = tables[..nq].iter().map(Vec::as_slice).collect();
        let mut outs = vec![[0u32; scan::BLOCK]; nq];
        g.throughput(Throughput::Elements((blocks * scan::BLOCK * nq) as u64));
        g.bench_function(format!("d128_b4_queries{nq}"), |b| {
            b.iter(|| {
                let mut acc = 0u32;
                for blk in data.chunks_exact(scan::block_bytes(row_bytes)) {
                    scan::scan_block_multi(blk, &refs, &mut outs);
                    acc = acc.wrapping_add(outs[0][0]);
                }
                black_box(acc)
            })
        });
    }
    // A decode step's key scores, 8 192 rows of 4-bit codes, 1-4 grouped queries, scores written
    // as floats, at d = 128 and at SmolLM2's d = 64: through the `u8` tables
    // (`scan_blocks_scores_multi`, full-range tables; the path attention takes without AVX-512
    // VBMI and VNNI) and through the byte dots (`dot_blocks_scores_u8`: the query on `i8`
    // weights, the codebook on a `u8` grid; the path it takes with them, and elsewhere the byte
    // dots' scalar twin). Throughput counts (key, query) pairs.
    let rows = 8192;
    let scales = vec![1.0f32; rows];
    let mut scores = vec![vec![0.0f32; rows]; 4];
    for (d, rb) in [(128usize, row_bytes), (64, 32)] {
        let centroids = Codebook::get(d, 4).expect("codebook").centroids().to_vec();
        let book = scan::ByteCodebook::from_centroids(&centroids);
        let data: Vec<u8> = (0..rows / scan::BLOCK * scan::block_bytes(rb))
            .map(|_| r.next_u64() as u8)
            .collect();
        let queries: Vec<scan::ByteQuery> = (0..4)
            .map(|q| book.quantize_query(&gaussians(d, 40 + q), 2 * rb))
            .collect();
        for nq in 1..=4 {
            g.throughput(Throughput::Elements((rows * nq) as u64));
            g.bench_function(format!("d{d}_b4_scores_queries{nq}"), |b| {
                b.iter(|| {
                    let mut jobs: Vec<scan::ScoreJob<'_>> = tables[..nq]
                        .iter()
                        .zip(scores.iter_mut())
                        .map(|(t, out)| scan::ScoreJob {
                            tables: &t[..32 * rb],
                            affine: scan::Affine {
                                offset: 0.5,
                                step: 0.01,
                                bias: 0.0,
                            },
                            out,
                            marks: None,
                        })
                        .collect();
                    scan::scan_blocks_scores_multi(&data, rb, &scales, &mut jobs, Ahead::NONE);
                    black_box(scores[0][0])
                })
            });
            g.bench_function(format!("d{d}_b4_bytes_queries{nq}"), |b| {
                b.iter(|| {
                    let mut jobs: Vec<scan::ByteJob<'_>> = queries[..nq]
                        .iter()
                        .zip(scores.iter_mut())
                        .map(|(q, out)| scan::ByteJob {
                            weights: &q.weights,
                            affine: scan::Affine {
                                offset: q.offset,
                                step: q.step,
                                bias: 0.0,
                            },
                            out,
                        })
                        .collect();
                    scan::dot_blocks_scores_u8(&data, rb, &book, &scales, &mut jobs, Ahead::NONE);
                    black_box(scores[0][0])
                })
            });
        }
    }
    // The same at 5 bits (row_bytes 80): each code rebuilt once per group of up to three queries.
    let row_bytes = 80;
    let blocks = (256 << 10) / scan::block_bytes(row_bytes);
    let data: Vec<u8> = (0..blocks * scan::block_bytes(row_bytes))
        .map(|_| r.next_u64() as u8)
        .collect();
    let len = 32 * scan::coords5(row_bytes);
    let tables: Vec<Vec<u8>> = (0..3)
        .map(|_| (0..len).map(|_| r.next_u64() as u8).collect())
        .collect();
    for nq in 1..=3 {
        let refs: Vec<&[u8]> = tables[..nq].iter().map(Vec::as_slice).collect();
        let mut outs = vec![[0u32; scan::BLOCK]; nq];
        g.throughput(Throughput::Elements((blocks * scan::BLOCK * nq) as u64));
        g.bench_function(format!("d128_b5_queries{nq}"), |b| {
            b.iter(|| {
                let mut acc = 0u32;
                for blk in data.chunks_exact(scan::block_bytes(row_bytes)) {
                    scan::scan_block_b5_multi(blk, &refs, &mut outs);
                    acc = acc.wrapping_add(outs[0][0]);
                }
                black_box(acc)
            })
        });
    }
    g.finish();
}

/// The rotated-domain value accumulation of a decode step (`accumulate_blocks_multi`) at every
/// width, d = 128, 8 192 rows (the codes stay in L2 up to 4 bits), with one and three weight
/// vectors (a grouped-query head's queries), and the integer fast path
/// (`accumulate_blocks_i16`, weights quantized inside the loop; at 1-4 bits with AVX-512 BW and
/// VNNI the byte sums, `accumulate_blocks_u8`, too); throughput counts (row, weight vector)
/// pairs.
fn accumulate(c: &mut Criterion) {
    let mut g = c.benchmark_group("accumulate");
    let (d, n) = (128usize, 8192usize);
    let mut r = SeededRng::new(6, stream::DATA);
    let weights: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..n).map(|_| r.uniform() as f32).collect())
        .collect();
    for bits in 1..=8u32 {
        let row_bytes = tq_core::bitpack::packed_len(d, bits);
        let blocks: Vec<u8> = (0..n.div_ceil(scan::BLOCK) * scan::block_bytes(row_bytes))
            .map(|_| r.next_u64() as u8)
            .collect();
        // The d = 128 Lloyd-Max centroids, as a KV cache's values use them.
        let values = Codebook::get(128, bits)
            .expect("valid codebook")
            .centroids()
            .to_vec();
        for nq in [1usize, 3] {
            let w: Vec<&[f32]> = weights[..nq].iter().map(Vec::as_slice).collect();
            let mut accs = vec![vec![0.0f32; d]; nq];
            g.throughput(Throughput::Elements((n * nq) as u64));
            g.bench_function(format!("d128_b{bits}_queries{nq}"), |b| {
                b.iter(|| {
                    let mut a: Vec<&mut [f32]> =
                        accs.iter_mut().map(|a| a.as_mut_slice()).collect();
                    scan::accumulate_blocks_multi(
                        &blocks, row_bytes, bits, &values, None, &w, &mut a,
                    );
                    black_box(a[0][0])
                })
            });
            {
                // The fast path: the weights put on i16 (timed too, as each call pays it) and
                // the integer sums on the codebook's grid.
                let book = scan::IntCodebook::from_centroids(&values);
                g.bench_function(format!("d128_b{bits}_int_queries{nq}"), |b| {
                    b.iter(|| {
                        let ints: Vec<scan::IntWeights> = w
                            .iter()
                            .map(|w| book.quantize_weights(w, None).expect("finite weights"))
                            .collect();
                        let refs: Vec<&scan::IntWeights> = ints.iter().collect();
                        let mut a: Vec<&mut [f32]> =
                            accs.iter_mut().map(|a| a.as_mut_slice()).collect();
                        scan::accumulate_blocks_i16(&blocks, row_bytes, bits, &book, &refs, &mut a);
                        black_box(a[0][0])
                    })
                });
            }
            if bits <= 4 && scan::byte_sums_native() {
                // The byte sums: the weights put on u8 (timed too) and the codebook on an
                // 8-bit grid.
                let book = scan::ByteCodebook::from_centroids(&values);
                g.bench_function(format!("d128_b{bits}_bytes_queries{nq}"), |b| {
                    b.iter(|| {
                        let bytes: Vec<scan::ByteWeights> = w
                            .iter()
                            .map(|w| book.quantize_weights(w, None).expect("non-negative"))
                            .collect();
                        let refs: Vec<&scan::ByteWeights> = bytes.iter().collect();
                        let mut a: Vec<&mut [f32]> =
                            accs.iter_mut().map(|a| a.as_mut_slice()).collect();
                        scan::accumulate_blocks_u8(&blocks, row_bytes, &book, &refs, &mut a);
                        black_box(a[0][0])
                    })
                });
            }
        }
    }
    g.finish();
}

/// Key scoring at 5-8 bits, d = 128, 8 192 rows in cache: the integer dots on the codebook's
/// grid (`dot_blocks_scores_i16`, the fast path) and, at 6-8 bits, the exact float decode
/// (`dot_block_codes`, block by block; at 5 bits the exact path scans f32 tables instead);
/// throughput counts keys.
fn wide_dots(c: &mut Criterion) {
    let mut g = c.benchmark_group("wide_dots");
    let (d, n) = (128usize, 8192usize);
    let mut r = SeededRng::new(7, stream::DATA);
    let q = gaussians(d, 8);
    let scales = vec![1.0f32; n];
    for bits in 5..=8u32 {
        let row_bytes = tq_core::bitpack::packed_len(d, bits);
        let bb = scan::block_bytes(row_bytes);
        let blocks: Vec<u8> = (0..n.div_ceil(scan::BLOCK) * bb)
            .map(|_| r.next_u64() as u8)
            .collect();
        let values = Codebook::get(d, bits)
            .expect("valid codebook")
            .centroids()
            .to_vec();
        let book = scan::IntCodebook::from_centroids(&values);
        let iq = book.quantize_query(&q);
        let affine = scan::Affine {
            offset: iq.offset,
            step: iq.step,
            bias: 0.0,
        };
        g.throughput(Throughput::Elements(n as u64));
        let mut out = vec![0.0f32; n];
        if bits >= 6 {
            g.bench_function(format!("d128_b{bits}_exact"), |b| {
                b.iter(|| {
                    let mut all = [0.0f32; scan::BLOCK];
                    for (blk, o) in blocks.chunks_exact(bb).zip(out.chunks_mut(scan::BLOCK)) {
                        scan::dot_block_codes(blk, bits, &values, &q, &mut all);
                        o.copy_from_slice(&all[..o.len()]);
                    }
                    black_box(out[0])
                })
            });
        }
        g.bench_function(format!("d128_b{bits}_int"), |b| {
            b.iter(|| {
                scan::dot_blocks_scores_i16(
                    &blocks,
                    row_bytes,
                    bits,
                    &book,
                    &iq.weights,
                    affine,
                    &scales,
                    &mut out,
                );
                black_box(out[0])
            })
        });
    }
    g.finish();
}

/// The per-query step between key scores and value sums in attention on codes, 8 192 tokens:
/// the softmax over the scores, then the weights put on `i16` with per-row scales (the values'
/// norms), as `IntCodebook::quantize_weights` does for the integer value sums; throughput counts
/// tokens.
fn weights(c: &mut Criterion) {
    let mut g = c.benchmark_group("weights");
    let n = 8192usize;
    let scores = gaussians(n, 9);
    let norms: Vec<f32> = gaussians(n, 10)
        .iter()
        .map(|x| 1.0 + 0.1 * x.abs())
        .collect();
    let values = Codebook::get(128, 4)
        .expect("valid codebook")
        .centroids()
        .to_vec();
    let book = scan::IntCodebook::from_centroids(&values);
    let mut p = scores.clone();
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("softmax_8192", |b| {
        b.iter(|| {
            p.copy_from_slice(&scores);
            tq_core::simd::softmax_in_place(&mut p, 0.125);
            black_box(p[0])
        })
    });
    // The softmax weights of the scores, whatever the filter ran before.
    p.copy_from_slice(&scores);
    tq_core::simd::softmax_in_place(&mut p, 0.125);
    g.bench_function("quantize_weights_8192", |b| {
        b.iter(|| {
            let w = book.quantize_weights(black_box(&p), Some(&norms));
            black_box(w)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    targets = rotations, codebook_search, nibble_scan, scan_in_cache, accumulate, wide_dots, weights
}
criterion_main!(benches);
