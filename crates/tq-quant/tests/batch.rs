//! Batch behaviour: layout, determinism, prefix independence, errors, top-k.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_quant::{
    EncodedVectors, Error, MseBatch, MseConfig, MseQuantizer, ProdBatch, ProdConfig, ProdQuantizer,
    ScaleMode, ScalePrecision, SketchKind,
};

fn gaussian_rows(n: usize, d: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n * d).map(|_| r.gaussian() as f32 * scale).collect()
}

fn mse(d: usize, bits: u32, rotation: RotationKind) -> Arc<MseQuantizer> {
    Arc::new(MseQuantizer::new(MseConfig::new(d, bits, rotation, 17)).unwrap())
}

fn prod(d: usize, bits: u32) -> Arc<ProdQuantizer> {
    Arc::new(
        ProdQuantizer::new(ProdConfig {
            dim: d,
            bits,
            rotation: RotationKind::Hadamard,
            sketch: SketchKind::Gaussian,
            seed: 17,
        })
        .unwrap(),
    )
}

#[test]
fn bytes_per_vector_is_exact() {
    for d in [64usize, 96, 128, 200, 7] {
        for b in 1..=8u32 {
            assert_eq!(
                mse(d, b, RotationKind::Hadamard).bytes_per_vector(),
                (d * b as usize).div_ceil(8) + 4
            );
            assert_eq!(
                prod(d, b).bytes_per_vector(),
                (d * (b as usize - 1)).div_ceil(8) + d.div_ceil(8) + 8
            );
        }
    }
}

#[test]
fn fill_order_never_changes_codes() {
    for (d, b) in [(128usize, 4u32), (96, 3), (7, 2), (200, 1)] {
        let q = mse(d, b, RotationKind::Haar);
        let xs = gaussian_rows(100, d, 1, 3.0);
        let mut whole = MseBatch::new(q.clone());
        whole.extend(&xs).unwrap();
        let mut pieces = MseBatch::new(q.clone());
        for chunk in [1usize, 40, 3, 31, 25] {
            let start = pieces.len();
            pieces.extend(&xs[start * d..(start + chunk) * d]).unwrap();
        }
        let mut single = MseBatch::new(q.clone());
        for x in xs.chunks_exact(d) {
            single.push(x).unwrap();
        }
        assert_eq!(whole.codes(), pieces.codes());
        assert_eq!(whole.codes(), single.codes());
        assert_eq!(whole.norms(), single.norms());
        // and the same as quantizing alone
        let mut row = vec![0u8; q.row_bytes()];
        for i in [0usize, 31, 32, 99] {
            whole.row_codes(i, &mut row).unwrap();
            let (alone, norm) = q.quantize(&xs[i * d..(i + 1) * d]).unwrap();
            assert_eq!(row, alone);
            assert_eq!(norm, whole.norms()[i]);
        }
        let pq = prod(d, b + 1);
        let mut pw = ProdBatch::new(pq.clone());
        pw.extend(&xs).unwrap();
        let mut ps = ProdBatch::new(pq);
        for x in xs.chunks_exact(d) {
            ps.push(x).unwrap();
        }
        assert_eq!(pw.signs(), ps.signs());
        assert_eq!(pw.codes(), ps.codes());
        assert_eq!(pw.residual_norms(), ps.residual_norms());
    }
}

