//! Every kernel against the CPU path on identical inputs, on whatever adapter the machine has (in
//! CI Mesa's lavapipe). With CI=true a missing adapter fails the test; elsewhere it skips with a
//! message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use tq_core::{SeededRng, bitpack, rng::stream};
use tq_gpu::{Error, GpuContext};
use tq_quant::{
    MseBatch, MseConfig, MseQuantizer, ProdBatch, ProdConfig, ProdQuantizer, RotationKind,
    ScaleMode, SketchKind,
};

fn ctx() -> Option<GpuContext> {
    match GpuContext::new() {
        Ok(c) => {
            eprintln!("adapter: {}", c.adapter());
            Some(c)
        }
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("no usable GPU adapter in CI: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// Gaussian rows with norms spread over two orders of magnitude, and one zero row.
fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    let mut v: Vec<f32> = Vec::with_capacity(n * d);
    for i in 0..n {
        let scale = 10f64.powf(r.uniform() * 2.0 - 1.0);
        for _ in 0..d {
            v.push(if i == 3 {
                0.0
            } else {
                (r.gaussian() * scale) as f32
            });
        }
    }
    v
}

fn quantizer(d: usize, bits: u32, seed: u64) -> Arc<MseQuantizer> {
    quantizer_with(d, bits, seed, RotationKind::Hadamard)
}

fn quantizer_with(d: usize, bits: u32, seed: u64, rotation: RotationKind) -> Arc<MseQuantizer> {
    Arc::new(MseQuantizer::new(MseConfig::new(d, bits, rotation, seed)).unwrap())
}

/// Every shape with both rotations (Haar on the smaller dimensions: it is d² per row).
fn cases() -> Vec<(usize, u32, usize, RotationKind)> {
    let mut v: Vec<_> = SHAPES
        .iter()
        .map(|&(d, b, n)| (d, b, n, RotationKind::Hadamard))
        .collect();
    v.extend(
        SHAPES
            .iter()
            .filter(|s| s.0 <= 200)
            .map(|&(d, b, n)| (d, b, n, RotationKind::Haar)),
    );
    v
}

fn codes_of(b: &MseBatch, i: usize) -> Vec<u8> {
    let q = b.quantizer();
    let mut packed = vec![0u8; q.row_bytes()];
    b.codes().read_row(i, &mut packed);
    let mut c = vec![0u8; q.dim()];
    bitpack::unpack(&packed, q.config().bits, &mut c).unwrap();
    c
}

const SHAPES: [(usize, u32, usize); 7] = [
    (128, 4, 1000),
    (64, 2, 77),
    (96, 3, 33),
    (200, 1, 65),
    (80, 4, 31),
    (1024, 2, 40),
    (2, 8, 50),
];

#[test]
fn quantize_gives_the_cpu_codes_and_norms() {
    let Some(gpu) = ctx() else { return };
    for (k, &(d, bits, n, rot)) in cases().iter().enumerate() {
        let q = quantizer_with(d, bits, 11 + k as u64, rot);
        let xs = rows(n, d, 100 + k as u64);
        let mut cpu = MseBatch::new(q.clone());
        cpu.extend(&xs).unwrap();
        let g = gpu.quantize_mse(&q, &xs).unwrap();
        assert_eq!(g.len(), n);
        for (i, (a, b)) in g.norms().iter().zip(cpu.norms().iter()).enumerate() {
            assert!(
                (a - b).abs() <= 2e-6 * b.abs(),
                "d{d} b{bits} row {i}: norm {a} vs {b}"
            );
        }
        // Codes agree except where the rotated unit coordinate is within float rounding of a
        // boundary (a documented tie): those may take the neighbouring code.
        let bounds = q.codebook().boundaries();
        let mut ties = 0;
        for i in 0..n {
            let (cg, cc) = (codes_of(&g, i), codes_of(&cpu, i));
            if cg == cc {
                continue;
            }
            let x = &xs[i * d..(i + 1) * d];
            let mut y = vec![0.0f32; d];
            q.rotation().apply(x, &mut y).unwrap();
            let norm = cpu.norms()[i];
            for j in 0..d {
                if cg[j] != cc[j] {
                    let v = y[j] / norm;
                    let near = bounds
                        .iter()
                        .map(|b| (v - b).abs())
                        .fold(f32::MAX, f32::min);
                    assert!(
                        near < 1e-5,
                        "d{d} b{bits} row {i} coord {j}: gpu {} cpu {} at {v}",
                        cg[j],
                        cc[j]
                    );
                    assert_eq!((cg[j] as i32 - cc[j] as i32).abs(), 1);
                    ties += 1;
                }
            }
        }
        assert!(
            ties * 1000 <= n * d,
            "d{d} b{bits}: {ties} ties in {} codes",
            n * d
        );
        // The whole block layout (padding slots included) matches byte for byte apart from ties.
        if ties == 0 {
            assert_eq!(g.codes().blocks(), cpu.codes().blocks(), "d{d} b{bits}");
        }
    }
}

#[test]
fn dequantize_and_score_match_the_cpu() {
    let Some(gpu) = ctx() else { return };
    for (k, &(d, bits, n, rot)) in cases().iter().enumerate() {
        let q = quantizer_with(d, bits, 21 + k as u64, rot);
        let xs = rows(n, d, 200 + k as u64);
        let mut cpu = MseBatch::new(q.clone());
        cpu.extend(&xs).unwrap();
        let want = cpu.dequantize_all();
        let got = gpu.dequantize_mse(&cpu).unwrap();
        assert_eq!(got.len(), want.len());
        for i in 0..n {
            let norm = cpu.norms()[i];
            for j in 0..d {
                let (a, b) = (got[i * d + j], want[i * d + j]);
                assert!(
                    (a - b).abs() <= 1e-5 * norm.max(1e-30),
                    "d{d} b{bits} [{i},{j}]: {a} vs {b}"
                );
            }
        }
        let resident = gpu.upload(&cpu).unwrap();
        assert_eq!(resident.len(), n);
        for t in 0..3 {
            let query = &xs[((t * 7 + 1) % n) * d..][..d];
            let s = resident.score(query).unwrap();
            let mut exact = vec![0.0f32; n];
            cpu.score_exact_into(&q.prepare_query(query).unwrap(), &mut exact)
                .unwrap();
            let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
            for (i, (a, b)) in s.iter().zip(&exact).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-5 * scale,
                    "d{d} b{bits} q{t} row {i}: {a} vs {b}"
                );
            }
            let top = resident.top_k(query, 5).unwrap();
            assert_eq!(top.len(), 5.min(n));
            assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        }
        // Several queries in one call give the single-query results.
        let qs = &xs[..3.min(n) * d];
        let many = resident.score_many(qs).unwrap();
        for (qi, s) in many.iter().enumerate() {
            assert_eq!(s, &resident.score(&qs[qi * d..(qi + 1) * d]).unwrap());
        }
        let tops = resident.top_k_many(qs, 3).unwrap();
        assert_eq!(tops.len(), 3.min(n));
        assert!(resident.score_many(&qs[..d - 1]).is_err());
    }
}

