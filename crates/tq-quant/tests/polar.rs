//! PolarQuant: exact transform round trip, codebooks against the angle laws, distortion vs bits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_quant::polar::{bits_per_coordinate, lloyd_max_on};
use tq_quant::{Error, PolarBatch, PolarConfig, PolarQuantizer};

fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n * d).map(|_| r.gaussian() as f32).collect()
}

#[test]
fn polar_transform_round_trips_to_float_rounding() {
    for len in [2usize, 4, 8, 16, 32] {
        let x = rows(20, len, len as u64);
        for blk in x.chunks_exact(len) {
            let (angles, r) = PolarQuantizer::polar_transform(blk);
            assert_eq!(angles.len(), len.trailing_zeros() as usize);
            assert!(
                angles[0]
                    .iter()
                    .all(|t| (0.0..std::f64::consts::TAU).contains(t))
            );
            for level in &angles[1..] {
                assert!(
                    level
                        .iter()
                        .all(|t| (0.0..=std::f64::consts::FRAC_PI_2).contains(t))
                );
            }
            let mut back = vec![0.0f32; len];
            PolarQuantizer::polar_inverse(&angles, r, &mut back);
            for (a, b) in blk.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
                    "len {len}: {a} vs {b}"
                );
            }
        }
    }
}

/// Re-derive level 2's 2-bit centroids (law ∝ sin 2ψ on [0, π/2]) by direct Simpson integration
/// of the conditional means of the cells the codebook defines: a Lloyd-Max fixed point must
/// reproduce itself (to 1e-5 rad, well above the 4096-interval tabulation error).
#[test]
fn level_codebooks_are_lloyd_max_for_the_angle_laws() {
    let q = PolarQuantizer::new(PolarConfig::paper(64, RotationKind::Hadamard, 1)).unwrap();
    for level in 2..=4usize {
        let c = q.level_centroids(level).unwrap();
        let p = (1i32 << (level - 1)) - 1;
        let f = |t: f64| (2.0 * t).sin().max(0.0).powi(p);
        let simpson = |g: &dyn Fn(f64) -> f64, a: f64, b: f64| {
            let n = 20_000;
            let h = (b - a) / n as f64;
            (0..=n)
                .map(|i| {
                    g(a + i as f64 * h)
                        * if i == 0 || i == n {
                            1.0
                        } else if i % 2 == 1 {
                            4.0
                        } else {
                            2.0
                        }
                })
                .sum::<f64>()
                * h
                / 3.0
        };
        for i in 0..c.len() {
            let lo = if i == 0 { 0.0 } else { 0.5 * (c[i - 1] + c[i]) };
            let hi = if i + 1 == c.len() {
                std::f64::consts::FRAC_PI_2
            } else {
                0.5 * (c[i] + c[i + 1])
            };
            let mean = simpson(&|t| t * f(t), lo, hi) / simpson(&f, lo, hi);
            assert!(
                (mean - c[i]).abs() < 1e-5,
                "level {level} cell {i}: {mean} vs {}",
                c[i]
            );
            // the law is symmetric about π/4
            assert!((c[i] + c[c.len() - 1 - i] - std::f64::consts::FRAC_PI_2).abs() < 1e-6);
        }
    }
    // level 1 is uniform on the circle: equal arcs
    let c1 = q.level_centroids(1).unwrap();
    assert!((c1[1] - c1[0] - std::f64::consts::TAU / 16.0).abs() < 1e-12);
    // the generic solver on a uniform law gives the uniform quantizer
    let u = lloyd_max_on(|_| 1.0, 0.0, 1.0, 4);
    for (i, v) in u.iter().enumerate() {
        assert!((v - (i as f64 + 0.5) / 4.0).abs() < 1e-6);
    }
}

fn distortion(level_bits: &[u32], xs: &[f32], d: usize) -> f64 {
    let q = Arc::new(
        PolarQuantizer::new(PolarConfig {
            dim: d,
            level_bits: level_bits.to_vec(),
            rotation: RotationKind::Hadamard,
            seed: 3,
        })
        .unwrap(),
    );
    let mut b = PolarBatch::new(q);
    b.extend(xs).unwrap();
    let back = b.dequantize_all();
    xs.chunks_exact(d)
        .zip(back.chunks_exact(d))
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()
        })
        .sum::<f64>()
        / (xs.len() / d) as f64
}

