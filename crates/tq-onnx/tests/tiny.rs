//! tq-onnx on the committed tiny decoder (2 layers, random weights, real BPE tokenizer): graph
//! plumbing, cache feedback, metrics and typed errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tq_kv::{HeadConfig, KvTrace, Precision};
use tq_onnx::{
    CacheSpec, Decoder, Error, Keep, OutlierChoice, Sampling, Sequence, calibrate, generate,
    replay, teacher_forced, token_match, trace_of,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama")
}

fn decoder() -> Decoder {
    Decoder::open(fixture()).unwrap()
}

fn quantized(d: usize, bits: &str, window: usize) -> CacheSpec {
    let p = Precision::parse(bits, d).unwrap();
    CacheSpec::Quantized {
        config: HeadConfig {
            window,
            seed: 5,
            ..HeadConfig::new(d, p, p)
        },
        calibration: Vec::new(),
    }
}

fn prompt(dec: &Decoder) -> Vec<u32> {
    dec.bundle()
        .encode("The quick brown fox jumps over the lazy dog. What is the capital of France?")
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn facts_come_from_the_graph_and_config() {
    let dec = decoder();
    assert_eq!((dec.layers(), dec.kv_heads(), dec.head_dim()), (2, 2, 32));
    assert_eq!(dec.config().q_heads, 4);
    assert_eq!(dec.config().vocab, 384);
    assert_eq!(dec.config().eos_token_ids, vec![2]);
    assert!(dec.has_queries());
    let chat = dec.bundle().chat_prompt("Hi there").unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = dec.bundle().encode(&chat).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert_eq!(
        dec.bundle()
            .decode(&dec.bundle().encode("Paris 123").unwrap())
            .unwrap(),
        "Paris 123"
    );
}

#[test]
fn one_prefill_equals_token_by_token_steps() {
    // Causal mask, positions and the past all line up: feeding the prompt at once or one token
    // at a time gives the same logits and the same cache (up to float reassociation).
    let dec = decoder();
    let ids = prompt(&dec);
    let mut whole = Sequence::new(&dec, &CacheSpec::Exact).unwrap();
    let a = whole.feed(&ids).unwrap();
    let mut steps = Sequence::new(&dec, &CacheSpec::Exact).unwrap();
    let mut last = None;
    for &t in &ids {
        last = Some(steps.feed(&[t]).unwrap());
    }
    let b = last.unwrap();
    let scale = a.logits.iter().map(|x| x.abs()).fold(0.0, f32::max);
    assert!(max_abs_diff(&a.logits, &b.logits) <= 1e-4 * scale.max(1.0));
    for l in 0..dec.layers() {
        let (ka, kb) = (
            whole.past().keys_of(l).unwrap(),
            steps.past().keys_of(l).unwrap(),
        );
        assert!(max_abs_diff(ka, kb) < 1e-4);
    }
    assert_eq!(whole.len(), ids.len());
}

#[test]
fn the_quantized_past_is_the_decoded_code_cache() {
    let dec = decoder();
    let ids = prompt(&dec);
    assert!(
        ids.len() > 7 + 16,
        "the prompt fills a KIVI group during one-token steps"
    );
    // KIVI keys (G = 16) keep their newest group in f16 until it fills mid-decoding: the rows
    // of that group change then, and the past must follow.
    let kivi = |window| {
        let CacheSpec::Quantized {
            config,
            calibration,
        } = quantized(dec.head_dim(), "3", window)
        else {
            unreachable!()
        };
        CacheSpec::Quantized {
            config: HeadConfig {
                key_strategy: tq_kv::KeyStrategy::Kivi,
                group: 16,
                ..config
            },
            calibration,
        }
    };
    let specs = [
        (0usize, quantized(dec.head_dim(), "3", 0)),
        (3, quantized(dec.head_dim(), "3", 3)),
        (0, kivi(0)),
        (2, kivi(2)),
    ];
    for (window, spec) in specs {
        let mut seq = Sequence::new(&dec, &spec).unwrap();
        seq.feed(&ids[..7]).unwrap();
        for &t in &ids[7..] {
            seq.feed(&[t]).unwrap();
        }
        let cache = seq.cache().unwrap();
        let (d, n) = (dec.head_dim(), ids.len());
        for l in 0..dec.layers() {
            let layer = cache.layer(l).unwrap();
            let (pk, pv) = (
                seq.past().keys_of(l).unwrap(),
                seq.past().values_of(l).unwrap(),
            );
            for h in 0..dec.kv_heads() {
                let head = layer.head(h).unwrap();
                assert_eq!(head.len(), n);
                assert_eq!(
                    pk[h * n * d..(h + 1) * n * d],
                    head.keys().unwrap()[..],
                    "w{window} l{l} h{h}"
                );
                assert_eq!(pv[h * n * d..(h + 1) * n * d], head.values().unwrap()[..]);
            }
        }
        if window == 0
            && matches!(&spec, CacheSpec::Quantized { config, .. } if config.key_strategy == tq_kv::KeyStrategy::Mse)
        {
            assert!(seq.kv_bytes() * 3 < seq.f16_bytes());
        }
    }
}

#[test]
fn a_window_covering_every_token_reproduces_the_exact_run() {
    let dec = decoder();
    let ids = prompt(&dec);
    let exact = generate(
        &dec,
        &CacheSpec::Exact,
        &ids,
        6,
        Sampling::Greedy,
        Keep {
            logits: true,
            trace: false,
        },
        &mut || {},
    )
    .unwrap();
    let spec = quantized(dec.head_dim(), "2", 1000);
    let (_, cmp) = replay(
        &dec,
        &spec,
        &ids,
        &exact.tokens,
        &exact.logits,
        5,
        &mut || {},
    )
    .unwrap();
    let m = cmp.summary();
    assert_eq!(m.logit_rmse, 0.0);
    assert_eq!(m.top1_agreement, 1.0);
    assert_eq!(m.perplexity_exact, m.perplexity_quantized);
}

#[test]
fn drift_falls_with_bits() {
    // Teacher-forced over the prompt: KL and logit RMSE fall monotonically from 2 to 8 bits,
    // and 8 bits keeps every argmax (the tiny model's logits have margins far above the 8-bit
    // error).
    let dec = decoder();
    let ids = prompt(&dec);
    let exact = teacher_forced(
        &dec,
        &CacheSpec::Exact,
        &ids,
        Keep {
            logits: true,
            trace: false,
        },
        &mut || {},
    )
    .unwrap();
    let mut last = (f64::INFINITY, f64::INFINITY);
    for bits in ["2", "3", "4", "8"] {
        let spec = quantized(dec.head_dim(), bits, 0);
        let (run, cmp) = replay(
            &dec,
            &spec,
            &ids[..1],
            &ids[1..],
            &exact.logits,
            5,
            &mut || {},
        )
        .unwrap();
        let m = cmp.summary();
        assert_eq!(m.steps, ids.len() - 1);
        assert_eq!(m.targets, ids.len() - 1);
        assert!(
            m.kl_divergence < last.0 && m.logit_rmse < last.1,
            "{bits}: {m:?}"
        );
        last = (m.kl_divergence, m.logit_rmse);
        if bits == "8" {
            assert_eq!(m.top1_agreement, 1.0, "{m:?}");
            assert!((m.perplexity_quantized / m.perplexity_exact - 1.0).abs() < 0.01);
        }
        assert_eq!(run.tokens, ids[1..]);
    }
}

#[test]
fn split_and_centred_caches_calibrate_per_layer_and_head() {
    let dec = decoder();
    let ids = prompt(&dec);
    let d = dec.head_dim();
    let config = HeadConfig {
        center: true,
        ..HeadConfig::new(
            d,
            Precision::parse("3.5", d).unwrap(),
            Precision::parse("2.5", d).unwrap(),
        )
    };
    let cal = calibrate(&dec, &ids, &config, &OutlierChoice::Auto).unwrap();
    assert_eq!(cal.len(), dec.layers());
    assert!(cal.iter().all(|l| l.len() == dec.kv_heads()));
    assert!(cal[0][0].keys.as_ref().unwrap().len() == d / 2 && cal[0][0].key_mean.is_some());
    let spec = CacheSpec::Quantized {
        config: config.clone(),
        calibration: cal,
    };
    let run = generate(
        &dec,
        &spec,
        &ids,
        4,
        Sampling::Greedy,
        Keep::default(),
        &mut || {},
    )
    .unwrap();
    assert_eq!(run.tokens.len(), 4);
    let missing = CacheSpec::Quantized {
        config,
        calibration: Vec::new(),
    };
    assert!(matches!(
        Sequence::new(&dec, &missing),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn generation_is_deterministic_and_sampling_is_seeded() {
    let dec = decoder();
    let ids = prompt(&dec);
    let g = |s: Sampling| {
        generate(
            &dec,
            &CacheSpec::Exact,
            &ids,
            8,
            s,
            Keep::default(),
            &mut || {},
        )
        .unwrap()
        .tokens
    };
    assert_eq!(g(Sampling::Greedy), g(Sampling::Greedy));
    let s = |seed| Sampling::Sample {
        temperature: 1000.0,
        top_k: 100,
        seed,
    };
    assert_eq!(g(s(1)), g(s(1)));
    let one = Sampling::Sample {
        temperature: 1.0,
        top_k: 1,
        seed: 9,
    };
    assert_eq!(g(one), g(Sampling::Greedy), "top-1 sampling is greedy");
    let runs: Vec<Vec<u32>> = (1..4).map(|seed| g(s(seed))).collect();
    assert!(
        runs.iter().any(|r| r != &runs[0]),
        "three seeds drew the same 8 tokens"
    );
    assert_eq!(token_match(&[1, 2, 3], &[1, 2, 3]), (1.0, None));
    assert_eq!(token_match(&[1, 2, 3], &[1, 5, 3, 4]), (0.5, Some(1)));
    assert_eq!(token_match(&[1, 2], &[1, 2, 3]).1, Some(2));
    let bad = Sampling::Sample {
        temperature: 0.0,
        top_k: 5,
        seed: 1,
    };
    assert!(matches!(
        generate(
            &dec,
            &CacheSpec::Exact,
            &ids,
            2,
            bad,
            Keep::default(),
            &mut || {}
        ),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn trace_dump_holds_keys_values_and_queries() {
    let dec = decoder();
    let ids = prompt(&dec);
    let run = generate(
        &dec,
        &CacheSpec::Exact,
        &ids,
        5,
        Sampling::Greedy,
        Keep {
            logits: false,
            trace: true,
        },
        &mut || {},
    )
    .unwrap();
    let tq_onnx::RunTrace { trace, queries } = trace_of(&dec, &run).unwrap();
    assert_eq!(queries, tq_onnx::TraceQueries::Model);
    let t = ids.len() + 4;
    assert_eq!(
        (
            trace.layers,
            trace.kv_heads,
            trace.q_heads,
            trace.tokens,
            trace.head_dim
        ),
        (2, 2, 4, t, 32)
    );
    assert_eq!(trace.n_queries(), t);
    assert_eq!(trace.query_positions, (1..=t).collect::<Vec<_>>());
    // Keys equal an exact sequence fed the same tokens.
    let mut seq = Sequence::new(&dec, &CacheSpec::Exact).unwrap();
    seq.feed(&ids).unwrap();
    for &tok in &run.tokens[..4] {
        seq.feed(&[tok]).unwrap();
    }
    assert_eq!(
        trace.keys_of(1, 1),
        &seq.past().keys_of(1).unwrap()[t * 32..]
    );
    let path =
        std::env::temp_dir().join(format!("tq-onnx-trace-{}.safetensors", std::process::id()));
    trace.save(&path).unwrap();
    let back = KvTrace::load(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(back.meta.source, "real-model");
    assert_eq!(back.queries, trace.queries);
    let no_trace = generate(
        &dec,
        &CacheSpec::Exact,
        &ids,
        2,
        Sampling::Greedy,
        Keep::default(),
        &mut || {},
    )
    .unwrap();
    assert!(matches!(
        trace_of(&dec, &no_trace),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn bad_steps_are_typed_errors() {
    let dec = decoder();
    let mut seq = Sequence::new(&dec, &CacheSpec::Exact).unwrap();
    assert!(matches!(seq.feed(&[]), Err(Error::InvalidArgument(_))));
    assert!(matches!(seq.feed(&[384]), Err(Error::InvalidArgument(m)) if m.contains("384")));
    assert!(
        seq.is_empty(),
        "a failed step leaves the sequence unchanged"
    );
    assert!(matches!(
        teacher_forced(&dec, &CacheSpec::Exact, &[5], Keep::default(), &mut || {}),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        generate(
            &dec,
            &CacheSpec::Exact,
            &[],
            3,
            Sampling::Greedy,
            Keep::default(),
            &mut || {}
        ),
        Err(Error::InvalidArgument(_))
    ));
    let (p, t) = (vec![5u32, 6], vec![7u32, 8]);
    assert!(matches!(
        replay(
            &dec,
            &CacheSpec::Exact,
            &p,
            &t,
            &[vec![0.0; 384]],
            5,
            &mut || {}
        ),
        Err(Error::InvalidArgument(_))
    ));
    let wrong_dim = quantized(16, "4", 0);
    assert!(matches!(
        Sequence::new(&dec, &wrong_dim),
        Err(Error::InvalidArgument(_))
    ));
}

/// A copy of the tiny bundle in a fresh temp directory, with `edit` applied.
fn edited_copy(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tq-onnx-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.onnx", "tokenizer.json", "config.json"] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    dir
}

fn err_of(dir: &Path) -> Error {
    Decoder::open(dir).expect_err("the bundle must be rejected")
}

#[test]
fn malformed_bundles_name_what_is_wrong() {
    let missing = std::env::temp_dir().join("tq-onnx-does-not-exist");
    assert!(matches!(err_of(&missing), Error::MissingFile { .. }));
    for (file, what) in [
        ("model.onnx", "ONNX graph"),
        ("config.json", "configuration"),
        ("tokenizer.json", "tokenizer"),
    ] {
        let dir = edited_copy(&format!("rm-{file}"), |d| {
            std::fs::remove_file(d.join(file)).unwrap()
        });
        let e = err_of(&dir);
        assert!(
            matches!(e, Error::MissingFile { .. }) && e.to_string().contains(what),
            "{e}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
    let set = |key: &str, val: serde_json::Value| {
        let key = key.to_string();
        move |d: &Path| {
            let p = d.join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v[key] = val;
            std::fs::write(&p, v.to_string()).unwrap();
        }
    };
    type Edit = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("layers", Box::new(set("num_hidden_layers", 3.into())), "3"),
        (
            "kv",
            Box::new(set("num_key_value_heads", 4.into())),
            "kv heads",
        ),
        (
            "encdec",
            Box::new(set("is_encoder_decoder", true.into())),
            "encoder-decoder",
        ),
        (
            "nolayers",
            Box::new(set("num_hidden_layers", serde_json::Value::Null)),
            "num_hidden_layers",
        ),
        (
            "json",
            Box::new(|d: &Path| std::fs::write(d.join("config.json"), "{not json").unwrap()),
            "invalid JSON",
        ),
        (
            "tok",
            Box::new(|d: &Path| std::fs::write(d.join("tokenizer.json"), "[]").unwrap()),
            "tokenizer",
        ),
    ];
    for (name, edit, needle) in cases {
        let dir = edited_copy(name, edit);
        let e = err_of(&dir);
        assert!(e.to_string().contains(needle), "{name}: {e}");
        std::fs::remove_dir_all(dir).ok();
    }
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bad-bundles");
    for (name, needle) in [
        ("f16-cache", "f32"),
        ("encoder-decoder", "encoder_hidden_states"),
        ("no-logits", "logits"),
    ] {
        let e = err_of(&bad.join(name));
        assert!(
            matches!(e, Error::Unsupported(_)) && e.to_string().contains(needle),
            "{name}: {e}"
        );
    }
}