#[test]
fn large_batches_are_split_into_chunks() {
    let Some(gpu) = ctx() else { return };
    // 16 KB bindings: 32 rows of d = 128 f32 (one block) per chunk, so 200 rows take 7 chunks;
    // every binding is checked against the cap, so a chunk sized by the wrong row width fails.
    let gpu = gpu.with_binding_limit(16384);
    let (d, n) = (128, 200);
    let q = quantizer(d, 4, 5);
    let xs = rows(n, d, 9);
    let mut cpu = MseBatch::new(q.clone());
    cpu.extend(&xs).unwrap();
    let g = gpu.quantize_mse(&q, &xs).unwrap();
    let differing = (0..n)
        .filter(|&i| codes_of(&g, i) != codes_of(&cpu, i))
        .count();
    assert!(differing <= 1, "{differing} rows differ");
    let deq = gpu.dequantize_mse(&cpu).unwrap();
    assert_eq!(deq.len(), n * d);
    let s = gpu.upload(&cpu).unwrap().score(&xs[..d]).unwrap();
    assert_eq!(s.len(), n);
    // Prod decodes d floats per row from ~d/2 stored bytes: its chunks must be sized by the
    // decoded rows too, or they overflow the binding.
    let pq = prod(d, 4, 2, RotationKind::Hadamard);
    let mut pb = ProdBatch::new(pq.clone());
    pb.extend(&xs).unwrap();
    let deq = gpu.dequantize_prod(&pb).unwrap();
    assert_eq!(deq.len(), n * d);
    assert_eq!(
        gpu.upload_prod(&pb).unwrap().score(&xs[..d]).unwrap().len(),
        n
    );
}

#[test]
fn unsupported_configurations_are_typed_errors() {
    let Some(gpu) = ctx() else { return };
    let big = quantizer(2048, 4, 1);
    let e = gpu.quantize_mse(&big, &vec![1.0; 2048]).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported(_)) && e.to_string().contains("2048"),
        "{e}"
    );
    let e = gpu.upload(&MseBatch::new(big)).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let q = quantizer(64, 4, 1);
    assert!(matches!(
        gpu.quantize_mse(&q, &[1.0; 65]),
        Err(Error::Quant(_))
    ));
    assert!(matches!(
        gpu.quantize_mse(&q, &[f32::NAN; 64]),
        Err(Error::Unsupported(_))
    ));
    let empty = gpu.quantize_mse(&q, &[]).unwrap();
    assert!(empty.is_empty());
}