#[test]
fn distortion_falls_as_bits_per_level_grow() {
    let d = 128;
    let xs = rows(400, d, 9);
    let mut last = f64::INFINITY;
    for bits in [
        [1u32, 1, 1, 1],
        [2, 1, 1, 1],
        [3, 2, 2, 2],
        [4, 2, 2, 2],
        [5, 3, 3, 3],
        [6, 4, 4, 4],
    ] {
        let dm = distortion(&bits, &xs, d);
        assert!(dm < last, "{bits:?}: {dm} !< {last}");
        last = dm;
    }
}

#[test]
fn scores_layout_and_errors() {
    let d = 64;
    let cfg = PolarConfig::paper(d, RotationKind::Haar, 5);
    let q = Arc::new(PolarQuantizer::new(cfg.clone()).unwrap());
    // 4 blocks of 16: 46 code bits each, four f16 radii, one f32 norm
    assert_eq!(q.bytes_per_vector(), (4 * 46usize).div_ceil(8) + 8 + 4);
    assert!(
        (bits_per_coordinate(&PolarConfig::paper(128, RotationKind::Hadamard, 0)) - (3.875 + 0.25))
            .abs()
            < 1e-12
    );
    let xs = rows(50, d, 6);
    let mut b = PolarBatch::new(q.clone());
    b.extend(&xs).unwrap();
    let qv = rows(1, d, 7);
    let mut s = vec![0.0; 50];
    b.score_into(&qv, &mut s).unwrap();
    let deq = b.dequantize_all();
    for (i, row) in deq.chunks_exact(d).enumerate() {
        let want: f32 = qv.iter().zip(row).map(|(a, b)| a * b).sum();
        assert!((s[i] - want).abs() < 1e-4 * (1.0 + want.abs()), "row {i}");
    }
    assert_eq!(b.top_k(&qv, 3).unwrap().len(), 3);
    assert!(matches!(
        PolarQuantizer::new(PolarConfig {
            dim: 72,
            ..cfg.clone()
        }),
        Err(Error::DimMismatch { .. })
    ));
    assert!(matches!(
        PolarQuantizer::new(PolarConfig {
            level_bits: vec![4, 9],
            ..cfg.clone()
        }),
        Err(Error::BitsOutOfRange { .. })
    ));
    assert!(matches!(
        b.extend(&[f32::NAN; 64]),
        Err(Error::NonFinite { .. })
    ));
    // a zero vector decodes to zero
    let mut z = PolarBatch::new(q);
    z.extend(&[0.0; 64]).unwrap();
    let mut out = vec![1.0; 64];
    z.dequantize_row(0, &mut out).unwrap();
    assert!(out.iter().all(|v| v.abs() < 1e-6));
}

#[test]
fn saved_polar_batches_round_trip_and_are_validated() {
    use tq_quant::AnyBatch;
    let d = 32;
    let q = Arc::new(
        PolarQuantizer::new(PolarConfig {
            dim: d,
            level_bits: vec![3, 2, 1],
            rotation: RotationKind::Hadamard,
            seed: 2,
        })
        .unwrap(),
    );
    let mut b = PolarBatch::new(q);
    b.extend(&rows(9, d, 8)).unwrap();
    let bytes = b.to_safetensors().unwrap();
    let AnyBatch::Polar(back) = AnyBatch::from_safetensors(&bytes).unwrap() else {
        panic!("kind")
    };
    assert_eq!(back.codes(), b.codes());
    assert_eq!(back.radii(), b.radii());
    assert_eq!(back.dequantize_all(), b.dequantize_all());
    for cut in (0..bytes.len()).step_by(7) {
        assert!(AnyBatch::from_safetensors(&bytes[..cut]).is_err());
    }
    // a radius above 1 is rejected, naming the tensor
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = 8 + n + header["radii"]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut bad = bytes.clone();
    bad[at..at + 2].copy_from_slice(&half::f16::from_f32(2.0).to_bits().to_le_bytes());
    assert!(matches!(
        AnyBatch::from_safetensors(&bad),
        Err(Error::InvalidFormat { what: "radii", .. })
    ));
    // A header asking for a 4096-dimensional Haar rotation over the tensors of d = 32 is refused
    // by the shape check, before the rotation (64 MB, about a minute) would be built.
    let mut header = header;
    header["__metadata__"]["config"] =
        r#"{"dim":4096,"level_bits":[3,2,1],"rotation":"haar","seed":2}"#.into();
    let h = serde_json::to_vec(&header).unwrap();
    let mut huge = (h.len() as u64).to_le_bytes().to_vec();
    huge.extend(h);
    huge.extend(&bytes[8 + n..]);
    assert!(matches!(
        AnyBatch::from_safetensors(&huge),
        Err(Error::InvalidFormat { what: "codes", .. })
    ));
}
