//! Saving and restoring whole caches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use tq_core::{SeededRng, rng::stream};
use tq_kv::{
    Error, HeadCalibration, HeadConfig, KeyStrategy, ModelCache, MultiHeadCache, Precision,
    calibrate_outliers,
};

fn rows(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n).map(|_| r.gaussian() as f32).collect()
}

fn model() -> (ModelCache, Vec<f32>, Vec<f32>) {
    let (d, nkv, nq, t) = (32, 2, 4, 50);
    let cfg = HeadConfig {
        key_strategy: KeyStrategy::Prod,
        window: 6,
        seed: 9,
        ..HeadConfig::new(
            d,
            Precision::parse("2.5", d).unwrap(),
            Precision::Uniform(3),
        )
    };
    let (k, v) = (rows(nkv * t * d, 1), rows(nkv * t * d, 2));
    let mut layers = Vec::new();
    for _ in 0..2 {
        let outliers: Vec<HeadCalibration> = (0..nkv)
            .map(|h| HeadCalibration {
                keys: Some(calibrate_outliers(&k[h * t * d..(h + 1) * t * d], d, 8).unwrap()),
                values: None,
                ..Default::default()
            })
            .collect();
        let mut layer = MultiHeadCache::new(nq, nkv, &cfg, &outliers).unwrap();
        layer.append(&k, &v).unwrap();
        layers.push(layer);
    }
    (ModelCache::from_layers(layers), k, v)
}

