//! The real-model smoke test on SmolLM2-135M-Instruct (exported by scripts/setup-real-model.sh,
//! which scripts/test.sh runs first): the export answers the reference prompt exactly, and
//! 16-token compares with the documented default cache and a plain 4-bit cache (3.5x less memory
//! than f16) stay close to the exact run. Outside CI a missing export skips with a message; with
//! CI=true it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tq_kv::{HeadConfig, Precision};
use tq_onnx::{CacheSpec, Decoder, Keep, Sampling, generate, replay};

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("TQ_REAL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../artifacts/smollm2-135m-instruct")
        });
    if dir.join("model.onnx").is_file() {
        return Some(dir);
    }
    let msg = format!(
        "{} holds no exported model: run scripts/setup-real-model.sh",
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("skipping the real-model smoke test: {msg}");
    None
}

#[test]
fn smollm2_answers_and_a_4_bit_cache_tracks_the_exact_run() {
    let Some(dir) = model_dir() else { return };
    let dec = Decoder::open(&dir).unwrap();
    assert_eq!((dec.layers(), dec.kv_heads(), dec.head_dim()), (30, 3, 64));
    let b = dec.bundle();
    let ids = b
        .encode(&b.chat_prompt("What is the capital of France?").unwrap())
        .unwrap();
    let keep = Keep {
        logits: true,
        trace: false,
    };
    let answer = generate(
        &dec,
        &CacheSpec::Exact,
        &ids,
        16,
        Sampling::Greedy,
        keep,
        &mut || {},
    )
    .unwrap();
    assert_eq!(answer.tokens, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    assert_eq!(
        b.decode(&answer.tokens).unwrap(),
        "The capital of France is Paris."
    );
    assert!(answer.stopped_at_eos);

    let ids = b
        .encode(
            &b.chat_prompt("Describe a rainy afternoon in a small town.")
                .unwrap(),
        )
        .unwrap();
    let exact = generate(
        &dec,
        &CacheSpec::Exact,
        &ids,
        16,
        Sampling::Greedy,
        keep,
        &mut || {},
    )
    .unwrap();
    assert_eq!(exact.tokens.len(), 16);
    // The documented default: within the smoke test's 16 tokens, at most one argmax may differ.
    let default = CacheSpec::Quantized {
        config: HeadConfig::recommended(64),
        calibration: Vec::new(),
    };
    let (run, cmp) = replay(
        &dec,
        &default,
        &ids,
        &exact.tokens,
        &exact.logits,
        5,
        &mut || {},
    )
    .unwrap();
    let m = cmp.summary();
    eprintln!(
        "default cache, 16-token compare: {m:?}, kv ratio {:.2}",
        ratio(&run)
    );
    assert!(m.top1_agreement >= 0.9, "{m:?}");
    assert!(m.perplexity_quantized / m.perplexity_exact < 1.05, "{m:?}");
    // Plain 4-bit TurboQuant_mse keys and values: 3.56x smaller than f16 at d = 64 (4 bits of
    // code plus a 32-bit norm per 64 coordinates), drift bounded.
    let p = Precision::Uniform(4);
    let four = CacheSpec::Quantized {
        config: HeadConfig::new(64, p, p),
        calibration: Vec::new(),
    };
    let (run, cmp) = replay(
        &dec,
        &four,
        &ids,
        &exact.tokens,
        &exact.logits,
        5,
        &mut || {},
    )
    .unwrap();
    let m = cmp.summary();
    eprintln!(
        "4-bit cache, 16-token compare: {m:?}, kv ratio {:.2}",
        ratio(&run)
    );
    assert!(ratio(&run) >= 3.5);
    assert!(m.top1_agreement >= 0.75, "{m:?}");
    assert!(m.perplexity_quantized / m.perplexity_exact < 1.15, "{m:?}");
}

fn ratio(run: &tq_onnx::Run) -> f64 {
    run.f16_bytes as f64 / run.kv_bytes as f64
}

/// The native path (tract runs the stages around attention, tq-kv attends on its cache, no float
/// past) on SmolLM2: greedy decoding with exact storage answers the reference prompt, its logits
/// equal the float run's at every step, and with the documented default cache (exact scores)
/// they equal the float path over the same codes. "The same codes": each native step starts from
/// a copy of the float sequence's cache before that step. Two free-running sequences drift apart
/// for a reason that is not attention: the two paths' K/V differ in the last bits, and the few
/// coordinates that sit on a quantization boundary round to different codes (measured: 47 keys
/// and 104 values in the prompt), which moves the logits by up to ~3e-4 after 8 steps.
#[test]
fn smollm2_native_path_matches_the_float_path() {
    use tq_kv::ScoreMode;
    use tq_onnx::{Attention, Sequence};
    let Some(dir) = model_dir() else { return };
    let float = Decoder::open(&dir).unwrap();
    let native = Decoder::open_with(&dir, Attention::Native).unwrap();
    let b = float.bundle();
    let ids = b
        .encode(&b.chat_prompt("What is the capital of France?").unwrap())
        .unwrap();
    let mut config = HeadConfig::recommended(64);
    config.score_mode = ScoreMode::Exact;
    let quantized = CacheSpec::Quantized {
        config,
        calibration: Vec::new(),
    };
    for (label, spec) in [("exact", CacheSpec::Exact), ("default", quantized)] {
        let mut a_seq = Sequence::new(&float, &spec).unwrap();
        let mut b_seq = Sequence::new(&native, &spec).unwrap();
        let (mut next, mut tokens, mut worst) = (ids.clone(), Vec::new(), 0.0f32);
        for _ in 0..8 {
            // The native step attends over a copy of the float sequence's codes (exact storage
            // keeps its own, bit-for-bit the same rows up to f32 rounding).
            let shared = match a_seq.cache() {
                Some(cache) if label == "default" => Some(cache.clone()),
                _ => None,
            };
            let a = a_seq.feed(&next).unwrap().logits;
            let n = match shared {
                Some(mut cache) => native.native_step(&next, &mut cache).unwrap(),
                None => b_seq.feed(&next).unwrap().logits,
            };
            let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(&n)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            worst = worst.max(diff / scale);
            let best = n
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap()
                .0;
            tokens.push(best as u32);
            next = vec![best as u32];
        }
        eprintln!("native vs float, {label} cache: worst relative logit difference {worst:.2e}");
        assert!(worst < 1e-4, "{worst}");
        if label == "exact" {
            assert_eq!(tokens, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
        }
    }
}
