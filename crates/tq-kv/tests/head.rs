//! HeadCache behaviour: the fused path computes attention over the dequantized cache, error falls
//! with bits, fill order never matters, rollback, memory and errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use half::{bf16, f16};
use tq_core::{SeededRng, rng::stream};
use tq_kv::{
    Error, HeadCache, HeadCalibration, HeadConfig, KeyStrategy, Precision, ScoreMode,
    WindowPrecision, calibrate_outliers,
};

fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n * d).map(|_| r.gaussian() as f32).collect()
}

/// softmax(q Kᵀ / sqrt(d)) V in f64 over the first `limit` rows.
fn attention(q: &[f32], k: &[f32], v: &[f32], d: usize, limit: usize) -> Vec<f32> {
    let s: Vec<f64> = k
        .chunks_exact(d)
        .take(limit)
        .map(|kt| {
            q.iter()
                .zip(kt)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                / (d as f64).sqrt()
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut out = vec![0f64; d];
    for (w, vt) in e.iter().zip(v.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(vt) {
            *o += w / z * *x as f64;
        }
    }
    out.iter().map(|&x| x as f32).collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn config(d: usize, k: &str, v: &str, strategy: KeyStrategy, window: usize) -> HeadConfig {
    HeadConfig {
        key_strategy: strategy,
        window,
        seed: 3,
        score_mode: ScoreMode::Exact,
        ..HeadConfig::new(
            d,
            Precision::parse(k, d).unwrap(),
            Precision::parse(v, d).unwrap(),
        )
    }
}

fn outliers_for(cfg: &HeadConfig, keys: &[f32], values: &[f32]) -> HeadCalibration {
    let d = cfg.head_dim;
    let pick = |p: Precision, xs: &[f32]| match p {
        Precision::Split {
            outlier_channels, ..
        } => Some(calibrate_outliers(xs, d, outlier_channels).unwrap()),
        Precision::Uniform(_) => None,
    };
    let mean = |xs: &[f32]| {
        cfg.center
            .then(|| tq_quant::MseQuantizer::calibrate_mean(xs, d).unwrap())
    };
    HeadCalibration {
        keys: pick(cfg.key_precision, keys),
        values: pick(cfg.value_precision, values),
        key_mean: mean(keys),
        value_mean: mean(values),
    }
}

#[test]
fn fused_attention_equals_attention_over_the_dequantized_cache() {
    let d = 128;
    let n = 300;
    let (k, v) = (rows(n, d, 1), rows(n, d, 2));
    let qs = rows(5, d, 3);
    for (kb, vb, strategy, window) in [
        ("4", "4", KeyStrategy::Mse, 0),
        ("2", "3", KeyStrategy::Mse, 0),
        ("3", "2", KeyStrategy::Prod, 0),
        ("2.5", "3.5", KeyStrategy::Mse, 0),
        ("4", "2", KeyStrategy::Mse, 17),
        ("1", "1", KeyStrategy::Mse, 0),
        ("5", "6", KeyStrategy::Mse, 0),
    ] {
        let cfg = config(d, kb, vb, strategy, window);
        let mut cache = HeadCache::new(cfg.clone(), &outliers_for(&cfg, &k, &v)).unwrap();
        cache.append(&k, &v).unwrap();
        let (kd, vd) = (cache.keys().unwrap(), cache.values().unwrap());
        for q in qs.chunks_exact(d) {
            let mut out = vec![0.0; d];
            cache.attend(q, &mut out).unwrap();
            let want = attention(q, &kd, &vd, d, n);
            // Float rounding of the rotated-domain path: relative 1e-4 is ~1000 ulps of slack
            // for sums over 300 tokens.
            assert!(
                rel(&out, &want) < 1e-4,
                "k{kb} v{vb} {strategy:?} w{window}: {}",
                rel(&out, &want)
            );
        }
    }
}

#[test]
fn attention_error_falls_as_bits_grow() {
    let d = 128;
    let n = 512;
    let (k, v) = (rows(n, d, 4), rows(n, d, 5));
    // Peaked attention: queries close to a few keys.
    let qs: Vec<f32> = (0..8)
        .flat_map(|i| {
            k[i * 37 * d..(i * 37 + 1) * d]
                .iter()
                .map(|x| x * 1.5)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut last = f64::INFINITY;
    for bits in ["1", "2", "3", "4", "5"] {
        let cfg = HeadConfig {
            score_mode: ScoreMode::Fast,
            ..config(d, bits, bits, KeyStrategy::Mse, 0)
        };
        let mut cache = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
        cache.append(&k, &v).unwrap();
        let mut err = 0.0;
        for q in qs.chunks_exact(d) {
            let mut out = vec![0.0; d];
            cache.attend(q, &mut out).unwrap();
            err += rel(&out, &attention(q, &k, &v, d, n));
        }
        assert!(
            err < last,
            "{bits} bits: error {err} did not fall below {last}"
        );
        last = err;
    }
}

#[test]
fn fill_order_never_changes_codes_or_results() {
    let d = 64;
    let n = 90;
    let (k, v) = (rows(n, d, 6), rows(n, d, 7));
    for window in [0usize, 5, 40] {
        let cfg = HeadConfig {
            score_mode: ScoreMode::Fast,
            ..config(d, "3", "2", KeyStrategy::Prod, window)
        };
        let mut whole = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
        whole.append(&k, &v).unwrap();
        let mut single = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
        for t in 0..n {
            single
                .append(&k[t * d..(t + 1) * d], &v[t * d..(t + 1) * d])
                .unwrap();
        }
        let mut mixed = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
        let mut t = 0;
        for step in [3usize, 31, 1, 40, 15] {
            mixed
                .append(&k[t * d..(t + step) * d], &v[t * d..(t + step) * d])
                .unwrap();
            t += step;
        }
        for c in [&single, &mixed] {
            assert_eq!(c.len(), n);
            assert_eq!(c.keys().unwrap(), whole.keys().unwrap());
            assert_eq!(c.values().unwrap(), whole.values().unwrap());
            let (mut a, mut b) = (vec![0.0; d], vec![0.0; d]);
            c.attend(&k[..d], &mut a).unwrap();
            whole.attend(&k[..d], &mut b).unwrap();
            assert_eq!(a, b);
        }
    }
}

#[test]
fn suffix_decode_equals_full_decode_with_and_without_window() {
    let d = 48;
    let n = 70;
    let (k, v) = (rows(n, d, 16), rows(n, d, 17));
    for window in [0usize, 6, 100] {
        let mut c = HeadCache::new(
            config(d, "3", "4", KeyStrategy::Mse, window),
            &HeadCalibration::default(),
        )
        .unwrap();
        c.append(&k, &v).unwrap();
        let (full_k, full_v) = (c.keys().unwrap(), c.values().unwrap());
        for start in [0usize, 1, 33, n - window.min(n), n - 1, n, n + 5] {
            let s = start.min(n);
            assert_eq!(
                c.keys_from(start).unwrap(),
                full_k[s * d..],
                "w{window} start {start}"
            );
            assert_eq!(
                c.values_from(start).unwrap(),
                full_v[s * d..],
                "w{window} start {start}"
            );
        }
    }
}

#[test]
fn truncate_rolls_back_exactly() {
    let d = 32;
    let (k, v) = (rows(60, d, 8), rows(60, d, 9));
    for window in [0usize, 8] {
        let cfg = config(d, "4", "4", KeyStrategy::Mse, window);
        let mut a = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
        a.append(&k, &v).unwrap();
        a.truncate(45);
        assert_eq!(a.len(), 45);
        a.append(&k[45 * d..], &v[45 * d..]).unwrap();
        let mut b = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
        b.append(&k, &v).unwrap();
        if window == 0 {
            assert_eq!(a.keys().unwrap(), b.keys().unwrap());
        }
        a.clear();
        assert!(a.is_empty());
        let mut out = vec![1.0; d];
        a.attend(&k[..d], &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
    }
}

/// Attention keeps its weights in a per-thread scratch that it does not clear between steps: a
/// step right after a longer one on another cache (whose weights stay in the scratch) gives the
/// same bits as on a thread that never attended, on both score paths, with a sink, codes and a
/// window, and limits ending in each; TurboQuant keys with 3-bit values and KIVI keys with 4-bit
/// values (byte sums where the CPU has them, else the `i16` value sums).
#[test]
fn attention_is_untouched_by_the_scratch_of_earlier_steps() {
    let d = 64;
    let kinds = [("3", KeyStrategy::Mse), ("4", KeyStrategy::Kivi)];
    for (mode, (value_bits, keys)) in [ScoreMode::Exact, ScoreMode::Fast]
        .into_iter()
        .flat_map(|m| kinds.map(|k| (m, k)))
    {
        let mut long = HeadCache::new(
            HeadConfig {
                score_mode: mode,
                ..config(d, "4", "4", KeyStrategy::Mse, 0)
            },
            &HeadCalibration::default(),
        )
        .unwrap();
        long.append(&rows(700, d, 20), &rows(700, d, 21)).unwrap();
        let cfg = HeadConfig {
            sink: 3,
            score_mode: mode,
            group: 32,
            ..config(d, "4", value_bits, keys, 4)
        };
        let mut short = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
        short.append(&rows(90, d, 22), &rows(90, d, 23)).unwrap();
        let qs = rows(3, d, 24);
        // In the sink, in the codes, through the window.
        let limits = [2usize, 45, 90];
        let step = || {
            let mut out = vec![0.0; 3 * d];
            short.attend_block(&qs, &limits, &mut out).unwrap();
            out
        };
        let fresh = std::thread::scope(|s| s.spawn(step).join().unwrap());
        let mut out = vec![0.0; 4 * d];
        long.attend_block(&rows(4, d, 25), &[700; 4], &mut out)
            .unwrap();
        let after = step();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&after), bits(&fresh), "{mode:?} {keys:?}");
        let (kd, vd) = (short.keys().unwrap(), short.values().unwrap());
        if mode == ScoreMode::Exact {
            for (i, &l) in limits.iter().enumerate() {
                let want = attention(&qs[i * d..(i + 1) * d], &kd, &vd, d, l);
                assert!(rel(&after[i * d..(i + 1) * d], &want) < 1e-4, "limit {l}");
            }
        }
    }
}

#[test]
fn block_attention_with_causal_limits() {
    let d = 64;
    let (k, v) = (rows(100, d, 10), rows(100, d, 11));
    let cfg = config(d, "4", "3", KeyStrategy::Mse, 4);
    let mut cache = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
    cache.append(&k, &v).unwrap();
    let (kd, vd) = (cache.keys().unwrap(), cache.values().unwrap());
    let qs = rows(3, d, 12);
    let limits = [1usize, 50, 100];
    let mut out = vec![0.0; 3 * d];
    cache.attend_block(&qs, &limits, &mut out).unwrap();
    for (i, &l) in limits.iter().enumerate() {
        let want = attention(&qs[i * d..(i + 1) * d], &kd, &vd, d, l);
        assert!(rel(&out[i * d..(i + 1) * d], &want) < 1e-4, "limit {l}");
    }
    assert!(matches!(
        cache.attend_block(&qs, &[1, 2, 101], &mut out),
        Err(Error::PositionOutOfRange {
            limit: 101,
            len: 100
        })
    ));
    assert!(matches!(
        cache.attend_block(&qs, &[0, 2, 3], &mut out),
        Err(Error::PositionOutOfRange { .. })
    ));
    let mut scores = vec![0.0; 100];
    cache.scores(&qs[..d], &mut scores).unwrap();
    let s0: f32 = qs[..d]
        .iter()
        .zip(&kd[..d])
        .map(|(a, b)| a * b)
        .sum::<f32>()
        / 8.0;
    assert!((scores[0] - s0).abs() < 1e-4);
}

#[test]
fn memory_is_exact_and_4_bit_is_over_3_5x_smaller_than_f16() {
    let d = 128;
    let cfg = config(d, "4", "4", KeyStrategy::Mse, 0);
    let mut cache = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
    cache
        .append(&rows(1000, d, 13), &rows(1000, d, 14))
        .unwrap();
    assert_eq!(cache.memory_bytes(), 1000 * 2 * (64 + 4));
    assert_eq!(cache.f16_bytes(), 1000 * 2 * 2 * d);
    assert!(cache.f16_bytes() as f64 / cache.memory_bytes() as f64 >= 3.5);
    let cfg = config(d, "2.5", "2.5", KeyStrategy::Mse, 16);
    let k = rows(100, d, 15);
    let mut split = HeadCache::new(cfg.clone(), &outliers_for(&cfg, &k, &k)).unwrap();
    split.append(&k, &k).unwrap();
    // two parts per tensor: 16 + 24 code bytes and two norms; 16 window tokens in f32
    assert_eq!(
        split.memory_bytes(),
        84 * 2 * (16 + 24 + 8) + 16 * 2 * d * 4
    );
}

#[test]
fn half_precision_inputs_match_their_f32_values() {
    let d = 32;
    let k = rows(20, d, 16);
    let kh: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
    let kb: Vec<bf16> = k.iter().map(|&x| bf16::from_f32(x)).collect();
    let cfg = config(d, "3", "3", KeyStrategy::Mse, 0);
    let mut a = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
    a.append_f16(&kh, &kh).unwrap();
    let mut b = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
    let kf: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
    b.append(&kf, &kf).unwrap();
    assert_eq!(a.keys().unwrap(), b.keys().unwrap());
    let mut c = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
    c.append_bf16(&kb, &kb).unwrap();
    assert_eq!(c.len(), 20);
}

#[test]
fn typed_errors() {
    let d = 16;
    let mut cache = HeadCache::new(
        config(d, "2", "2", KeyStrategy::Mse, 0),
        &HeadCalibration::default(),
    )
    .unwrap();
    assert!(matches!(
        cache.append(&[0.0; 15], &[0.0; 15]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        cache.append(&[0.0; 16], &[0.0; 32]),
        Err(Error::Shape { .. })
    ));
    let mut bad = vec![0.0; 16];
    bad[4] = f32::NAN;
    assert!(matches!(
        cache.append(&bad, &[0.0; 16]),
        Err(Error::NonFinite {
            what: "keys",
            index: 4,
            ..
        })
    ));
    assert!(cache.is_empty());
    let mut out = vec![0.0; 16];
    assert!(matches!(
        cache.attend(&bad, &mut out),
        Err(Error::NonFinite { what: "query", .. })
    ));
    assert!(matches!(
        cache.attend(&[0.0; 3], &mut out),
        Err(Error::Shape { .. })
    ));
    let split = HeadCache::new(
        config(d, "2.5", "2", KeyStrategy::Mse, 0),
        &HeadCalibration::default(),
    );
    assert!(matches!(split, Err(Error::InvalidChannels { .. })));
    let wrong = HeadCalibration {
        keys: Some(vec![0, 1, 2]),
        values: None,
        ..Default::default()
    };
    assert!(matches!(
        HeadCache::new(config(d, "2.5", "2", KeyStrategy::Mse, 0), &wrong),
        Err(Error::InvalidChannels { .. })
    ));
}

/// Mean relative attention-output error over every query of the synthetic outlier trace.
fn trace_output_error(trace: &tq_kv::KvTrace, kb: &str, vb: &str) -> f64 {
    let d = trace.head_dim;
    let group = trace.q_heads / trace.kv_heads;
    let mut total = 0.0;
    let mut n = 0;
    for l in 0..trace.layers {
        for kv in 0..trace.kv_heads {
            let (k, v) = (trace.keys_of(l, kv), trace.values_of(l, kv));
            let cfg = HeadConfig {
                score_mode: ScoreMode::Fast,
                ..config(d, kb, vb, KeyStrategy::Mse, 0)
            };
            let mut cache = HeadCache::new(cfg.clone(), &outliers_for(&cfg, k, v)).unwrap();
            cache.append(k, v).unwrap();
            for h in kv * group..(kv + 1) * group {
                for (i, q) in trace.queries_of(l, h).chunks_exact(d).enumerate() {
                    let p = trace.query_positions[i];
                    let mut out = vec![0.0; d];
                    cache.attend_block(q, &[p], &mut out).unwrap();
                    total += rel(&out, &attention(q, k, v, d, p));
                    n += 1;
                }
            }
        }
    }
    total / n as f64
}

/// On keys with outlier channels, 3.5-bit mixed precision (64 channels at 4 bits, 64 at 3) beats
/// plain 3 bits on the attention output, at 1/2 bit more per coordinate.
#[test]
fn mixed_precision_beats_plain_bits_on_the_outlier_trace() {
    let trace = tq_kv::SyntheticTrace {
        layers: 2,
        kv_heads: 2,
        q_heads: 4,
        tokens: 256,
        head_dim: 128,
        queries: 12,
        outlier_channels: 8,
        seed: 11,
    }
    .generate()
    .unwrap();
    let plain = trace_output_error(&trace, "3", "3");
    let mixed = trace_output_error(&trace, "3.5", "3.5");
    let four = trace_output_error(&trace, "4", "4");
    assert!(mixed < 0.85 * plain, "3.5-bit {mixed} vs 3-bit {plain}");
    assert!(four < plain, "4-bit {four} vs 3-bit {plain}");
}

/// A centred cache (keys and values on calibrated means) still computes attention over its own
/// dequantized cache, restores identically, and is refused for Prod keys.
#[test]
fn centred_cache_attends_consistently_and_round_trips() {
    let d = 64;
    let n = 200;
    let shift: Vec<f32> = (0..d).map(|j| 2.0 + (j % 7) as f32 * 0.5).collect();
    let k: Vec<f32> = rows(n, d, 21)
        .chunks_exact(d)
        .flat_map(|r| r.iter().zip(&shift).map(|(a, b)| a + b).collect::<Vec<_>>())
        .collect();
    let v: Vec<f32> = rows(n, d, 22)
        .chunks_exact(d)
        .flat_map(|r| r.iter().zip(&shift).map(|(a, b)| a - b).collect::<Vec<_>>())
        .collect();
    for kb in ["3", "2.5"] {
        let cfg = HeadConfig {
            center: true,
            ..config(d, kb, "3", KeyStrategy::Mse, 5)
        };
        let cal = outliers_for(&cfg, &k, &v);
        let mut cache = HeadCache::new(cfg.clone(), &cal).unwrap();
        cache.append(&k, &v).unwrap();
        assert_eq!(
            cache.outliers().key_mean.as_deref(),
            cal.key_mean.as_deref()
        );
        let (kd, vd) = (cache.keys().unwrap(), cache.values().unwrap());
        let q = rows(1, d, 23);
        let mut out = vec![0.0; d];
        cache.attend(&q, &mut out).unwrap();
        assert!(rel(&out, &attention(&q, &kd, &vd, d, n)) < 1e-4, "k{kb}");
        let layer = tq_kv::MultiHeadCache::new(1, 1, &cfg, std::slice::from_ref(&cal)).unwrap();
        let mut model = tq_kv::ModelCache::from_layers(vec![layer]);
        let kh: Vec<f32> = k.clone();
        model.layer_mut(0).unwrap().append(&kh, &v).unwrap();
        let back = tq_kv::ModelCache::from_safetensors(&model.to_safetensors().unwrap()).unwrap();
        let (mut a, mut b) = (vec![0.0; d], vec![0.0; d]);
        model.layer(0).unwrap().attend(&q, &mut a).unwrap();
        back.layer(0).unwrap().attend(&q, &mut b).unwrap();
        assert_eq!(a, b);
    }
    let prod = HeadConfig {
        center: true,
        ..config(d, "3", "3", KeyStrategy::Prod, 0)
    };
    assert!(matches!(
        HeadCache::new(prod.clone(), &outliers_for(&prod, &k, &v)),
        Err(Error::InvalidChannels { .. })
    ));
    let missing = HeadConfig {
        center: true,
        ..config(d, "3", "3", KeyStrategy::Mse, 0)
    };
    assert!(matches!(
        HeadCache::new(missing, &HeadCalibration::default()),
        Err(Error::InvalidChannels { .. })
    ));
}

/// PolarQuant keys and values: the fused path still computes attention over the dequantized cache,
/// fill order does not matter, and the cache saves and restores.
#[test]
fn polar_keys_and_values() {
    let d = 64;
    let n = 120;
    let (k, v) = (rows(n, d, 31), rows(n, d, 32));
    let cfg = HeadConfig {
        value_strategy: tq_kv::ValueStrategy::Polar,
        ..config(d, "4", "4", KeyStrategy::Polar, 3)
    };
    let mut a = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
    a.append(&k, &v).unwrap();
    let mut b = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
    for t in 0..n {
        b.append(&k[t * d..(t + 1) * d], &v[t * d..(t + 1) * d])
            .unwrap();
    }
    assert_eq!(a.keys().unwrap(), b.keys().unwrap());
    let q = rows(1, d, 33);
    let mut out = vec![0.0; d];
    a.attend(&q, &mut out).unwrap();
    assert!(
        rel(
            &out,
            &attention(&q, &a.keys().unwrap(), &a.values().unwrap(), d, n)
        ) < 1e-4
    );
    let layer = tq_kv::MultiHeadCache::new(1, 1, &cfg, &[]).unwrap();
    let mut m = tq_kv::ModelCache::from_layers(vec![layer]);
    m.layer_mut(0).unwrap().append(&k, &v).unwrap();
    let back = tq_kv::ModelCache::from_safetensors(&m.to_safetensors().unwrap()).unwrap();
    let (mut x, mut y) = (vec![0.0; d], vec![0.0; d]);
    m.layer(0).unwrap().attend(&q, &mut x).unwrap();
    back.layer(0).unwrap().attend(&q, &mut y).unwrap();
    assert_eq!(x, y);
    // Prod values cannot be expressed: the name is refused with the reason.
    let e = "prod".parse::<tq_kv::ValueStrategy>().unwrap_err();
    assert!(e.contains("values cannot use prod"), "{e}");
    assert!(
        HeadCache::new(
            config(40, "4", "4", KeyStrategy::Polar, 0),
            &HeadCalibration::default()
        )
        .is_err()
    );
}

/// KIVI keys and values: attention on the codes (per-group tables, the f32 residual) equals
/// attention over the decoded cache; every fill order gives the same cache; rollback across a
/// group boundary keeps the kept tokens; the residual and every scale are counted in memory.
#[test]
fn kivi_keys_and_values_attend_on_codes() {
    use tq_kv::ValueStrategy;
    let d = 64;
    let n = 150;
    let (k, v) = (rows(n, d, 31), rows(n, d, 32));
    let qs = rows(4, d, 33);
    for (kb, vb, vs, group, window) in [
        ("4", "4", ValueStrategy::Kivi, 32, 0),
        ("2", "3", ValueStrategy::Mse, 16, 0),
        ("3", "2", ValueStrategy::Kivi, 64, 7),
        ("2.5", "4", ValueStrategy::Mse, 32, 0),
    ] {
        let cfg = HeadConfig {
            value_strategy: vs,
            group,
            ..config(d, kb, vb, KeyStrategy::Kivi, window)
        };
        let cal = HeadCalibration::from_samples(&cfg, &k, &v, &tq_kv::OutlierChoice::Auto).unwrap();
        let mut cache = HeadCache::new(cfg.clone(), &cal).unwrap();
        cache.append(&k, &v).unwrap();
        let (kd, vd) = (cache.keys().unwrap(), cache.values().unwrap());
        for q in qs.chunks_exact(d) {
            let mut out = vec![0.0; d];
            cache.attend(q, &mut out).unwrap();
            let want = attention(q, &kd, &vd, d, n);
            assert!(
                rel(&out, &want) < 1e-4,
                "k{kb} v{vb} {vs:?} G{group} w{window}: {}",
                rel(&out, &want)
            );
        }
        // Token by token and in uneven blocks: the same decoded cache.
        let mut single = HeadCache::new(cfg.clone(), &cal).unwrap();
        for t in 0..n {
            single
                .append(&k[t * d..(t + 1) * d], &v[t * d..(t + 1) * d])
                .unwrap();
        }
        assert_eq!(single.keys().unwrap(), kd);
        assert_eq!(single.values().unwrap(), vd);
        // Rollback into a quantized group keeps the kept tokens as they decoded: exactly in the
        // groups before the cut, at the residual's f16 precision in the group it cut into.
        let cut = group + group / 2 + 1;
        let mut a = HeadCache::new(cfg.clone(), &cal).unwrap();
        a.append(&k, &v).unwrap();
        a.truncate(cut);
        assert_eq!(a.len(), cut);
        let want: Vec<f32> = kd[..cut * d]
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if i < group * d {
                    x
                } else {
                    half::f16::from_f32(x).to_f32()
                }
            })
            .collect();
        assert_eq!(a.keys().unwrap(), want);
        a.append(&k[cut * d..], &v[cut * d..]).unwrap();
        assert_eq!(a.len(), n);
    }
    // Memory: 4-bit KIVI keys (G = 32) and values over 150 tokens, d = 64: codes 32 B per row
    // each, key scale + zero 2·2·64 B per complete group (4 of them), the 22-token key residual
    // in f16, value scale + zero 2·2·2 B per row.
    let cfg = HeadConfig {
        value_strategy: ValueStrategy::Kivi,
        ..config(d, "4", "4", KeyStrategy::Kivi, 0)
    };
    let mut c = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
    c.append(&k, &v).unwrap();
    let keys = 128 * 32 + 4 * 2 * 2 * 64 + 22 * 64 * 2;
    let values = 150 * (32 + 2 * 2 * 2);
    assert_eq!(c.memory_bytes(), keys + values);
}

/// A value no f16 zero can hold is refused by a KIVI stream before anything changes: keys, values
/// and window stay in step and the cache keeps working (a refused value used to leave the keys
/// one append ahead of the values).
#[test]
fn a_refused_append_changes_nothing() {
    use tq_kv::{MultiHeadCache, ValueStrategy};
    let d = 16;
    let (k, v) = (rows(40, d, 41), rows(40, d, 42));
    for window in [0usize, 3] {
        let cfg = HeadConfig {
            value_strategy: ValueStrategy::Kivi,
            group: 16,
            ..config(d, "3", "3", KeyStrategy::Mse, window)
        };
        let mut c = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
        c.append(&k[..20 * d], &v[..20 * d]).unwrap();
        let (keys, values) = (c.keys().unwrap(), c.values().unwrap());
        let mut bad = v[20 * d..25 * d].to_vec();
        bad[7] = 1e6;
        let e = c.append(&k[20 * d..25 * d], &bad).unwrap_err();
        assert!(e.to_string().contains("1000000"), "{e}");
        assert_eq!(
            (c.len(), c.keys().unwrap(), c.values().unwrap()),
            (20, keys, values)
        );
        c.append(&k[20 * d..], &v[20 * d..]).unwrap();
        assert_eq!(c.len(), 40);
        // Across heads: the second head's bad row leaves the first head unchanged too.
        let mut m = MultiHeadCache::new(2, 2, &cfg, &[]).unwrap();
        let mut vals = v[..2 * 10 * d].to_vec();
        vals[10 * d + 3] = -1e6;
        assert!(m.append(&k[..2 * 10 * d], &vals).is_err());
        assert_eq!(m.len(), 0);
    }
}

/// f16 value scales hold at most 65 504: a value row whose coordinates are all in f16's range but
/// whose scale is not is refused before anything changes (the default cache, with its sink and
/// window, and without them), in one head and across heads.
#[test]
fn a_scale_f16_cannot_hold_is_refused_before_anything_changes() {
    use tq_kv::MultiHeadCache;
    let d = 64;
    let (k, v) = (rows(40, d, 61), rows(40, d, 62));
    let big = vec![8200.0f32; d]; // every coordinate fits f16; the norm is 65 600
    for (sink, window) in [(4usize, 12usize), (0, 0), (0, 3)] {
        let cfg = HeadConfig {
            sink,
            window,
            ..HeadConfig::recommended(d)
        };
        let mut c = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
        c.append(&k[..20 * d], &v[..20 * d]).unwrap();
        let (keys, values) = (c.keys().unwrap(), c.values().unwrap());
        let mut bad = v[20 * d..25 * d].to_vec();
        bad[2 * d..3 * d].copy_from_slice(&big);
        let e = c.append(&k[20 * d..25 * d], &bad).unwrap_err();
        assert!(e.to_string().contains("65504"), "{e}");
        assert!(c.len() == 20 && c.keys().unwrap() == keys && c.values().unwrap() == values);
        let mut out = vec![0.0; 3 * d];
        let e = c.append_attend(
            &k[20 * d..25 * d],
            &bad,
            &k[..3 * d],
            &[1, 10, 25],
            &mut out,
        );
        assert!(e.is_err());
        assert!(c.len() == 20 && c.values().unwrap() == values);
        c.append(&k[20 * d..], &v[20 * d..]).unwrap();
        assert_eq!(c.len(), 40);
        let mut m = MultiHeadCache::new(2, 2, &cfg, &[]).unwrap();
        let mut vals = v[..2 * 10 * d].to_vec();
        vals[10 * d..11 * d].copy_from_slice(&big);
        assert!(m.append(&k[..2 * 10 * d], &vals).is_err());
        assert_eq!(m.len(), 0);
    }
}

/// One decoder step on the cache: the step's new tokens are attended exactly (the old ones on
/// their codes), causally, and afterwards the cache holds what a plain append gives.
#[test]
fn append_attend_sees_the_new_tokens_exact_then_quantizes_them() {
    let (d, old, new) = (64, 40, 5);
    for (window, strategy) in [
        (0, KeyStrategy::Mse),
        (2, KeyStrategy::Mse),
        (0, KeyStrategy::Kivi),
    ] {
        let mut cfg = HeadConfig::new(d, Precision::Uniform(3), Precision::Uniform(3));
        cfg.window = window;
        cfg.key_strategy = strategy;
        cfg.group = 16;
        cfg.score_mode = ScoreMode::Exact;
        let none = HeadCalibration::default();
        let (k0, v0) = (rows(old, d, 1), rows(old, d, 2));
        let (k1, v1) = (rows(new, d, 3), rows(new, d, 4));
        let q = rows(new, d, 5);
        let mut a = HeadCache::new(cfg.clone(), &none).unwrap();
        a.append(&k0, &v0).unwrap();
        let mut b = a.clone();
        // Reference: the old tokens as the cache decodes them, the new ones exact.
        let (mut keys, mut values) = (a.keys().unwrap(), a.values().unwrap());
        keys.extend_from_slice(&k1);
        values.extend_from_slice(&v1);
        let limits: Vec<usize> = (old + 1..=old + new).collect();
        let mut out = vec![0.0; new * d];
        a.append_attend(&k1, &v1, &q, &limits, &mut out).unwrap();
        for (i, &lim) in limits.iter().enumerate() {
            let want = attention(&q[i * d..(i + 1) * d], &keys, &values, d, lim);
            let err = out[i * d..(i + 1) * d]
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err < 1e-4, "w{window} {strategy:?} query {i}: {err}");
        }
        b.append(&k1, &v1).unwrap();
        assert_eq!(a.len(), b.len());
        assert_eq!(a.window_len(), b.window_len());
        assert_eq!(a.memory_bytes(), b.memory_bytes());
        assert_eq!(a.keys().unwrap(), b.keys().unwrap());
        assert_eq!(a.values().unwrap(), b.values().unwrap());
        // A limit past the new length changes nothing.
        let before = a.len();
        let bad = [before + new + 1; 1];
        assert!(matches!(
            a.append_attend(&k1, &v1, &q[..d], &bad, &mut out[..d]),
            Err(Error::PositionOutOfRange { .. })
        ));
        assert_eq!(a.len(), before);
    }
}

/// A sink keeps the first `S` tokens exact for good: whatever the fill order, the codes and the
/// attention are the same; attention (any causal limit, inside the sink or past it) equals
/// attention over the decoded cache; suffix decoding and rollback across the sink's end are
/// exact; the sink costs exactly its f32 rows.
#[test]
fn sink_tokens_stay_exact_and_everything_else_is_unchanged() {
    let (d, n, sink) = (32, 90, 5);
    let (k, v) = (rows(n, d, 41), rows(n, d, 42));
    for (strategy, window) in [
        (KeyStrategy::Mse, 0usize),
        (KeyStrategy::Mse, 7),
        (KeyStrategy::Kivi, 0),
        (KeyStrategy::Kivi, 7),
    ] {
        let cfg = HeadConfig {
            sink,
            group: 16,
            ..config(d, "3", "4", strategy, window)
        };
        let what = format!("{strategy:?} w{window}");
        let new = || HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
        let mut whole = new();
        whole.append(&k, &v).unwrap();
        assert_eq!((whole.len(), whole.sink_len()), (n, sink), "{what}");
        let (kd, vd) = (whole.keys().unwrap(), whole.values().unwrap());
        assert!(kd[..sink * d] == k[..sink * d], "{what}");
        assert!(vd[..sink * d] == v[..sink * d], "{what}");
        // The quantized tokens are those of a sink-less cache fed tokens sink.. .
        let mut plain = HeadCache::new(
            HeadConfig {
                sink: 0,
                ..cfg.clone()
            },
            &HeadCalibration::default(),
        )
        .unwrap();
        plain.append(&k[sink * d..], &v[sink * d..]).unwrap();
        assert!(kd[sink * d..] == plain.keys().unwrap()[..], "{what}");
        assert_eq!(
            whole.memory_bytes(),
            plain.memory_bytes() + 2 * 4 * sink * d,
            "{what}"
        );
        // Fill order: one token at a time, and blocks straddling the sink's end.
        let mut single = new();
        for t in 0..n {
            single
                .append(&k[t * d..(t + 1) * d], &v[t * d..(t + 1) * d])
                .unwrap();
        }
        let mut mixed = new();
        let mut t = 0;
        for step in [3usize, 4, 31, 1, 40, 11] {
            mixed
                .append(&k[t * d..(t + step) * d], &v[t * d..(t + step) * d])
                .unwrap();
            t += step;
        }
        let qs = rows(4, d, 43);
        let limits = [2usize, sink, sink + 1, n];
        let mut want_block = vec![0.0; 4 * d];
        whole.attend_block(&qs, &limits, &mut want_block).unwrap();
        for (i, &l) in limits.iter().enumerate() {
            let want = attention(&qs[i * d..(i + 1) * d], &kd, &vd, d, l);
            let got = &want_block[i * d..(i + 1) * d];
            assert!(rel(got, &want) < 1e-4, "{what} limit {l}");
        }
        for c in [&single, &mixed] {
            assert!(c.keys().unwrap() == kd, "{what}");
            assert!(c.values().unwrap() == vd, "{what}");
            let mut out = vec![0.0; 4 * d];
            c.attend_block(&qs, &limits, &mut out).unwrap();
            assert!(out == want_block, "{what}");
        }
        let mut scores = vec![0.0; n];
        whole.scores(&qs[..d], &mut scores).unwrap();
        for (t, s) in scores.iter().enumerate() {
            let exact: f32 = qs[..d]
                .iter()
                .zip(&kd[t * d..(t + 1) * d])
                .map(|(a, b)| a * b)
                .sum::<f32>()
                / (d as f32).sqrt();
            assert!((s - exact).abs() < 1e-4, "{what} token {t}");
        }
        for start in [0usize, 3, sink, sink + 1, 40, n - window, n] {
            assert!(
                whole.keys_from(start).unwrap() == kd[start * d..],
                "{what} {start}"
            );
            assert!(
                whole.values_from(start).unwrap() == vd[start * d..],
                "{what} {start}"
            );
        }
        // Rollback into the sink and past it, then the same tokens again.
        for cut in [3usize, sink, 30] {
            let mut c = whole.clone();
            c.truncate(cut);
            assert_eq!(c.len(), cut, "{what}");
            assert_eq!(c.sink_len(), cut.min(sink), "{what}");
            c.append(&k[cut * d..], &v[cut * d..]).unwrap();
            // Codes equal the whole fill's unless rows were quantized before the cut and their
            // group changes (a window, or KIVI's groups); after a cut inside the sink every later
            // token is new.
            if (window == 0 && strategy == KeyStrategy::Mse) || cut < sink {
                assert!(c.keys().unwrap() == kd, "{what} cut {cut}");
            }
            assert!(c.keys_from(0).unwrap()[..sink * d] == k[..sink * d]);
        }
    }
}

/// The compact configuration needs its key split calibrated: without channels it is a typed
/// error, with `from_samples` it builds, stores fewer bits than the default, and attends close
/// to exact attention.
#[test]
fn compact_configuration_is_calibrated_then_attends() {
    let (d, n) = (64, 300);
    let (k, v) = (rows(n, d, 51), rows(n, d, 52));
    let cfg = HeadConfig::compact(d);
    assert!(matches!(
        HeadCache::new(cfg.clone(), &HeadCalibration::default()),
        Err(Error::InvalidChannels { .. })
    ));
    let cal = HeadCalibration::from_samples(&cfg, &k, &v, &tq_kv::OutlierChoice::Auto).unwrap();
    let mut cache = HeadCache::new(cfg, &cal).unwrap();
    cache.append(&k, &v).unwrap();
    let mut default =
        HeadCache::new(HeadConfig::recommended(d), &HeadCalibration::default()).unwrap();
    default.append(&k, &v).unwrap();
    assert!(cache.memory_bytes() < default.memory_bytes());
    let q = rows(1, d, 53);
    let mut out = vec![0.0; d];
    cache.attend(&q, &mut out).unwrap();
    let want = attention(&q, &k, &v, d, n);
    // 3-bit values alone carry sqrt(D_mse) = sqrt(0.034) = 0.18 relative error each, which a
    // wide average of random values keeps; 0.3 leaves 0.12 for the split keys' score error.
    assert!(rel(&out, &want) < 0.3, "{}", rel(&out, &want));
}

/// f16 sink and window rows: a cache storing them in f16 behaves exactly like an f32-row cache
/// fed the same tokens rounded to f16 (every token passes through the window, so even the
/// quantized ones start from the rounded values), for attention at every causal limit, decoded
/// rows and rollback; it stores 2 bytes less per sink and window value; a value f16 cannot hold
/// is refused before anything changes (and accepted by f32 rows).
#[test]
fn f16_window_rows_equal_f32_rows_of_rounded_tokens() {
    let (d, n) = (32, 70);
    let (k, v) = (rows(n, d, 61), rows(n, d, 62));
    let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&a| f16::from_f32(a).to_f32()).collect() };
    for (strategy, sink, window) in [
        (KeyStrategy::Kivi, 4usize, 12usize),
        (KeyStrategy::Mse, 0, 6),
        (KeyStrategy::Mse, 3, 1),
    ] {
        let what = format!("{strategy:?} sink {sink} window {window}");
        let f32_rows = HeadConfig {
            key_strategy: strategy,
            group: 16,
            sink,
            window,
            ..HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(3))
        };
        let f16_rows = HeadConfig {
            window_precision: WindowPrecision::F16,
            ..f32_rows.clone()
        };
        let mut a = HeadCache::new(f16_rows, &HeadCalibration::default()).unwrap();
        let mut b = HeadCache::new(f32_rows, &HeadCalibration::default()).unwrap();
        for (kc, vc) in k.chunks(7 * d).zip(v.chunks(7 * d)) {
            a.append(kc, vc).unwrap();
            b.append(&round(kc), &round(vc)).unwrap();
        }
        assert_eq!(a.keys().unwrap(), b.keys().unwrap(), "{what}");
        assert_eq!(a.values().unwrap(), b.values().unwrap(), "{what}");
        assert_eq!(
            b.memory_bytes() - a.memory_bytes(),
            2 * 2 * (sink + window) * d,
            "{what}"
        );
        let q = rows(3, d, 63);
        let limits = [1usize, sink.max(1), n];
        let (mut oa, mut ob) = (vec![0.0; 3 * d], vec![0.0; 3 * d]);
        a.attend_block(&q, &limits, &mut oa).unwrap();
        b.attend_block(&q, &limits, &mut ob).unwrap();
        assert_eq!(oa, ob, "{what}");
        // A decoder step attends to its own new tokens exact, stored rounding or not: new
        // tokens straddling the sink's end, then a step past it.
        let (mut sa, mut sb) = (
            HeadCache::new(a.config().clone(), &HeadCalibration::default()).unwrap(),
            HeadCache::new(b.config().clone(), &HeadCalibration::default()).unwrap(),
        );
        for (from, to) in [(0usize, 6usize), (6, 30), (30, 31)] {
            let (kc, vc) = (&k[from * d..to * d], &v[from * d..to * d]);
            let limits: Vec<usize> = (from + 1..=to).collect();
            let qs = rows(to - from, d, 64 + from as u64);
            let (mut xa, mut xb) = (vec![0.0; qs.len()], vec![0.0; qs.len()]);
            sa.append_attend(kc, vc, &qs, &limits, &mut xa).unwrap();
            sb.append_attend(kc, vc, &qs, &limits, &mut xb).unwrap();
            assert_eq!(xa, xb, "{what}: step {from}..{to}");
            // Then store them rounded in the f32 cache too, as the f16 cache did.
            sb.truncate(from);
            sb.append(&round(kc), &round(vc)).unwrap();
        }
        a.truncate(n - 3);
        b.truncate(n - 3);
        assert_eq!(
            a.keys().unwrap(),
            b.keys().unwrap(),
            "{what} after rollback"
        );
        // Out of f16's range: refused with nothing changed; f32 rows take it.
        let before = (a.len(), a.keys().unwrap());
        let mut big = k[..d].to_vec();
        big[5] = 70_000.0;
        assert!(
            matches!(
                a.append(&big, &v[..d]),
                Err(Error::Quant(tq_quant::Error::ValueOutOfRange {
                    index: 5,
                    ..
                }))
            ),
            "{what}"
        );
        assert!(matches!(
            a.append(&k[..d], &big),
            Err(Error::Quant(tq_quant::Error::ValueOutOfRange { .. }))
        ));
        assert_eq!((a.len(), a.keys().unwrap()), before, "{what}");
        if strategy == KeyStrategy::Mse {
            b.append(&big, &v[..d]).unwrap();
        }
    }
}