/// Codes for a fixed seed and input are pinned: they must not change across platforms or builds.
#[test]
fn codes_are_pinned() {
    let xs = gaussian_rows(64, 96, 5, 1.0);
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for rotation in [RotationKind::Hadamard, RotationKind::Haar] {
        let mut b = MseBatch::new(mse(96, 3, rotation));
        b.extend(&xs).unwrap();
        for byte in b.codes().to_row_major() {
            h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    assert_eq!(h, PINNED_HASH, "codes changed: {h:#x}");
}
const PINNED_HASH: u64 = 0x9259_bbac_1447_c37a;

#[test]
fn zero_vector_and_any_norm() {
    let d = 64;
    let q = mse(d, 4, RotationKind::Hadamard);
    let mut b = MseBatch::new(q.clone());
    let mut xs = vec![0.0f32; d];
    xs.extend(gaussian_rows(1, d, 2, 1e3));
    xs.extend(gaussian_rows(1, d, 3, 1e-3));
    b.extend(&xs).unwrap();
    let mut out = vec![1.0; d];
    b.dequantize_row(0, &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
    for i in 1..3 {
        b.dequantize_row(i, &mut out).unwrap();
        let x = &xs[i * d..(i + 1) * d];
        let err: f32 = x
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / x.iter().map(|a| a * a).sum::<f32>();
        assert!(err < 0.05, "relative error {err}");
    }
}

/// A batch's finiteness is checked while it is encoded (no pass of its own): the first non-finite
/// value is reported wherever it lies (a partly filled block, later whole blocks encoded in
/// parallel), for every scale mode and width, a centred quantizer, both rotations (a
/// non-power-of-two `d` too) and widths packed in other ways, and the batch is left as it was
/// (a valid batch appended afterwards lands as in a fresh one); a finite row whose squared norm
/// overflows is still a scale overflow.
#[test]
fn non_finite_found_in_any_block_and_nothing_appended() {
    let modes = [
        ScaleMode::Norm,
        ScaleMode::LeastSquares,
        ScaleMode::Unbiased,
    ];
    let widths = [ScalePrecision::F32, ScalePrecision::F16];
    let scales = modes.iter().flat_map(|&m| widths.map(|w| (m, w)));
    let shapes = [
        (RotationKind::Haar, 64, 4),
        (RotationKind::Hadamard, 50, 2),
        (RotationKind::Haar, 50, 6),
        (RotationKind::Hadamard, 64, 6),
    ];
    let cases = scales
        .map(|(m, w)| (m, w, RotationKind::Hadamard, 64usize, 4u32))
        .chain(shapes.map(|(r, d, b)| (ScaleMode::Norm, ScalePrecision::F32, r, d, b)));
    for (scale, precision, rotation, d, bits) in cases {
        let rows = gaussian_rows(200, d, 5, 1.0);
        let prefix = gaussian_rows(7, d, 6, 1.0);
        for centred in [false, true] {
            let cfg = MseConfig::new(d, bits, rotation, 3)
                .with_scale(scale)
                .with_scale_precision(precision);
            let q = Arc::new(if centred {
                MseQuantizer::with_mean(cfg, vec![0.25; d]).unwrap()
            } else {
                MseQuantizer::new(cfg).unwrap()
            });
            let mut b = MseBatch::new(q.clone());
            b.extend(&prefix).unwrap();
            let before = b.dequantize_all();
            let case =
                format!("{scale:?} {precision:?} {rotation:?} d={d} b={bits} centred {centred}");
            for (at, bad) in [
                (3, f32::NAN),
                (40 * d + 5, f32::INFINITY),
                (199 * d, f32::NEG_INFINITY),
            ] {
                let mut xs = rows.clone();
                xs[at] = bad;
                // A later non-finite value is not the one reported.
                xs[199 * d + 1] = f32::NAN;
                let got = b.extend(&xs);
                assert!(
                    matches!(got, Err(Error::NonFinite { index, .. }) if index == at),
                    "{case} at {at}: {got:?}"
                );
                assert_eq!(b.len(), 7, "{case}");
                assert_eq!(b.dequantize_all(), before, "{case}: batch changed");
            }
            let mut huge = rows.clone();
            huge[50 * d..51 * d].fill(1e30);
            assert!(
                matches!(b.extend(&huge), Err(Error::ScaleOverflow { row: 50, .. })),
                "{case}"
            );
            assert_eq!(b.len(), 7, "{case}");
            // After the refusals the batch takes valid rows exactly as a fresh one does.
            b.extend(&rows).unwrap();
            let mut fresh = MseBatch::new(q);
            fresh.extend(&prefix).unwrap();
            fresh.extend(&rows).unwrap();
            assert_eq!(
                b.dequantize_all(),
                fresh.dequantize_all(),
                "{case}: after refusals"
            );
            let rb = b.quantizer().row_bytes();
            let (mut x, mut y) = (vec![0u8; rb], vec![0u8; rb]);
            for i in 0..b.len() {
                b.row_codes(i, &mut x).unwrap();
                fresh.row_codes(i, &mut y).unwrap();
                assert_eq!(x, y, "{case}: row {i}");
            }
        }
    }
}

#[test]
fn typed_errors() {
    let q = mse(16, 2, RotationKind::Hadamard);
    let mut b = MseBatch::new(q.clone());
    assert!(matches!(
        b.push(&[0.0; 15]),
        Err(Error::DimMismatch {
            expected: 16,
            got: 15
        })
    ));
    let mut bad = vec![0.5f32; 32];
    bad[20] = f32::INFINITY;
    assert!(matches!(
        b.extend(&bad),
        Err(Error::NonFinite { index: 20, .. })
    ));
    assert!(b.is_empty(), "nothing appended on error");
    assert!(matches!(
        b.extend(&[0.0; 17]),
        Err(Error::DimMismatch { .. })
    ));
    assert!(matches!(
        q.prepare_query(&[f32::NAN; 16]),
        Err(Error::NonFinite { .. })
    ));
    let mut out = vec![0.0; 16];
    assert!(matches!(
        b.dequantize_row(0, &mut out),
        Err(Error::RowOutOfRange { index: 0, len: 0 })
    ));
    for bits in [0u32, 9] {
        let r = MseQuantizer::new(MseConfig::new(16, bits, RotationKind::Hadamard, 0));
        assert!(matches!(r, Err(Error::BitsOutOfRange { .. })));
        let r = ProdQuantizer::new(ProdConfig {
            dim: 16,
            bits,
            rotation: RotationKind::Hadamard,
            sketch: SketchKind::Gaussian,
            seed: 0,
        });
        assert!(matches!(r, Err(Error::BitsOutOfRange { .. })));
    }
    let r = MseQuantizer::new(MseConfig::new(1, 2, RotationKind::Hadamard, 0));
    assert!(matches!(
        r,
        Err(Error::Core(tq_core::Error::DimTooSmall { .. }))
    ));
    let r = MseQuantizer::new(MseConfig::new(5000, 2, RotationKind::Haar, 0));
    assert!(matches!(r, Err(Error::DimTooLarge { .. })));
    let mut scores = vec![0.0; 3];
    let query = q.prepare_query(&[0.1; 16]).unwrap();
    assert!(matches!(
        b.score_into(&query, &mut scores),
        Err(Error::Core(_))
    ));
}

#[test]
fn top_k_matches_exact_top_k_and_scores_parallel_equal_serial() {
    let d = 128;
    let n = 20_000;
    let xs = gaussian_rows(n, d, 8, 1.0);
    let qs = gaussian_rows(10, d, 9, 1.0);
    for b in [2u32, 3, 4] {
        let q = mse(d, b, RotationKind::Hadamard);
        let mut batch = MseBatch::new(q.clone());
        batch.extend(&xs).unwrap();
        let mut agree = 0;
        for qv in qs.chunks_exact(d) {
            let query = q.prepare_query(qv).unwrap();
            let fast = batch.top_k(&query, 10);
            let exact = batch.top_k_exact(&query, 10);
            // One thread (one fused pass with marks) and two (scores in parallel, then
            // selection) scan the same candidate tables: the same hits.
            let on = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| batch.top_k(&query, 10))
            };
            assert_eq!(on(1), on(2), "b={b}");
            assert_eq!(fast.len(), 10);
            assert!(fast.windows(2).all(|w| w[0].score >= w[1].score));
            agree += fast
                .iter()
                .filter(|h| exact.iter().any(|e| e.index == h.index))
                .count();
            let mut par = vec![0.0; n];
            batch.score_into(&query, &mut par).unwrap();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let mut ser = vec![0.0; n];
            pool.install(|| batch.score_into(&query, &mut ser)).unwrap();
            assert_eq!(par, ser);
        }
        // Re-ranking with exact scores makes the fast top-10 the exact top-10 up to ties.
        assert!(agree >= 99, "b={b}: {agree}/100 of the exact top-10 found");
    }
}

#[test]
fn truncate_then_append_is_consistent() {
    let d = 64;
    let q = prod(d, 4);
    let xs = gaussian_rows(70, d, 4, 1.0);
    let mut a = ProdBatch::new(q.clone());
    a.extend(&xs).unwrap();
    a.truncate(33);
    a.extend(&xs[33 * d..]).unwrap();
    let mut b = ProdBatch::new(q);
    b.extend(&xs).unwrap();
    assert_eq!(a.signs(), b.signs());
    assert_eq!(a.codes(), b.codes());
    assert_eq!(a.norms(), b.norms());
}

/// The rotated-domain weighted sum equals the weighted sum of the dequantized rows to float
/// rounding (relative 1e-4 of the magnitude), for every width and an awkward dimension.
#[test]
fn weighted_sum_equals_sum_of_dequantized_rows() {
    for (d, rotation) in [
        (128usize, RotationKind::Hadamard),
        (96, RotationKind::Haar),
        (7, RotationKind::Hadamard),
    ] {
        for bits in 1..=8u32 {
            let q = mse(d, bits, rotation);
            let xs = gaussian_rows(77, d, 31, 2.0);
            let mut b = MseBatch::new(q);
            b.extend(&xs).unwrap();
            let weights: Vec<f32> = (0..77)
                .map(|i| {
                    if i % 9 == 0 {
                        0.0
                    } else {
                        (i as f32 * 0.37).sin()
                    }
                })
                .collect();
            let mut got = vec![0.0; d];
            b.weighted_sum(&weights, &mut got).unwrap();
            let deq = b.dequantize_all();
            let mut want = vec![0.0f32; d];
            let mut mag = 0.0f32;
            for (w, row) in weights.iter().zip(deq.chunks_exact(d)) {
                for (o, v) in want.iter_mut().zip(row) {
                    *o += w * v;
                    mag += (w * v).abs();
                }
            }
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * mag / d as f32 + 1e-6,
                    "d={d} bits={bits}: {g} vs {w}"
                );
            }
            assert!(matches!(
                b.weighted_sum(&weights[1..], &mut got),
                Err(Error::Core(_))
            ));
        }
    }
}

