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

/// f16 scales: the same codes, each scale the f32 scale rounded to nearest f16 (relative error at
/// most 2^-11), 2 bytes per row in memory and on disk, scores and value sums that follow the
/// rounded scales, and files that round-trip and refuse bad scales.
#[test]
fn f16_scales_round_the_f32_scales_and_round_trip() {
    use tq_quant::ScalePrecision;
    let (n, d) = (77, 64);
    let xs: Vec<f32> = rows(n, d, 21).iter().map(|v| v * 3.0).collect();
    for scale in [ScaleMode::Norm, ScaleMode::LeastSquares] {
        let base = MseConfig::new(d, 3, RotationKind::Hadamard, 5).with_scale(scale);
        let full = batch(base, &xs);
        let half = batch(base.with_scale_precision(ScalePrecision::F16), &xs);
        assert_eq!(half.codes(), full.codes());
        let (s16, s32) = (half.norms(), full.norms());
        for (a, b) in s16.iter().zip(s32.iter()) {
            assert_eq!(*a, half::f16::from_f32(*b).to_f32());
            assert!((a - b).abs() <= b * 2f32.powi(-11));
        }
        assert_eq!(half.bytes_per_vector(), full.bytes_per_vector() - 2);
        assert_eq!(half.memory_bytes(), full.memory_bytes() - 2 * n);
        // One vector at a time gives the same codes and scales as the batch.
        for i in [0, 31, 76] {
            let (p, s) = half.quantizer().quantize(&xs[i * d..(i + 1) * d]).unwrap();
            assert_eq!(s, s16[i]);
            let mut row = vec![0u8; p.len()];
            half.row_codes(i, &mut row).unwrap();
            assert_eq!(row, p);
        }
        // Scores differ from the f32 batch's by the scale ratio alone.
        let q = rows(1, d, 22);
        let prepared = half.quantizer().prepare_query(&q).unwrap();
        let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
        half.score_into(&prepared, &mut a).unwrap();
        full.score_into(&prepared, &mut b).unwrap();
        // Both scale the same table sum t: a = round(s16·t), b = round(s32·t); `want` rounds
        // twice more, so the two agree to 4 roundings of |want|.
        for i in 0..n {
            let want = b[i] * s16[i] / s32[i];
            assert!(
                (a[i] - want).abs() <= 4.0 * f32::EPSILON * want.abs(),
                "{i}"
            );
        }
        // Value sums use the rounded scales: equal to the f32 batch with pre-scaled weights.
        let w: Vec<f32> = (0..n).map(|i| 1.0 / (1 + i) as f32).collect();
        let w32: Vec<f32> = (0..n).map(|i| w[i] * s16[i] / s32[i]).collect();
        let (mut oa, mut ob) = (vec![0.0; d], vec![0.0; d]);
        half.weighted_sum(&w, &mut oa).unwrap();
        full.weighted_sum(&w32, &mut ob).unwrap();
        // Each row's effective weight differs by at most 3 roundings (w·s16 against
        // ((w·s16)/s32)·s32), and the two sums then round differently at each of their n steps:
        // in the rotated domain each coordinate differs by at most (3 + 2n)·eps·Σ|w·s16|·max|c|,
        // and the inverse rotation (orthonormal) at most sqrt(d) times that, doubled for its own
        // rounding.
        let cmax = half
            .quantizer()
            .codebook()
            .centroids()
            .iter()
            .fold(0f32, |m, c| m.max(c.abs()));
        let mass: f32 = w.iter().zip(s16.iter()).map(|(w, s)| w * s).sum();
        let tol = 2.0 * (3 + 2 * n) as f32 * f32::EPSILON * mass * cmax * (d as f32).sqrt();
        for (x, y) in oa.iter().zip(&ob) {
            assert!((x - y).abs() <= tol, "{x} {y} {tol}");
        }
        // Save and load.
        let bytes = half.to_safetensors().unwrap();
        let back = match AnyBatch::from_safetensors(&bytes).unwrap() {
            AnyBatch::Mse(b) => b,
            _ => panic!("kind"),
        };
        assert_eq!(back.scales(), half.scales());
        assert_eq!(back.codes(), half.codes());
        // An f32 file whose configuration is edited to say f16 is refused (dtype mismatch).
        let mut f32_file = full.to_safetensors().unwrap();
        let from = br#"scale_precision\":\"f32"#;
        let at = f32_file
            .windows(from.len())
            .position(|w| w == from)
            .unwrap();
        f32_file[at + from.len() - 2..at + from.len()].copy_from_slice(b"16");
        let e = AnyBatch::from_safetensors(&f32_file).unwrap_err();
        assert!(e.to_string().contains("norms"), "{e}");
    }
}