#[test]
fn round_trip_gives_identical_attention_and_continues_identically() {
    let (mut m, _, _) = model();
    let bytes = m.to_safetensors().unwrap();
    let mut back = ModelCache::from_safetensors(&bytes).unwrap();
    assert_eq!(back.memory_bytes(), m.memory_bytes());
    let q = rows(4 * 32, 3);
    for l in 0..2 {
        let (mut a, mut b) = (vec![0.0; 4 * 32], vec![0.0; 4 * 32]);
        m.layer(l).unwrap().attend(&q, &mut a).unwrap();
        back.layer(l).unwrap().attend(&q, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            m.layer(l).unwrap().head(1).unwrap().keys().unwrap(),
            back.layer(l).unwrap().head(1).unwrap().keys().unwrap()
        );
    }
    // Prefix reuse: appending to the restored cache equals appending to the original.
    let (k2, v2) = (rows(2 * 7 * 32, 4), rows(2 * 7 * 32, 5));
    m.layer_mut(0).unwrap().append(&k2, &v2).unwrap();
    back.layer_mut(0).unwrap().append(&k2, &v2).unwrap();
    let (mut a, mut b) = (vec![0.0; 4 * 32], vec![0.0; 4 * 32]);
    m.layer(0).unwrap().attend(&q, &mut a).unwrap();
    back.layer(0).unwrap().attend(&q, &mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn every_truncation_and_a_foreign_file_are_errors() {
    let (m, _, _) = model();
    let bytes = m.to_safetensors().unwrap();
    for cut in (0..bytes.len()).step_by(97) {
        assert!(ModelCache::from_safetensors(&bytes[..cut]).is_err());
    }
    let other = safetensors::serialize(
        Vec::<(&str, safetensors::tensor::TensorView<'_>)>::new(),
        None,
    )
    .unwrap();
    assert!(matches!(
        ModelCache::from_safetensors(&other),
        Err(Error::InvalidCache { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn bit_flips_never_panic(pos in 0usize..1_000_000, bit in 0u8..8) {
        let (m, _, _) = model();
        let mut bytes = m.to_safetensors().unwrap();
        let p = pos % bytes.len();
        bytes[p] ^= 1 << bit;
        let _ = ModelCache::from_safetensors(&bytes);
    }
}

/// A cache small enough to cut at every byte: one layer, one head, d = 16, 10 tokens, a window.
fn small_model() -> ModelCache {
    let d = 16;
    let cfg = HeadConfig {
        window: 2,
        seed: 3,
        ..HeadConfig::new(d, Precision::Uniform(3), Precision::Uniform(2))
    };
    let mut layer = MultiHeadCache::new(1, 1, &cfg, &[]).unwrap();
    layer.append(&rows(10 * d, 7), &rows(10 * d, 8)).unwrap();
    ModelCache::from_layers(vec![layer])
}

#[test]
fn a_file_cut_at_every_byte_is_a_typed_error() {
    let bytes = small_model().to_safetensors().unwrap();
    assert!(ModelCache::from_safetensors(&bytes).is_ok());
    for cut in 0..bytes.len() {
        match ModelCache::from_safetensors(&bytes[..cut]) {
            Err(Error::InvalidCache { .. } | Error::Quant(_)) => {}
            other => panic!("cut at {cut} of {}: {other:?}", bytes.len()),
        }
    }
}

/// Rewrites the `config` metadata of a saved cache with `edit` applied to its JSON.
fn with_config(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = md.metadata().clone().unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    edit(&mut config);
    meta.insert("config".into(), config.to_string());
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    safetensors::serialize(tensors, Some(meta)).unwrap()
}

/// Fills a one-layer cache of `cfg` with `t` random tokens per kv head, saves and restores it, and
/// checks that the two hold the same bytes, attend identically and stay identical through two
/// more appends; returns the saved bytes.
/// A cache with f16 sink and window rows saves them as F16 tensors and restores to the same
/// attention, continuing identically; its header edited to f32 rows (F16 tensors where F32 are
/// expected) is refused.
#[test]
fn f16_window_caches_round_trip_and_refuse_a_changed_width() {
    let (d, nkv, nq, t) = (32, 2, 4, 40);
    let cfg = HeadConfig {
        key_strategy: KeyStrategy::Kivi,
        group: 16,
        sink: 4,
        window: 5,
        seed: 9,
        window_precision: tq_kv::WindowPrecision::F16,
        ..HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(3))
    };
    let bytes = saved_round_trip(&cfg, nkv, nq, t, 41);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in ["l0.h1.window_keys", "l0.h0.sink_values"] {
        assert_eq!(
            st.tensor(name).unwrap().dtype(),
            safetensors::Dtype::F16,
            "{name}"
        );
    }
    let changed = with_config(&bytes, |c| {
        c["head"]["window_precision"] = serde_json::json!("f32")
    });
    assert!(matches!(
        ModelCache::from_safetensors(&changed),
        Err(Error::InvalidCache { .. })
    ));
}

fn saved_round_trip(cfg: &HeadConfig, nkv: usize, nq: usize, t: usize, seed: u64) -> Vec<u8> {
    let d = cfg.head_dim;
    let (k, v) = (rows(nkv * t * d, seed), rows(nkv * t * d, seed + 1));
    let mut layer = MultiHeadCache::new(nq, nkv, cfg, &[]).unwrap();
    layer.append(&k, &v).unwrap();
    let mut m = ModelCache::from_layers(vec![layer]);
    let bytes = m.to_safetensors().unwrap();
    let mut back = ModelCache::from_safetensors(&bytes).unwrap();
    assert_eq!(back.memory_bytes(), m.memory_bytes());
    let q = rows(nq * d, seed + 2);
    let (k2, v2) = (rows(nkv * 5 * d, seed + 3), rows(nkv * 5 * d, seed + 4));
    for step in 0..2 {
        let (mut a, mut b) = (vec![0.0; nq * d], vec![0.0; nq * d]);
        m.layer(0).unwrap().attend(&q, &mut a).unwrap();
        back.layer(0).unwrap().attend(&q, &mut b).unwrap();
        assert_eq!(a, b, "step {step}");
        m.layer_mut(0).unwrap().append(&k2, &v2).unwrap();
        back.layer_mut(0).unwrap().append(&k2, &v2).unwrap();
    }
    bytes
}

/// A header that promises a 4096-dimensional dense rotation per head over tensors of d = 16 is
/// refused by the shape check, which runs before any quantizer is built (building one would take
/// 64 MB and about a minute per head).
#[test]
fn a_header_larger_than_its_tensors_is_refused_before_building() {
    let bytes = small_model().to_safetensors().unwrap();
    let huge = with_config(&bytes, |c| {
        c["head"]["head_dim"] = 4096.into();
        c["head"]["rotation"] = "haar".into();
        c["layers"] = 1.into();
    });
    match ModelCache::from_safetensors(&huge) {
        Err(Error::InvalidCache { tensor, reason }) => {
            assert_eq!(tensor, "l0.h0.window_keys", "{reason}");
        }
        other => panic!("accepted or wrong error: {other:?}"),
    }
    // Windows that agree with the header but parts that do not are refused the same way.
    let st = safetensors::SafeTensors::deserialize(&huge).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&huge).unwrap();
    let empty = vec![0u8; 0];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("window"))
        .collect();
    for t in ["window_keys", "window_values"] {
        tensors.push((
            format!("l0.h0.{t}"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![0, 4096], &empty)
                .unwrap(),
        ));
    }
    let parts = safetensors::serialize(tensors, Some(md.metadata().clone().unwrap())).unwrap();
    match ModelCache::from_safetensors(&parts) {
        Err(Error::InvalidCache { tensor, reason }) => {
            assert_eq!(tensor, "l0.h0.keys", "{reason}");
            assert!(
                reason.contains("16 channels") && reason.contains("4096"),
                "{reason}"
            );
        }
        other => panic!("accepted or wrong error: {other:?}"),
    }
}

const SAVE_LOOP_ENV: &str = "TQ_KV_SAVE_LOOP";

/// Two caches of different lengths, so the test can tell which one a file holds.
fn save_loop_caches() -> [ModelCache; 2] {
    let d = 64;
    let cfg = HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(4));
    let make = |t: usize| {
        let mut layers = Vec::new();
        for l in 0..4 {
            let mut layer = MultiHeadCache::new(2, 2, &cfg, &[]).unwrap();
            layer
                .append(&rows(2 * t * d, 10 + l), &rows(2 * t * d, 20 + l))
                .unwrap();
            layers.push(layer);
        }
        ModelCache::from_layers(layers)
    };
    [make(300), make(500)]
}

/// The child side of `killing_a_save_leaves_the_old_or_the_new_file`: saves the two caches in
/// turn to the file named by `TQ_KV_SAVE_LOOP` until it is killed. Run only as that child.
#[test]
#[ignore = "child process of killing_a_save_leaves_the_old_or_the_new_file"]
fn save_loop_child() {
    let Ok(path) = std::env::var(SAVE_LOOP_ENV) else {
        return;
    };
    let caches = save_loop_caches();
    // The parent starts its random delay from here, so a slow start (a loaded machine) cannot
    // use the whole delay up before the first save.
    println!("ready");
    for i in 0.. {
        caches[i % 2].save(std::path::Path::new(&path)).unwrap();
    }
}

/// A process killed at random moments while it saves, again and again, always leaves a file that
/// loads and is one of the two caches it was writing.
#[test]
fn killing_a_save_leaves_the_old_or_the_new_file() {
    let dir = std::env::temp_dir().join(format!("tq-kv-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cache.safetensors");
    let caches = save_loop_caches();
    let lens: Vec<usize> = caches.iter().map(|c| c.layer(0).unwrap().len()).collect();
    caches[0].save(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut r = SeededRng::new(5, stream::DATA);
    let mut seen = [0usize; 2];
    for round in 0..12 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "save_loop_child",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(SAVE_LOOP_ENV, &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.trim_end().ends_with("ready") {
            line.clear();
            let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(n > 0, "round {round}: the child exited before it was ready");
        }
        std::thread::sleep(std::time::Duration::from_millis(20 + r.next_u64() % 380));
        child.kill().unwrap();
        child.wait().unwrap();
        let back = ModelCache::load(&path)
            .unwrap_or_else(|e| panic!("round {round}: the file no longer loads: {e}"));
        let len = back.layer(0).unwrap().len();
        let which = lens.iter().position(|&l| l == len).unwrap();
        seen[which] += 1;
    }
    let stale = std::fs::read_dir(&dir).unwrap().count() - 1;
    eprintln!("versions seen {seen:?}; saves cut mid-write (temporary files left): {stale}");
    std::fs::remove_dir_all(&dir).unwrap();
    // The second cache only ever reaches the file through the child's saves.
    assert!(seen[1] > 0, "the child never completed a save: {seen:?}");
}

/// No tensor depends on the query-head count, so a header may claim any: beyond `MAX_HEADS` it is
/// refused (a cache claiming 2^32 query heads used to load, then overflow `heads × head_dim` in
/// `attend`; found by reviewing the fuzz target).
#[test]
fn a_header_with_absurd_query_heads_is_refused() {
    let bytes = small_model().to_safetensors().unwrap();
    for q in [4_294_967_296u64, u64::MAX, (tq_kv::MAX_HEADS + 1) as u64] {
        let bad = with_config(&bytes, |c| c["n_q_heads"] = q.into());
        assert!(
            matches!(
                ModelCache::from_safetensors(&bad),
                Err(Error::HeadCounts { .. } | Error::InvalidCache { .. })
            ),
            "{q}"
        );
    }
}

/// A KIVI cache (per-channel keys with a residual mid-group, per-token values) saves and restores
/// to the same attention, continues identically, and a saved part with another group size is
/// refused.
#[test]
fn kivi_caches_round_trip_and_refuse_a_changed_group() {
    let (d, nkv, nq, t) = (32, 2, 4, 45);
    let cfg = HeadConfig {
        key_strategy: KeyStrategy::Kivi,
        value_strategy: tq_kv::ValueStrategy::Kivi,
        group: 16,
        seed: 9,
        ..HeadConfig::new(d, Precision::Uniform(3), Precision::Uniform(4))
    };
    let bytes = saved_round_trip(&cfg, nkv, nq, t, 11);
    let changed = with_config(&bytes, |c| c["head"]["group"] = serde_json::json!(32));
    assert!(matches!(
        ModelCache::from_safetensors(&changed),
        Err(Error::InvalidCache { .. })
    ));
}

/// A cache with f16 per-vector scales (KIVI keys, MSE values, a window) holds 2 bytes less per
/// quantized value row than the same cache with f32 scales, attends within the scales' rounding
/// of it, saves and restores to the same attention, and a saved cache whose configuration is
/// edited back to f32 scales is refused.
#[test]
fn f16_scale_caches_round_trip_and_refuse_a_changed_width() {
    let (d, nkv, nq, t) = (32, 2, 4, 45);
    let cfg = HeadConfig {
        key_strategy: KeyStrategy::Kivi,
        group: 16,
        window: 3,
        seed: 9,
        scale: tq_quant::ScaleMode::LeastSquares,
        ..HeadConfig::new(d, Precision::Uniform(3), Precision::Uniform(4))
    };
    let half = HeadConfig {
        scale_precision: tq_quant::ScalePrecision::F16,
        ..cfg.clone()
    };
    let (k, v) = (rows(nkv * t * d, 21), rows(nkv * t * d, 22));
    let caches = [&cfg, &half].map(|c| {
        let mut layer = MultiHeadCache::new(nq, nkv, c, &[]).unwrap();
        layer.append(&k, &v).unwrap();
        ModelCache::from_layers(vec![layer])
    });
    // Values are the MSE stream: (t - window) quantized rows per kv head, 2 bytes saved on each.
    assert_eq!(
        caches[0].memory_bytes() - caches[1].memory_bytes(),
        2 * nkv * (t - 3)
    );
    let q = rows(nq * d, 23);
    let (mut a, mut b) = (vec![0.0; nq * d], vec![0.0; nq * d]);
    caches[0].layer(0).unwrap().attend(&q, &mut a).unwrap();
    caches[1].layer(0).unwrap().attend(&q, &mut b).unwrap();
    // The keys (KIVI) are the same, so are the attention weights p_t (Σ p_t = 1); each decoded
    // value row only moves by its scale's rounding, at most 2^-11 relative, so each output
    // coordinate moves by at most 2^-11 · max_t |ṽ_t| (plus summation rounding, t terms).
    let vmax = (0..nkv)
        .flat_map(|h| {
            caches[0]
                .layer(0)
                .unwrap()
                .head(h)
                .unwrap()
                .values()
                .unwrap()
        })
        .fold(0f32, |m, x| m.max(x.abs()));
    let tol = (2f32.powi(-11) + 2.0 * t as f32 * f32::EPSILON) * vmax;
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= tol, "{x} {y} {tol}");
    }
    let bytes = saved_round_trip(&half, nkv, nq, t, 24);
    let changed = with_config(&bytes, |c| {
        c["head"]["scale_precision"] = serde_json::json!("f32")
    });
    assert!(matches!(
        ModelCache::from_safetensors(&changed),
        Err(Error::InvalidCache { .. })
    ));
}

/// A cache with a sink saves and restores to the same attention and continues identically; a
/// sink tensor in a cache configured without one, or a sink cut short before later tokens, is
/// refused.
#[test]
fn sink_caches_round_trip_and_refuse_inconsistent_sinks() {
    let (d, nkv, nq, t) = (32, 2, 4, 40);
    let cfg = HeadConfig {
        sink: 4,
        window: 3,
        seed: 9,
        ..HeadConfig::new(d, Precision::Uniform(3), Precision::Uniform(4))
    };
    let bytes = saved_round_trip(&cfg, nkv, nq, t, 31);
    for sink in [0, 6] {
        let changed = with_config(&bytes, |c| c["head"]["sink"] = serde_json::json!(sink));
        assert!(
            matches!(
                ModelCache::from_safetensors(&changed),
                Err(Error::InvalidCache { .. })
            ),
            "sink {sink}"
        );
    }
}

/// Version 1 and 2 files (written before sinks and f16 scales, before f16 windows) still load;
/// a version this build does not know is refused.
#[test]
fn older_versions_load_and_unknown_versions_are_refused() {
    let (m, _, _) = model();
    let bytes = m.to_safetensors().unwrap();
    let from = br#""version":"3""#;
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the version key");
    for (v, ok) in [(b'1', true), (b'2', true), (b'4', false), (b'0', false)] {
        let mut b = bytes.clone();
        b[at + from.len() - 2] = v;
        assert_eq!(
            ModelCache::from_safetensors(&b).is_ok(),
            ok,
            "version {}",
            v as char
        );
    }
}