fn prod(d: usize, bits: u32, seed: u64, rotation: RotationKind) -> Arc<ProdQuantizer> {
    Arc::new(
        ProdQuantizer::new(ProdConfig {
            dim: d,
            bits,
            rotation,
            sketch: if seed.is_multiple_of(2) {
                SketchKind::Gaussian
            } else {
                SketchKind::Orthogonal
            },
            seed,
        })
        .unwrap(),
    )
}

#[test]
fn prod_quantize_dequantize_and_score_match_the_cpu() {
    let Some(gpu) = ctx() else { return };
    let cases = [
        (128, 4, 300, RotationKind::Hadamard),
        (96, 3, 45, RotationKind::Hadamard),
        (64, 2, 70, RotationKind::Haar),
        (200, 5, 33, RotationKind::Hadamard),
    ];
    for (k, &(d, bits, n, rot)) in cases.iter().enumerate() {
        let q = prod(d, bits, 40 + k as u64, rot);
        let xs = rows(n, d, 300 + k as u64);
        let mut cpu = ProdBatch::new(q.clone());
        cpu.extend(&xs).unwrap();
        let g = gpu.quantize_prod(&q, &xs).unwrap();
        assert_eq!(g.len(), n);
        for i in 0..n {
            let (a, b) = (g.norms()[i], cpu.norms()[i]);
            assert!(
                (a - b).abs() <= 2e-6 * b.abs(),
                "d{d} b{bits} row {i}: norm {a} vs {b}"
            );
        }
        // MSE codes: ties only; residual norms and sign bits follow the codes, so compare them on
        // rows whose codes agree (sign ties only where the projection is within rounding of 0).
        let (mut code_rows, mut sign_bits) = (0, 0);
        let (sb, m) = (q.sign_bytes(), d);
        let (mut sg, mut sc) = (vec![0u8; sb], vec![0u8; sb]);
        let (gc, cc) = (g.codes().unwrap(), cpu.codes().unwrap());
        let rb = q.code_bytes();
        let (mut a, mut b) = (vec![0u8; rb], vec![0u8; rb]);
        for i in 0..n {
            gc.read_row(i, &mut a);
            cc.read_row(i, &mut b);
            if a != b {
                code_rows += 1;
                continue;
            }
            let (x, y) = (g.residual_norms()[i], cpu.residual_norms()[i]);
            assert!(
                (x - y).abs() <= 1e-5 * y.max(1e-6),
                "d{d} b{bits} row {i}: gamma {x} vs {y}"
            );
            g.signs().read_row(i, &mut sg);
            cpu.signs().read_row(i, &mut sc);
            sign_bits += (0..m)
                .filter(|&j| (sg[j / 8] >> (j % 8)) & 1 != (sc[j / 8] >> (j % 8)) & 1)
                .count();
        }
        assert!(
            code_rows * 100 <= n.max(100),
            "d{d} b{bits}: {code_rows} rows with code ties"
        );
        assert!(
            sign_bits * 1000 <= n * m,
            "d{d} b{bits}: {sign_bits} sign ties"
        );
        // Decode and score the CPU's batch on the GPU.
        let want: Vec<f32> = (0..n)
            .flat_map(|i| {
                let mut r = vec![0.0f32; d];
                cpu.dequantize_row(i, &mut r).unwrap();
                r
            })
            .collect();
        let got = gpu.dequantize_prod(&cpu).unwrap();
        for i in 0..n {
            let norm = cpu.norms()[i];
            for j in 0..d {
                let (x, y) = (got[i * d + j], want[i * d + j]);
                assert!(
                    (x - y).abs() <= 2e-5 * norm.max(1e-30),
                    "d{d} b{bits} [{i},{j}]: {x} vs {y}"
                );
            }
        }
        let resident = gpu.upload_prod(&cpu).unwrap();
        let query = &xs[d..2 * d];
        let s = resident.score(query).unwrap();
        let mut exact = vec![0.0f32; n];
        cpu.score_exact_into(&q.prepare_query(query).unwrap(), &mut exact)
            .unwrap();
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        for (i, (x, y)) in s.iter().zip(&exact).enumerate() {
            assert!(
                (x - y).abs() <= 2e-5 * scale,
                "d{d} b{bits} row {i}: {x} vs {y}"
            );
        }
    }
    let one_bit = prod(64, 1, 1, RotationKind::Hadamard);
    assert!(matches!(
        gpu.quantize_prod(&one_bit, &[1.0; 64]),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn scale_modes_and_centred_quantizers_match_the_cpu() {
    let Some(gpu) = ctx() else { return };
    let (d, n) = (96, 130);
    let xs: Vec<f32> = rows(n, d, 77)
        .iter()
        .enumerate()
        .map(|(i, v)| v + (i % d) as f32 * 0.05)
        .collect();
    let mean = MseQuantizer::calibrate_mean(&xs, d).unwrap();
    for (k, scale) in [
        ScaleMode::Norm,
        ScaleMode::LeastSquares,
        ScaleMode::Unbiased,
    ]
    .into_iter()
    .enumerate()
    {
        for centred in [false, true] {
            let cfg = MseConfig::new(d, 3, RotationKind::Hadamard, 5 + k as u64).with_scale(scale);
            let q = Arc::new(if centred {
                MseQuantizer::with_mean(cfg, mean.clone()).unwrap()
            } else {
                MseQuantizer::new(cfg).unwrap()
            });
            let mut cpu = MseBatch::new(q.clone());
            cpu.extend(&xs).unwrap();
            let g = gpu.quantize_mse(&q, &xs).unwrap();
            let tied = (0..n)
                .filter(|&i| codes_of(&g, i) != codes_of(&cpu, i))
                .count();
            assert!(tied <= 1, "{scale:?} centred {centred}: {tied} rows differ");
            for i in (0..n).filter(|&i| codes_of(&g, i) == codes_of(&cpu, i)) {
                let (a, b) = (g.norms()[i], cpu.norms()[i]);
                // f32 sums on the GPU, f64 on the CPU.
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "{scale:?} centred {centred} row {i}: {a} vs {b}"
                );
            }
            let want = cpu.dequantize_all();
            let got = gpu.dequantize_mse(&cpu).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{scale:?} centred {centred} [{i}]: {a} vs {b}"
                );
            }
            let query = &xs[5 * d..6 * d];
            let s = gpu.upload(&cpu).unwrap().score(query).unwrap();
            let mut exact = vec![0.0f32; n];
            cpu.score_exact_into(&q.prepare_query(query).unwrap(), &mut exact)
                .unwrap();
            let top = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in s.iter().zip(&exact) {
                assert!(
                    (a - b).abs() <= 2e-5 * top,
                    "{scale:?} centred {centred}: {a} vs {b}"
                );
            }
        }
    }
}