/// A scale that f16 cannot hold is refused and leaves the batch as it was; a saved f16 scale that
/// is NaN or negative is refused on load.
#[test]
fn f16_scale_overflow_and_tampering_are_errors() {
    use tq_quant::{Error, ScalePrecision};
    let d = 32;
    let cfg =
        MseConfig::new(d, 4, RotationKind::Hadamard, 1).with_scale_precision(ScalePrecision::F16);
    let mut b = batch(cfg, &rows(3, d, 2));
    let big = vec![2.0e4f32; d]; // norm 1.13e5 > 65 504
    let e = b.push(&big).unwrap_err();
    assert!(matches!(e, Error::ScaleOverflow { row: 0, .. }), "{e}");
    assert_eq!(b.len(), 3);
    assert_eq!(b.codes().len(), 3);
    assert!(b.quantizer().quantize(&big).is_err());
    b.push(&rows(1, d, 3)).unwrap();
    assert_eq!(b.len(), 4);

    let bytes = b.to_safetensors().unwrap();
    // The norms tensor's data: the four f16 scales, little-endian, found in the file.
    let tq_quant::RowScales::F16(raw) = b.scales() else {
        panic!("f16 scales")
    };
    let pattern: Vec<u8> = raw.iter().flat_map(|h| h.to_le_bytes()).collect();
    let at = bytes
        .windows(pattern.len())
        .position(|w| w == pattern)
        .unwrap();
    for bad in [0x7e00u16, 0xbc00] {
        let mut t = bytes.clone();
        t[at + 6..at + 8].copy_from_slice(&bad.to_le_bytes());
        let e = AnyBatch::from_safetensors(&t).unwrap_err();
        assert!(e.to_string().contains("norms"), "{e}");
    }
    assert!(AnyBatch::from_safetensors(&bytes).is_ok());
}

/// `check_rows` (which appends refuse on before anything changes) agrees with `extend` about
/// f16 scale overflow at every width and scale mode, for rows whose norms straddle the limit,
/// including rows whose scale exceeds their norm; and the documented bounds on `scale / norm`
/// hold for random and for one-hot rotated rows.
#[test]
fn f16_scale_checks_agree_with_extend_and_the_ratio_bounds_hold() {
    use tq_quant::{EncodedVectors, ScalePrecision};
    let d = 64;
    let unit: Vec<f32> = rows(40, d, 31)
        .chunks_exact(d)
        .flat_map(|r| {
            let n = dot(r, r).sqrt() as f32;
            r.iter().map(move |v| v / n).collect::<Vec<_>>()
        })
        .collect();
    for bits in [1u32, 2, 3, 4, 8] {
        for mode in [
            ScaleMode::Norm,
            ScaleMode::LeastSquares,
            ScaleMode::Unbiased,
        ] {
            let cfg = MseConfig::new(d, bits, RotationKind::Hadamard, 7).with_scale(mode);
            let q = Arc::new(MseQuantizer::new(cfg).unwrap());
            let c_min = q
                .codebook()
                .centroids()
                .iter()
                .fold(f32::INFINITY, |m, c| m.min(c.abs()));
            let sd = (d as f32).sqrt();
            let bound = match mode {
                ScaleMode::Norm => 1.0,
                ScaleMode::LeastSquares => 1.0 / (sd * c_min),
                ScaleMode::Unbiased => sd / c_min,
            };
            // One-hot rows in the rotated domain: Πᵀ e_j.
            let mut onehot = vec![0.0f32; d];
            let mut probes = unit.clone();
            for j in [0, 17] {
                onehot.fill(0.0);
                onehot[j] = 1.0;
                let mut x = vec![0.0f32; d];
                q.rotation().apply_inverse(&onehot, &mut x).unwrap();
                probes.extend(x);
            }
            for x in probes.chunks_exact(d) {
                let (_, s) = q.quantize(x).unwrap();
                assert!(s <= bound * 1.0001, "{bits} {mode:?}: {s} > {bound}");
            }
            let half =
                Arc::new(MseQuantizer::new(cfg.with_scale_precision(ScalePrecision::F16)).unwrap());
            for norm in [1.0f32, 30_000.0, 60_000.0, 65_000.0, 66_000.0, 1.0e5, 1.0e6] {
                let xs: Vec<f32> = probes.iter().map(|v| v * norm).collect();
                let b = MseBatch::new(half.clone());
                let checked = EncodedVectors::check_rows(&b, &xs).is_ok();
                let mut c = b.clone();
                assert_eq!(
                    checked,
                    c.extend(&xs).is_ok(),
                    "{bits} {mode:?} norm {norm}"
                );
            }
        }
    }
}
