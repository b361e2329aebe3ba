//! The native path against the float-past path on the tiny fixture: with exact storage the
//! logits equal the exact float run's, and with the same quantized cache (exact scores) they equal
//! the float path over the codes' decoded past, at every step of a prefill and single-token
//! decode. Bad bundles fail with typed errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tq_kv::{HeadConfig, Precision, ScoreMode};
use tq_onnx::{Attention, CacheSpec, Decoder, Error, Sequence};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama")
}

/// Largest |a − b| over the largest |b| (one number per step's logits).
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale.max(1e-30)
}

/// A prefill of the prompt, then single tokens (the float path's greedy choices), through both
/// paths with the same cache; returns the worst relative logit difference.
fn compare(spec: &CacheSpec) -> f32 {
    let float = Decoder::open(tiny()).unwrap();
    let native = Decoder::open_with(tiny(), Attention::Native).unwrap();
    assert_eq!(native.attention(), Attention::Native);
    let ids = float.bundle().encode("The capital of France is").unwrap();
    let mut a_seq = Sequence::new(&float, spec).unwrap();
    let mut b_seq = Sequence::new(&native, spec).unwrap();
    let mut worst = 0.0f32;
    let mut next = ids.clone();
    for _ in 0..8 {
        let a = a_seq.feed(&next).unwrap().logits;
        let b = b_seq.feed(&next).unwrap().logits;
        worst = worst.max(rel(&b, &a));
        let best = a
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0;
        next = vec![best as u32];
    }
    assert_eq!(a_seq.len(), b_seq.len());
    assert_eq!(b_seq.cache().unwrap().layer(0).unwrap().len(), b_seq.len());
    // The native path keeps no float past.
    assert_eq!(b_seq.past().len(), 0);
    worst
}

#[test]
fn exact_storage_gives_the_exact_run() {
    let worst = compare(&CacheSpec::Exact);
    eprintln!("exact: worst relative logit difference {worst:.2e}");
    assert!(worst < 1e-4, "relative logit difference {worst}");
}

#[test]
fn the_same_codes_give_the_float_path_over_them() {
    for (k, v, window) in [(4, 4, 0), (3, 2, 2)] {
        let mut config = HeadConfig::new(32, Precision::Uniform(k), Precision::Uniform(v));
        config.window = window;
        config.score_mode = ScoreMode::Exact;
        let spec = CacheSpec::Quantized {
            config: config.clone(),
            calibration: Vec::new(),
        };
        let worst = compare(&spec);
        eprintln!("k{k} v{v} w{window}: worst relative logit difference {worst:.2e}");
        assert!(
            worst < 1e-4,
            "k{k} v{v} w{window}: relative logit difference {worst}"
        );
    }
}

#[test]
fn bad_bundles_and_caches_are_typed_errors() {
    // A bundle without native stages.
    let dir = std::env::temp_dir().join(format!("tq-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.onnx", "tokenizer.json", "config.json"] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    assert!(!Decoder::native_available(&dir));
    let err = Decoder::open_with(&dir, Attention::Native).unwrap_err();
    assert!(
        matches!(err, Error::MissingFile { .. }) && err.to_string().contains("stage0"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();

    let native = Decoder::open_with(tiny(), Attention::Native).unwrap();
    assert!(Decoder::native_available(tiny()));
    let mut cache = native.exact_cache().unwrap();
    assert!(matches!(
        native.native_step(&[], &mut cache),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        native.native_step(&[100_000], &mut cache),
        Err(Error::InvalidArgument(_))
    ));
    let wrong = HeadConfig::new(64, Precision::Uniform(4), Precision::Uniform(4));
    assert!(matches!(
        native.new_cache(&wrong, &[]),
        Err(Error::InvalidArgument(_))
    ));
    // The float graph is not loaded on a native decoder, and the other way round.
    assert!(matches!(
        native.step(&[1], &native.empty_past().unwrap()),
        Err(Error::Unsupported(_))
    ));
    let float = Decoder::open(tiny()).unwrap();
    assert!(matches!(
        float.native_step(&[1], &mut cache),
        Err(Error::Unsupported(_))
    ));
}