/// With f16 rows and no window, a decoder step's new tokens only pass through the window: they
/// are attended exact and quantized from their exact values, so `append_attend` leaves the same
/// codes as `append`, and a value beyond f16's range past the sink is taken (the MSE streams
/// hold it) without leaving keys and values out of step.
#[test]
fn f16_rows_without_a_window_quantize_the_exact_tokens() {
    let (d, n) = (32, 20);
    let (mut k, v) = (rows(n, d, 71), rows(n, d, 72));
    k[5 * d + 3] = 70_000.0;
    let cfg = HeadConfig {
        sink: 2,
        window_precision: WindowPrecision::F16,
        ..HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(3))
    };
    let mut a = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
    let mut b = HeadCache::new(cfg, &HeadCalibration::default()).unwrap();
    a.append(&k, &v).unwrap();
    for t in 0..n {
        let q = rows(1, d, 73 + t as u64);
        let mut out = vec![0.0; d];
        b.append_attend(
            &k[t * d..(t + 1) * d],
            &v[t * d..(t + 1) * d],
            &q,
            &[t + 1],
            &mut out,
        )
        .unwrap();
        assert!(out.iter().all(|x| x.is_finite()), "step {t}");
    }
    assert_eq!((a.len(), b.len(), b.window_len()), (n, n, 0));
    assert_eq!(a.keys().unwrap(), b.keys().unwrap());
    assert_eq!(a.values().unwrap(), b.values().unwrap());
    // The sink itself is f16: a value it cannot hold is refused there.
    let mut c = HeadCache::new(a.config().clone(), &HeadCalibration::default()).unwrap();
    let mut big = k[..d].to_vec();
    big[0] = 70_000.0;
    assert!(c.append(&big, &v[..d]).is_err());
    assert_eq!(c.len(), 0);
}
