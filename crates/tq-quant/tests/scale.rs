//! Per-vector scale modes and centering: the exact per-vector properties and the statistical
//! claims of `ScaleMode`'s documentation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_quant::AnyBatch;
use tq_quant::{MseBatch, MseConfig, MseQuantizer, ScaleMode};

fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n * d).map(|_| r.gaussian() as f32).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn batch(cfg: MseConfig, xs: &[f32]) -> MseBatch {
    let mut b = MseBatch::new(Arc::new(MseQuantizer::new(cfg).unwrap()));
    b.extend(xs).unwrap();
    b
}

/// Exact, per vector: the unbiased scale reproduces `⟨x̃, x⟩ = ‖x‖²` and the least-squares scale
/// never reconstructs worse than the norm (it minimises `‖x − s Πᵀỹ‖²` over `s`).
#[test]
fn per_vector_identities() {
    let d = 64;
    let xs = rows(200, d, 1);
    for bits in [1u32, 2, 4] {
        let base = MseConfig::new(d, bits, RotationKind::Hadamard, 3);
        let (n, u, l) = (
            batch(base, &xs),
            batch(base.with_scale(ScaleMode::Unbiased), &xs),
            batch(base.with_scale(ScaleMode::LeastSquares), &xs),
        );
        let (dn, du, dl) = (n.dequantize_all(), u.dequantize_all(), l.dequantize_all());
        for i in 0..200 {
            let x = &xs[i * d..(i + 1) * d];
            let xx = dot(x, x);
            let along = dot(&du[i * d..(i + 1) * d], x);
            assert!(
                (along - xx).abs() <= 1e-4 * xx,
                "bits={bits} row {i}: {along} vs {xx}"
            );
            let err = |y: &[f32]| {
                x.iter()
                    .zip(y)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
            };
            assert!(
                err(&dl[i * d..(i + 1) * d]) <= err(&dn[i * d..(i + 1) * d]) * (1.0 + 1e-5) + 1e-9
            );
        }
    }
}

/// Over independent quantizers (seeds), the unbiased scale's inner-product error has mean 0
/// (within 3 standard errors), while the norm scale at 1 bit is shrunk by about 2/π: its mean
/// error for `⟨y, x⟩ ≈ 0.6` is ~ −0.22, which a test of this size detects at > 10 standard errors.
#[test]
fn unbiased_scale_is_unbiased_and_norm_is_not() {
    let d = 64;
    let trials = 1500;
    let xs = rows(trials, d, 2);
    let zs = rows(trials, d, 3);
    for bits in [1u32, 2] {
        let mut errs_u = Vec::new();
        let mut errs_n = Vec::new();
        for t in 0..trials {
            let x = &xs[t * d..(t + 1) * d];
            let nx = dot(x, x).sqrt() as f32;
            let xu: Vec<f32> = x.iter().map(|v| v / nx).collect();
            let z = &zs[t * d..(t + 1) * d];
            let nz = dot(z, z).sqrt() as f32;
            let y: Vec<f32> = xu
                .iter()
                .zip(z)
                .map(|(a, b)| 0.6 * a + 0.8 * b / nz)
                .collect();
            let truth = dot(&y, &xu);
            for (scale, errs) in [
                (ScaleMode::Unbiased, &mut errs_u),
                (ScaleMode::Norm, &mut errs_n),
            ] {
                let q = Arc::new(
                    MseQuantizer::new(
                        MseConfig::new(d, bits, RotationKind::Haar, 100 + t as u64)
                            .with_scale(scale),
                    )
                    .unwrap(),
                );
                let mut b = MseBatch::new(q.clone());
                b.push(&xu).unwrap();
                let mut s = [0.0f32];
                b.score_exact_into(&q.prepare_query(&y).unwrap(), &mut s)
                    .unwrap();
                errs.push(s[0] as f64 - truth);
            }
        }
        let stats = |e: &[f64]| {
            let m = e.iter().sum::<f64>() / e.len() as f64;
            let v = e.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (e.len() - 1) as f64;
            (m, (v / e.len() as f64).sqrt())
        };
        let (mu, seu) = stats(&errs_u);
        assert!(
            mu.abs() < 3.0 * seu,
            "bits={bits}: unbiased mean error {mu} (se {seu})"
        );
        if bits == 1 {
            let (mn, sen) = stats(&errs_n);
            assert!(
                mn < -10.0 * sen,
                "norm scale should be shrunk: {mn} (se {sen})"
            );
        }
    }
}

/// Centering: data with a large common mean is estimated far better when centred, the offset
/// `⟨q, mean⟩` is part of every score, and the mean survives a save / load.
#[test]
fn centering_adds_the_mean_back_and_round_trips() {
    let d = 32;
    let n = 500;
    let mean: Vec<f32> = (0..d).map(|j| 3.0 + (j % 5) as f32).collect();
    let xs: Vec<f32> = rows(n, d, 4)
        .chunks_exact(d)
        .flat_map(|r| r.iter().zip(&mean).map(|(a, m)| a + m).collect::<Vec<_>>())
        .collect();
    let q = rows(1, d, 5);
    let cfg = MseConfig::new(d, 2, RotationKind::Hadamard, 1);
    let mu = MseQuantizer::calibrate_mean(&xs, d).unwrap();
    let centred = Arc::new(MseQuantizer::with_mean(cfg, mu.clone()).unwrap());
    assert!(centred.config().centered);
    let mut bc = MseBatch::new(centred.clone());
    bc.extend(&xs).unwrap();
    let plain = batch(cfg, &xs);
    let query_c = centred.prepare_query(&q).unwrap();
    assert!((query_c.offset() as f64 - dot(&q, &mu)).abs() < 1e-3);
    let (mut sc, mut sp) = (vec![0.0; n], vec![0.0; n]);
    bc.score_exact_into(&query_c, &mut sc).unwrap();
    plain
        .score_exact_into(&plain.quantizer().prepare_query(&q).unwrap(), &mut sp)
        .unwrap();
    let rmse = |s: &[f32]| {
        (xs.chunks_exact(d)
            .zip(s)
            .map(|(x, &e)| (e as f64 - dot(&q, x)).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt()
    };
    assert!(
        rmse(&sc) < 0.5 * rmse(&sp),
        "centred {} vs plain {}",
        rmse(&sc),
        rmse(&sp)
    );
    let mut row = vec![0.0; d];
    bc.dequantize_row(7, &mut row).unwrap();
    let e: f64 = row
        .iter()
        .zip(&xs[7 * d..8 * d])
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / dot(&xs[7 * d..8 * d], &xs[7 * d..8 * d]);
    assert!(e < 0.05, "relative error {e}");
    let AnyBatch::Mse(back) = AnyBatch::from_safetensors(&bc.to_safetensors().unwrap()).unwrap()
    else {
        panic!("kind")
    };
    assert_eq!(back.quantizer().mean(), Some(&mu[..]));
    let mut sb = vec![0.0; n];
    back.score_exact_into(&back.quantizer().prepare_query(&q).unwrap(), &mut sb)
        .unwrap();
    assert_eq!(sb, sc);
    assert!(
        MseQuantizer::new(MseConfig {
            centered: true,
            ..cfg
        })
        .is_err()
    );
}