/// Queries prepared by two quantizers of one configuration (equal grids, not one shared grid)
/// and queries too small for the grid (the tables' fast path at 5 bits, the exact one at 6-8)
/// scored together give each its own `score_into` bits: no query falls back to the 5-bit `u8`
/// tables while it has a grid.
#[test]
fn score_many_with_mixed_grids_equals_score_into() {
    let (d, n) = (40, 90);
    for bits in [5u32, 6, 8] {
        let (qa, qb) = (
            mse(d, bits, RotationKind::Hadamard),
            mse(d, bits, RotationKind::Hadamard),
        );
        let mut batch = MseBatch::new(qa.clone());
        batch.extend(&gaussian_rows(n, d, 5, 1.0)).unwrap();
        let raw = gaussian_rows(4, d, 6, 1.0);
        let tiny: Vec<f32> = raw[..d].iter().map(|v| v * 1e-36).collect();
        for set in [[&qa, &qb, &qa], [&qa, &qa, &qb]] {
            let mut queries: Vec<_> = raw
                .chunks(d)
                .zip(set.iter().cycle())
                .map(|(x, q)| q.prepare_query(x).unwrap())
                .collect();
            queries.push(qa.prepare_query(&tiny).unwrap());
            let refs: Vec<_> = queries.iter().collect();
            let mut many = vec![vec![0.0f32; n]; refs.len()];
            let mut outs: Vec<&mut [f32]> = many.iter_mut().map(Vec::as_mut_slice).collect();
            batch.score_many_into(&refs, &mut outs).unwrap();
            for (k, (query, got)) in queries.iter().zip(&many).enumerate() {
                let mut want = vec![0.0f32; n];
                batch.score_into(query, &mut want).unwrap();
                assert_eq!(got, &want, "bits {bits} query {k}");
            }
        }
    }
}