/// A quantizer chosen at run time goes to its pipeline (the same batch as the typed entry point)
/// or, for PolarQuant, is refused as unsupported.
#[test]
fn run_time_kinds_dispatch_to_their_pipelines() {
    use tq_quant::{AnyBatch, EncodedVectors, QuantizerKind, QuantizerSpec};
    let Some(gpu) = ctx() else { return };
    let (d, n) = (64, 70);
    let xs = rows(n, d, 3);
    for kind in [QuantizerKind::Mse, QuantizerKind::Prod] {
        let q = QuantizerSpec::new(kind, d, 3, RotationKind::Hadamard, 8)
            .build()
            .unwrap();
        let any = gpu.quantize(&q, &xs).unwrap();
        assert_eq!((any.kind(), any.len()), (kind, n));
        let typed = match &q {
            tq_quant::AnyQuantizer::Mse(m) => AnyBatch::from(gpu.quantize_mse(m, &xs).unwrap()),
            tq_quant::AnyQuantizer::Prod(p) => AnyBatch::from(gpu.quantize_prod(p, &xs).unwrap()),
            _ => unreachable!("mse and prod only in this loop"),
        };
        // The same kernel on the same input: the same codes and scalars, so the same rows.
        assert!(any.dequantize_all() == typed.dequantize_all(), "{kind}");
        assert_eq!(gpu.dequantize(&any).unwrap().len(), n * d);
        let scores = gpu.upload_batch(&any).unwrap().score(&xs[..d]).unwrap();
        assert_eq!(scores.len(), n);
    }
    let polar = QuantizerSpec::new(QuantizerKind::Polar, d, 4, RotationKind::Hadamard, 8)
        .build()
        .unwrap();
    let e = gpu.quantize(&polar, &xs).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported(_)) && e.to_string().contains("polar"),
        "{e}"
    );
    let mut b = polar.new_batch();
    b.extend(&xs).unwrap();
    assert!(matches!(gpu.dequantize(&b), Err(Error::Unsupported(_))));
    assert!(matches!(gpu.upload_batch(&b), Err(Error::Unsupported(_))));
}