/// Asking for another batch's rows while scanning (the values of a KV cache while its keys are
/// scored) leaves every score's bits as `score_many_into` gives them, at every width, for one
/// query and for groups, with f32 and f16 norms, and with an `Ahead` over fewer or more rows
/// than the scan.
#[test]
fn score_many_ahead_equals_score_many_into() {
    let d = 64;
    for bits in 1u32..=8 {
        let q = mse(d, bits, RotationKind::Hadamard);
        let n = 100;
        let mut batch = MseBatch::new(q.clone());
        batch.extend(&gaussian_rows(n, d, 7, 1.0)).unwrap();
        let raw = gaussian_rows(4, d, 8, 1.0);
        let queries: Vec<_> = raw.chunks(d).map(|x| q.prepare_query(x).unwrap()).collect();
        for m in [n - 37, n, n + 50] {
            let mut cfg = MseConfig::new(d, 3, RotationKind::Hadamard, 5);
            if m == n {
                cfg.scale_precision = ScalePrecision::F16;
            }
            let mut other = MseBatch::new(Arc::new(MseQuantizer::new(cfg).unwrap()));
            other.extend(&gaussian_rows(m, d, 9, 1.0)).unwrap();
            for count in [1, 3, 4] {
                let refs: Vec<_> = queries[..count].iter().collect();
                let mut want = vec![vec![0.0f32; n]; count];
                let mut outs: Vec<&mut [f32]> = want.iter_mut().map(Vec::as_mut_slice).collect();
                batch.score_many_into(&refs, &mut outs).unwrap();
                let mut got = vec![vec![0.0f32; n]; count];
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(Vec::as_mut_slice).collect();
                EncodedVectors::score_many_ahead(&batch, &refs, &mut outs, other.ahead()).unwrap();
                let bits_of = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
                    v.iter()
                        .map(|o| o.iter().map(|x| x.to_bits()).collect())
                        .collect()
                };
                assert_eq!(
                    bits_of(&got),
                    bits_of(&want),
                    "bits {bits}, {m} other rows, {count} queries"
                );
            }
        }
    }
}

/// Scoring several queries at once (pairs through the fused kernel at 1, 2 and 4 bits, groups of
/// three at 5-8 bits, one by one at 3) gives each query its own `score_into` scores, up to float
/// rounding (the fused kernel uses FMAs; the 5-8-bit integer dots give the same bits); an empty
/// batch and a wrong output count are handled.
#[test]
fn score_many_equals_score_into_per_query() {
    let d = 48;
    for bits in 1u32..=8 {
        let q = mse(d, bits, RotationKind::Hadamard);
        let mut batch = MseBatch::new(q.clone());
        let n = 70;
        batch.extend(&gaussian_rows(n, d, 3, 1.0)).unwrap();
        let raw = gaussian_rows(5, d, 4, 1.0);
        let queries: Vec<_> = raw.chunks(d).map(|x| q.prepare_query(x).unwrap()).collect();
        let refs: Vec<_> = queries.iter().collect();
        let mut many = vec![vec![0.0f32; n]; 5];
        let mut outs: Vec<&mut [f32]> = many.iter_mut().map(Vec::as_mut_slice).collect();
        batch.score_many_into(&refs, &mut outs).unwrap();
        for (query, got) in queries.iter().zip(&many) {
            let mut want = vec![0.0f32; n];
            batch.score_into(query, &mut want).unwrap();
            if bits >= 5 {
                assert_eq!(got, &want, "bits {bits}");
            }
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "bits {bits}: {a} vs {b}"
                );
            }
        }
        let mut short = vec![0.0f32; n];
        let mut one: Vec<&mut [f32]> = vec![short.as_mut_slice()];
        assert!(batch.score_many_into(&refs, &mut one).is_err());
        let empty = MseBatch::new(q.clone());
        let mut none: Vec<&mut [f32]> = vec![&mut [], &mut [], &mut [], &mut [], &mut []];
        empty.score_many_into(&refs, &mut none).unwrap();
    }
}

/// A batch longer than one accumulation chunk (rows not a multiple of the chunk or of 32) sums to
/// the chunk-by-chunk reference, and gives the same bits on 1 and 2 threads (chunk sums are added
/// in chunk order whatever runs them).
#[test]
fn chunked_accumulation_is_exact_and_thread_independent() {
    let (d, n) = (64usize, 2 * tq_quant::ACCUMULATE_CHUNK_ROWS + 45);
    let mut b = MseBatch::new(mse(d, 4, RotationKind::Hadamard));
    b.extend(&gaussian_rows(n, d, 41, 1.0)).unwrap();
    let weights: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 * 0.11).cos()).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut out = vec![0.0f32; d];
            b.accumulate_rotated(&weights, &mut out).unwrap();
            out
        })
    };
    let (one, two) = (run(1), run(2));
    assert_eq!(one, two);
    // Reference: each chunk on its own batch (below the chunk size, one kernel call), summed in
    // order.
    let deq_rows = gaussian_rows(n, d, 41, 1.0);
    let mut want = vec![0.0f32; d];
    for start in (0..n).step_by(tq_quant::ACCUMULATE_CHUNK_ROWS) {
        let end = (start + tq_quant::ACCUMULATE_CHUNK_ROWS).min(n);
        let mut part = MseBatch::new(mse(d, 4, RotationKind::Hadamard));
        part.extend(&deq_rows[start * d..end * d]).unwrap();
        let mut acc = vec![0.0f32; d];
        part.accumulate_rotated(&weights[start..end], &mut acc)
            .unwrap();
        for (w, a) in want.iter_mut().zip(&acc) {
            *w += a;
        }
    }
    assert_eq!(one, want);
}
