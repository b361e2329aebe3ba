//! End-to-end runs of the `tq-bench` binary: reports, file formats and error handling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tq-bench"))
        .args(args)
        .output()
        .expect("runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON object")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tq-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn vectors(n: usize, d: usize) -> Vec<f32> {
    (0..n * d)
        .map(|i| (((i * 7919) % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i / d % 5) as f32))
        .collect()
}

fn write_npy(path: &PathBuf, n: usize, d: usize, data: &[f32], fortran: bool) {
    let bytes: Vec<u8> = if fortran {
        (0..d)
            .flat_map(|j| (0..n).flat_map(move |i| data[i * d + j].to_le_bytes()))
            .collect()
    } else {
        data.iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    let file = tq_bench::data::npy_bytes("<f4", fortran, &format!("({n}, {d})"), &bytes);
    std::fs::write(path, file).unwrap();
}

#[test]
fn synthetic_json_report_has_the_documented_fields() {
    let out = bench(&[
        "synthetic",
        "--quick",
        "--json",
        "--bits",
        "2,4",
        "--vectors",
        "3000",
        "--queries",
        "20",
        "--threads",
        "1",
    ]);
    let r = json(&out);
    for key in [
        "source",
        "seed",
        "dim",
        "rotation",
        "quantizer",
        "vectors",
        "queries",
        "threads",
        "results",
    ] {
        assert!(r.get(key).is_some(), "missing {key}");
    }
    assert_eq!(r["source"], "synthetic");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (x, bits) in results.iter().zip([2u64, 4]) {
        assert_eq!(x["bits"], bits);
        for key in [
            "d_mse",
            "ip_bias",
            "ip_rmse",
            "ip_mse_times_d",
            "bytes_per_vector",
            "quantize_vectors_per_s",
            "score_keys_per_s",
        ] {
            assert!(x[key].is_number(), "missing {key}");
        }
        for k in ["1", "4", "16"] {
            assert!(x["recall_1_at_k"][k].is_number());
        }
        assert_eq!(x["bytes_per_vector"], 128 * bits / 8 + 4);
        // 3000 unit vectors: D_mse within 5% of the theory (sampling error ~0.5%).
        let (m, t) = (
            x["d_mse"].as_f64().unwrap(),
            x["d_mse_theory"].as_f64().unwrap(),
        );
        assert!((m - t).abs() / t < 0.05, "d_mse {m} theory {t}");
    }
    // A table without --json.
    let out = bench(&[
        "synthetic",
        "--quick",
        "--bits",
        "1",
        "--vectors",
        "500",
        "--queries",
        "5",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("d_mse"));
}

#[test]
fn prod_report_carries_the_bound() {
    let out = bench(&[
        "synthetic",
        "--json",
        "--quantizer",
        "prod",
        "--sketch",
        "orthogonal",
        "--bits",
        "3",
        "--vectors",
        "2000",
        "--queries",
        "10",
        "--dim",
        "96",
    ]);
    let r = json(&out);
    assert_eq!(r["sketch"], "orthogonal");
    let x = &r["results"][0];
    assert!(x["ip_mse_times_d_bound"].is_number());
    assert_eq!(x["bytes_per_vector"], 96 * 2 / 8 + 96 / 8 + 8);
}

#[test]
fn vectors_reads_npy_c_and_fortran_fvecs_and_safetensors() {
    let (n, d) = (600, 40);
    let data = vectors(n, d);
    let c = tmp("c.npy");
    write_npy(&c, n, d, &data, false);
    let f = tmp("f.npy");
    write_npy(&f, n, d, &data, true);
    let fv = tmp("v.fvecs");
    let mut bytes = Vec::new();
    for row in data.chunks_exact(d) {
        bytes.extend((d as i32).to_le_bytes());
        bytes.extend(row.iter().flat_map(|v| v.to_le_bytes()));
    }
    std::fs::write(&fv, bytes).unwrap();
    let st = tmp("v.safetensors");
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, d], &raw).unwrap();
    std::fs::write(
        &st,
        safetensors::serialize([("vectors", view)], None).unwrap(),
    )
    .unwrap();
    let mut reports = Vec::new();
    for p in [&c, &f, &fv, &st] {
        let r = json(&bench(&[
            "vectors",
            "--input",
            p.to_str().unwrap(),
            "--bits",
            "4",
            "--json",
            "--num-queries",
            "50",
        ]));
        assert_eq!(r["dim"], d);
        assert_eq!(r["vectors"], n - 50);
        assert_eq!(r["queries"], 50);
        reports.push(r["results"][0]["d_mse"].as_f64().unwrap());
    }
    // Same data in every format gives the same measurement.
    assert!(reports.windows(2).all(|w| w[0] == w[1]), "{reports:?}");
    // Explicit queries file.
    let r = json(&bench(&[
        "vectors",
        "--input",
        c.to_str().unwrap(),
        "--queries",
        f.to_str().unwrap(),
        "--num-queries",
        "7",
        "--bits",
        "2",
        "--json",
    ]));
    assert_eq!(r["queries"], 7);
    assert_eq!(r["vectors"], n);
}

#[test]
fn bad_input_is_a_one_line_error() {
    let bad = tmp("bad.npy");
    std::fs::write(&bad, b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f8',").unwrap();
    let nan = tmp("nan.npy");
    let mut data = vectors(20, 4);
    data[13] = f32::NAN;
    write_npy(&nan, 20, 4, &data, false);
    let missing = tmp("missing.fvecs");
    let cases: Vec<Vec<String>> = vec![
        vec![
            "vectors".into(),
            "--input".into(),
            bad.display().to_string(),
        ],
        vec![
            "vectors".into(),
            "--input".into(),
            nan.display().to_string(),
        ],
        vec![
            "vectors".into(),
            "--input".into(),
            missing.display().to_string(),
        ],
        vec!["vectors".into(), "--input".into(), "x.csv".into()],
        vec![
            "synthetic".into(),
            "--bits".into(),
            "9".into(),
            "--quick".into(),
        ],
        vec!["synthetic".into(), "--dim".into(), "1".into()],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = bench(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"));
    }
    let out = bench(&["vectors", "--input", nan.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("row 3"));
}

/// On real embeddings (GloVe, any norms) the random rotation still gives the theoretical
/// distortion: 1900 vectors × 50 coordinates put the relative standard error near 1%, so 5% is
/// a 5-sigma tolerance.
#[test]
fn real_glove_fixture_meets_the_theory() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/glove-2k.npy");
    for rotation in ["hadamard", "haar"] {
        let r = json(&bench(&[
            "vectors",
            "--input",
            path,
            "--bits",
            "2,4",
            "--num-queries",
            "100",
            "--rotation",
            rotation,
            "--json",
        ]));
        assert_eq!(r["dim"], 50);
        for x in r["results"].as_array().unwrap() {
            let (m, t) = (
                x["d_mse"].as_f64().unwrap(),
                x["d_mse_theory"].as_f64().unwrap(),
            );
            assert!((m - t).abs() / t < 0.05, "{rotation}: d_mse {m} theory {t}");
            assert!(x["recall_1_at_k"]["16"].as_f64().unwrap() > 0.9);
        }
    }
}

/// A report row of `HeadConfig::recommended`: KIVI keys, a 12-token window and a 4-token sink
/// in f16 rows.
fn assert_default_cache_row(row: &serde_json::Value) {
    assert_eq!(
        (
            row["key_strategy"].as_str(),
            row["window"].as_u64(),
            row["sink"].as_u64(),
            row["window_precision"].as_str()
        ),
        (Some("kivi"), Some(12), Some(4), Some("f16"))
    );
}

/// `--cache` specs measure configurations no grid crosses in one run, after the named ones:
/// each spec over its base (or plain 4/4), in order; bad specs are errors naming the pair.
#[test]
fn trace_measures_explicit_cache_specs_after_named_ones() {
    let out = bench(&[
        "trace",
        "--config",
        "recommended",
        "--cache",
        "key-strategy=kivi,group=64,key-bits=3,value-bits=2,sink=4,window=8",
        "--cache",
        "base=recommended,window-precision=f32,window=4",
        "--cache",
        "value-bits=3",
        "--json",
    ]);
    let r = json(&out);
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_default_cache_row(&rows[0]);
    let pick = |row: &serde_json::Value| {
        (
            row["key_strategy"].as_str().map(str::to_string),
            row["key_precision"].as_str().map(str::to_string),
            row["value_precision"].as_str().map(str::to_string),
            row["group"].as_u64(),
            row["sink"].as_u64(),
            row["window"].as_u64(),
            row["window_precision"].as_str().map(str::to_string),
        )
    };
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        pick(&rows[1]),
        (
            s("kivi"),
            s("3"),
            s("2"),
            Some(64),
            Some(4),
            Some(8),
            s("f32")
        )
    );
    assert_eq!(
        pick(&rows[2]),
        (
            s("kivi"),
            s("4"),
            s("3"),
            Some(64),
            Some(4),
            Some(4),
            s("f32")
        )
    );
    assert_eq!(
        pick(&rows[3]),
        (s("mse"), s("4"), s("3"), None, Some(0), Some(0), s("f32"))
    );
    for (spec, says) in [
        ("window", "not name=value"),
        ("windows=3", "unknown name"),
        ("sink=2,sink=3", "given twice"),
        ("base=best", "base=best"),
        ("group=x", "group=x"),
    ] {
        let err = fails_with(&["trace", "--cache", spec]);
        assert!(err.contains(says), "{spec}: {err}");
    }
    // Grid options beside named configurations would be ignored: they are errors.
    for args in [
        ["--config", "recommended", "--window", "3"],
        ["--cache", "value-bits=3", "--key-bits", "3"],
        ["--cache", "value-bits=3", "--sink", "0"],
    ] {
        let err = fails_with(&[&["trace"][..], &args[..]].concat());
        assert!(err.contains("whole configurations"), "{args:?}: {err}");
    }
}

/// `--config recommended,paper` measures both named configurations in one run, in that order:
/// the default's 4-bit KIVI keys with a 4-token sink and a 12-token window, and the paper's
/// plain 4/4.
#[test]
fn trace_measures_every_named_configuration_given() {
    let out = bench(&["trace", "--config", "recommended,paper", "--json"]);
    let r = json(&out);
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_default_cache_row(&rows[0]);
    assert_eq!(
        (rows[1]["key_bits"].as_f64(), rows[1]["window"].as_u64()),
        (Some(4.0), Some(0))
    );
    let out = bench(&["trace", "--config", "compact", "--json"]);
    let r = json(&out);
    let row = &r["results"][0];
    assert_eq!(
        (row["value_precision"].as_str(), row["window"].as_u64()),
        (Some("3"), Some(12))
    );
    assert!(row["key_precision"].as_str().unwrap().ends_with("+3"));
    let bad = bench(&["trace", "--config", "recommended,best"]);
    assert!(!bad.status.success());
}

#[test]
fn trace_reports_attention_metrics_per_configuration_and_layer() {
    let path = tmp("trace.safetensors");
    tq_kv::SyntheticTrace {
        layers: 2,
        kv_heads: 1,
        q_heads: 2,
        tokens: 96,
        head_dim: 32,
        queries: 4,
        outlier_channels: 3,
        seed: 1,
    }
    .generate()
    .unwrap()
    .save(&path)
    .unwrap();
    let out = bench(&[
        "trace",
        "--trace",
        path.to_str().unwrap(),
        "--key-bits",
        "2,2.5",
        "--value-bits",
        "4",
        "--key-strategy",
        "mse,prod",
        "--json",
    ]);
    let r = json(&out);
    assert_eq!(r["source"], "synthetic");
    assert_eq!(r["layers"], 2);
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        for key in [
            "key_bits",
            "value_bits",
            "key_strategy",
            "output_rel_error",
            "score_rmse",
            "top1_agreement",
            "topk_overlap",
            "kl_divergence",
            "memory_ratio_vs_f16",
        ] {
            assert!(!row[key].is_null(), "missing {key}");
        }
        assert_eq!(row["per_layer"].as_array().unwrap().len(), 2);
    }
    assert_eq!(rows[2]["key_bits"], 2.5);
    // 2.5-bit keys carry more information than 2-bit keys: lower score error.
    assert!(rows[2]["score_rmse"].as_f64().unwrap() < rows[0]["score_rmse"].as_f64().unwrap());
    // Built-in synthetic trace and table output.
    let out = bench(&["trace", "--key-bits", "3", "--value-bits", "3"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("score_rmse"));
}

#[test]
fn trace_errors_are_one_line() {
    let bad = tmp("bad-trace.safetensors");
    std::fs::write(&bad, b"not a trace").unwrap();
    for args in [
        vec!["trace", "--trace", bad.to_str().unwrap()],
        vec!["trace", "--key-bits", "2.5", "--split", "none"],
        vec!["trace", "--key-bits", "9"],
        vec!["trace", "--split", "1,x"],
        vec!["attention", "--bits", "0"],
        vec!["attention", "--layers", "0", "--tokens", "10"],
    ] {
        let out = bench(&args);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        // Our errors are one line; clap's usage errors add its standard "--help" hint.
        assert!(
            err.starts_with("error: ") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// Split precisions under grouped-query attention are calibrated once per kv head (a calibration
/// per query head used to read past the keys and panic).
#[test]
fn attention_calibrates_split_precisions_per_kv_head() {
    let r = json(&bench(&[
        "attention",
        "--tokens",
        "64",
        "--bits",
        "2.5",
        "--dim",
        "64",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--budget",
        "0.01",
        "--json",
    ]));
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0]["heads"].as_u64(), rows[0]["kv_heads"].as_u64()),
        (Some(4), Some(2))
    );
}

#[test]
fn attention_reports_speed_and_memory() {
    let r = json(&bench(&[
        "attention",
        "--tokens",
        "256,1000",
        "--bits",
        "4,2.5",
        "--dim",
        "64",
        "--heads",
        "2",
        "--budget",
        "0.01",
        "--json",
    ]));
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        for key in [
            "tokens",
            "bits",
            "f32_seconds_per_query",
            "quantized_seconds_per_query",
            "speedup",
            "cache_bytes",
            "f16_bytes",
        ] {
            assert!(row[key].is_number(), "missing {key}");
        }
        assert!(row["cache_bytes"].as_u64().unwrap() * 3 < row["f16_bytes"].as_u64().unwrap());
    }
    assert_eq!(rows[0]["cache_bytes"], 2 * 256 * 2 * (32 + 4));
    assert_eq!(rows[0]["layers"], 1);
    // Cycling through three layers' caches: the same shape per step, one layer's memory.
    let cycled = json(&bench(&[
        "attention",
        "--tokens",
        "256",
        "--bits",
        "4",
        "--dim",
        "64",
        "--heads",
        "2",
        "--layers",
        "3",
        "--budget",
        "0.01",
        "--json",
    ]));
    let row = &cycled["results"][0];
    assert_eq!(row["layers"], 3);
    assert_eq!(row["cache_bytes"], rows[0]["cache_bytes"]);
    assert!(row["quantized_seconds_per_query"].as_f64().unwrap() > 0.0);
    // Grouped-query: 4 query heads on 2 kv heads store 2 heads' worth.
    let r = json(&bench(&[
        "attention",
        "--tokens",
        "300",
        "--bits",
        "3",
        "--dim",
        "32",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--budget",
        "0.01",
        "--json",
    ]));
    assert_eq!(r["results"][0]["kv_heads"], 2);
    assert_eq!(r["results"][0]["cache_bytes"], 2 * 300 * 2 * (12 + 4));
    assert!(
        bench(&[
            "attention",
            "--heads",
            "3",
            "--kv-heads",
            "2",
            "--tokens",
            "10"
        ])
        .status
        .code()
            == Some(1)
    );
}

/// `--config` measures the named configurations (each row names its own, with its own memory) and
/// refuses the grid options it replaces.
#[test]
fn attention_measures_named_configurations() {
    let r = json(&bench(&[
        "attention",
        "--tokens",
        "2048",
        "--dim",
        "64",
        "--heads",
        "3",
        "--kv-heads",
        "1",
        "--config",
        "recommended,paper,compact",
        "--budget",
        "0.01",
        "--json",
    ]));
    let rows = r["results"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["config"].as_str().unwrap()).collect();
    assert_eq!(names, ["recommended", "paper", "compact"]);
    assert_eq!(rows[0]["key_strategy"], "kivi");
    assert_eq!(rows[1]["key_strategy"], "mse");
    // Compact splits its KIVI keys by calibrated channels: fewer bits than the default.
    assert_eq!(rows[2]["key_strategy"], "kivi");
    assert!(rows[2]["cache_bytes"].as_u64() < rows[0]["cache_bytes"].as_u64());
    for row in rows {
        assert_eq!(
            (row["heads"].as_u64(), row["kv_heads"].as_u64()),
            (Some(3), Some(1))
        );
        assert!(row["quantized_seconds_per_query"].as_f64().unwrap() > 0.0);
    }
    // At 2 048 tokens the default (3-bit values) stores fewer bytes than 4-bit keys and values.
    assert!(rows[0]["cache_bytes"].as_u64() < rows[1]["cache_bytes"].as_u64());
    let out = bench(&[
        "attention",
        "--config",
        "paper",
        "--bits",
        "4",
        "--tokens",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

/// The scale options on real embeddings: the corrected scales lift recall at equal bits, the
/// report names the options, and --scale / --center are refused for prod.
#[test]
fn scale_and_center_options_on_the_glove_fixture() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/glove-2k.npy");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "vectors",
            "--input",
            path,
            "--bits",
            "4",
            "--num-queries",
            "200",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&bench(&args))
    };
    let norm = run(&[]);
    let ub = run(&["--scale", "unbiased"]);
    let ls = run(&["--scale", "least-squares", "--center"]);
    assert_eq!(ub["scale"], "unbiased");
    assert_eq!(ls["centered"], true);
    let r1 = |r: &serde_json::Value| r["results"][0]["recall_1_at_k"]["1"].as_f64().unwrap();
    assert!(
        r1(&ub) > r1(&norm),
        "unbiased {} vs norm {}",
        r1(&ub),
        r1(&norm)
    );
    assert_eq!(
        ub["results"][0]["bytes_per_vector"],
        norm["results"][0]["bytes_per_vector"]
    );
    // The norm scale shrinks inner products (bias -0.10 on this data); the unbiased scale removes
    // that (|bias| 0.002), and centring with the least-squares scale cuts the error (RMSE 0.28 vs
    // 0.43). Deterministic for the fixed seed; the bounds leave a factor of 2 or more of margin.
    let field = |r: &serde_json::Value, k: &str| r["results"][0][k].as_f64().unwrap();
    assert!(field(&ub, "ip_bias").abs() < 0.2 * field(&norm, "ip_bias").abs());
    assert!(field(&ls, "ip_rmse") < 0.8 * field(&norm, "ip_rmse"));
    let out = bench(&[
        "synthetic",
        "--quick",
        "--quantizer",
        "prod",
        "--scale",
        "unbiased",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let t = json(&bench(&[
        "trace",
        "--key-bits",
        "3",
        "--value-bits",
        "3",
        "--scale",
        "norm,unbiased",
        "--json",
    ]));
    assert_eq!(t["results"].as_array().unwrap().len(), 2);
    assert_eq!(t["results"][1]["scale"], "unbiased");
}

/// `search` puts TurboQuant beside exact, SQ and PQ baselines on the same data; the exact row has
/// recall 1 everywhere and TurboQuant with the unbiased scale beats SQ at 4 bits on real data.
#[test]
fn search_compares_methods_on_the_glove_fixture() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/glove-2k.npy");
    let r = json(&bench(&[
        "search",
        "--input",
        path,
        "--bits",
        "4",
        "--num-queries",
        "100",
        "--k",
        "1,4,16",
        "--json",
    ]));
    assert_eq!(r["workload"], "search");
    let rows = r["results"].as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|x| x["method"].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        ["float", "tq-mse (unbiased)", "tq-prod", "sq", "pq 25x8"]
    );
    assert!(
        rows[0]["recall_1_at_k"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v.as_f64() == Some(1.0))
    );
    let r1 = |i: usize| rows[i]["recall_1_at_k"]["1"].as_f64().unwrap();
    assert!(r1(1) > r1(3), "tq {} vs sq {}", r1(1), r1(3));
    assert_eq!(rows[1]["bits_per_vector"], 232.0);
    assert_eq!(rows[3]["bits_per_vector"], 200.0);
    assert_eq!(
        bench(&["search", "--input", path, "--bits", "9"])
            .status
            .code(),
        Some(1)
    );
}

fn tiny_model() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny-llama")
}

#[test]
fn real_model_compare_reports_every_documented_field() {
    let prompts = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/prompts.jsonl");
    let trace = tmp("real-trace.safetensors");
    let out = bench(&[
        "real-model",
        "--model-dir",
        tiny_model(),
        "--prompts",
        prompts,
        "--max-new-tokens",
        "4",
        "--key-bits",
        "2,4",
        "--value-bits",
        "4",
        "--key-strategy",
        "mse,prod",
        "--dump-trace",
        trace.to_str().unwrap(),
        "--json",
    ]);
    let r = json(&out);
    assert_eq!(r["workload"], "real-model");
    assert_eq!(r["source"], "real-model");
    assert_eq!(r["model"], "tq-tiny-llama");
    assert_eq!(r["mode"], "compare");
    assert!(r["note"].as_str().unwrap().contains("float attention"));
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 8 * 4, "8 prompts x 4 configurations");
    for row in rows {
        for key in [
            "mode",
            "key_bits",
            "value_bits",
            "key_strategy",
            "tokens",
            "top1_agreement",
            "topk_overlap",
            "logit_rmse",
            "kl_divergence",
            "token_match_rate",
            "perplexity_exact",
            "perplexity_quantized",
            "decode_tokens_per_s_exact",
            "decode_tokens_per_s_quantized",
            "kv_bytes_exact",
            "kv_bytes_quantized",
            "generated_text",
        ] {
            assert!(!row[key].is_null(), "missing {key} in {row}");
        }
        assert!(row.get("first_divergence_step").is_some());
        let t1 = row["top1_agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&t1));
        assert!(
            row["kv_bytes_quantized"].as_u64().unwrap() < row["kv_bytes_exact"].as_u64().unwrap()
        );
    }
    // The dumped trace runs through the trace workload.
    let out = bench(&[
        "trace",
        "--trace",
        trace.to_str().unwrap(),
        "--key-bits",
        "4",
        "--json",
    ]);
    let t = json(&out);
    assert_eq!(t["source"], "real-model");
    assert_eq!(
        (
            t["layers"].as_u64(),
            t["kv_heads"].as_u64(),
            t["q_heads"].as_u64()
        ),
        (Some(2), Some(2), Some(4))
    );
    std::fs::remove_file(&trace).ok();
}

#[test]
fn real_model_perplexity_exact_and_quantized_modes() {
    let text = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/prose.txt");
    let out = bench(&[
        "real-model",
        "--model-dir",
        tiny_model(),
        "--text",
        text,
        "--max-tokens",
        "40",
        "--key-bits",
        "3,8",
        "--value-bits",
        "8",
        "--window",
        "0,8",
        "--json",
    ]);
    let r = json(&out);
    assert_eq!(r["mode"], "perplexity");
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        assert_eq!(row["tokens"], 39);
        assert!(row["perplexity_exact"].as_f64().unwrap() > 1.0);
    }
    let kl = |i: usize| rows[i]["kl_divergence"].as_f64().unwrap();
    assert!(kl(2) < kl(0), "8-bit keys drift less than 3-bit keys");
    for (mode, n) in [("exact", 1), ("quantized", 2)] {
        let out = bench(&[
            "real-model",
            "--model-dir",
            tiny_model(),
            "--prompt",
            "Hello",
            "--mode",
            mode,
            "--max-new-tokens",
            "3",
            "--key-bits",
            "2,4",
            "--json",
        ]);
        let r = json(&out);
        let rows = r["results"].as_array().unwrap();
        assert_eq!(rows.len(), n, "{mode}");
        assert_eq!(rows[0]["mode"], mode);
    }
    // Table output.
    let out = bench(&[
        "real-model",
        "--model-dir",
        tiny_model(),
        "--quick",
        "--max-new-tokens",
        "2",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ppl_q"));
}

/// `--context`: one row per length × cache (exact on both paths, each configuration on the
/// native path), with the documented fields; the native exact and quantized runs keep no float
/// past, so a 4-bit cache's bytes are about a sixth of the f32 exact cache's.
#[test]
fn real_model_context_rows() {
    let text = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/prose.txt");
    let out = bench(&[
        "real-model",
        "--model-dir",
        tiny_model(),
        "--text",
        text,
        "--context",
        "32,96",
        "--chunk",
        "40",
        "--max-new-tokens",
        "3",
        "--key-bits",
        "4",
        "--value-bits",
        "4",
        "--window",
        "0",
        "--json",
    ]);
    let v = json(&out);
    assert_eq!(v["mode"], "context");
    let rows = v["contexts"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * 3);
    for r in rows {
        for f in [
            "tokens_per_s",
            "prefill_tokens_per_s",
            "cache_bytes",
            "f16_cache_bytes",
        ] {
            assert!(r[f].as_f64().unwrap() > 0.0, "{f}: {r}");
        }
        assert!(r.get("peak_rss_bytes").is_some());
    }
    let at = |ctx: u64, config: &str, attention: &str| {
        rows.iter()
            .find(|r| r["context"] == ctx && r["config"] == config && r["attention"] == attention)
            .unwrap_or_else(|| panic!("no row {ctx} {config} {attention}"))
    };
    let exact = at(96, "exact", "native");
    assert_eq!(exact["bits_per_coordinate"], 32.0);
    let quant = at(96, "k4 v4 mse/mse w0", "native");
    let ratio = exact["cache_bytes"].as_f64().unwrap() / quant["cache_bytes"].as_f64().unwrap();
    // 32 bits against 4 bits of code plus a 32-bit norm per 32 coordinates: 32 / 5 = 6.4.
    assert!((ratio - 6.4).abs() < 0.01, "{ratio}");
    assert_eq!(
        at(96, "exact", "float")["f16_cache_bytes"],
        exact["f16_cache_bytes"]
    );
}

#[test]
fn real_model_errors_are_one_line() {
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model-dir", "/nonexistent/model"],
            "setup-real-model.sh",
        ),
        (vec!["--model-dir", tiny_model(), "--key-bits", "9"], "9"),
        (
            vec![
                "--model-dir",
                tiny_model(),
                "--key-bits",
                "2.5",
                "--split",
                "none",
            ],
            "--split none",
        ),
        (
            vec![
                "--model-dir",
                tiny_model(),
                "--prompts",
                "/nonexistent.jsonl",
            ],
            "cannot read",
        ),
        (
            vec!["--model-dir", tiny_model(), "--temperature", "0"],
            "temperature",
        ),
        (
            vec!["--model-dir", tiny_model(), "--max-new-tokens", "0"],
            "max-new-tokens",
        ),
        // The tiny model was built for 1024 positions.
        (
            vec!["--model-dir", tiny_model(), "--context", "1020"],
            "1024 positions",
        ),
        (
            vec![
                "--model-dir",
                tiny_model(),
                "--attention",
                "native",
                "--dump-trace",
                "/tmp/x.safetensors",
            ],
            "--attention float",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["real-model"];
        all.extend(args.iter().copied());
        let out = bench(&all);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(err.trim().lines().count() <= 2, "{args:?}: {err}");
    }
}

#[test]
fn plot_writes_svg_charts() {
    let svg = tmp("synthetic.svg");
    let out = bench(&[
        "synthetic",
        "--quick",
        "--bits",
        "2,4",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"));
    // measured, theory, two bounds; one recall curve per width
    assert_eq!(text.matches("<polyline").count(), 4 + 2);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/glove-2k.npy");
    let out = bench(&[
        "search",
        "--input",
        path,
        "--bits",
        "4",
        "--k",
        "1,4",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("recall 1@k") && text.contains("pq "));
    std::fs::remove_file(&svg).ok();
}

#[test]
fn kernels_times_cpu_and_gpu_paths() {
    // In CI the GPU path runs on lavapipe (scripts/setup.sh); elsewhere without an adapter the
    // wgpu backend fails with a one-line error, which is what a user would see.
    let out = bench(&[
        "kernels",
        "--quick",
        "--vectors",
        "2000",
        "--dim",
        "64",
        "--backend",
        "cpu",
        "--json",
    ]);
    let r = json(&out);
    assert_eq!(r["workload"], "kernels");
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert!(row["vectors_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["gb_per_s"].as_f64().unwrap() > 0.0);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tq-bench"))
        .args([
            "kernels",
            "--quick",
            "--vectors",
            "2000",
            "--dim",
            "64",
            "--backend",
            "wgpu",
            "--json",
        ])
        .output()
        .unwrap();
    if out.status.success() {
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(r["adapter"].is_string());
        assert_eq!(r["results"].as_array().unwrap().len(), 3);
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "wgpu path failed in CI: {err}"
        );
        assert!(err.contains("adapter"), "{err}");
    }
    let out = bench(&["kernels", "--bits", "9"]);
    assert!(!out.status.success());
}

#[test]
fn gpu_backend_gives_the_cpu_metrics() {
    let cpu = json(&bench(&["synthetic", "--quick", "--bits", "2,4", "--json"]));
    let out = Command::new(env!("CARGO_BIN_EXE_tq-bench"))
        .args([
            "synthetic",
            "--quick",
            "--bits",
            "2,4",
            "--backend",
            "wgpu",
            "--json",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "wgpu path failed in CI: {err}"
        );
        return;
    }
    let gpu: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(gpu["backend"], "wgpu");
    assert_eq!(cpu["backend"], "cpu");
    for (a, b) in cpu["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(gpu["results"].as_array().unwrap())
    {
        let (x, y) = (a["d_mse"].as_f64().unwrap(), b["d_mse"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-6 * x, "{x} vs {y}");
        assert_eq!(a["recall_1_at_k"], b["recall_1_at_k"]);
    }
    let prod = json(&bench(&[
        "synthetic",
        "--quick",
        "--quantizer",
        "prod",
        "--bits",
        "3",
        "--backend",
        "wgpu",
        "--json",
    ]));
    assert_eq!(prod["backend"], "wgpu");
    let out = bench(&[
        "synthetic",
        "--quick",
        "--quantizer",
        "polar",
        "--backend",
        "wgpu",
    ]);
    assert!(!out.status.success());
}

/// Runs tq-bench and returns its stderr, requiring failure.
fn fails_with(args: &[&str]) -> String {
    let out = bench(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

#[test]
fn num_queries_outside_the_input_is_an_error_naming_the_limit() {
    let p = tmp("nq.npy");
    write_npy(&p, 500, 8, &vectors(500, 8), false);
    let p = p.to_str().unwrap();
    let err = fails_with(&["vectors", "--input", p, "--num-queries", "600"]);
    assert!(err.contains("at most 250"), "{err}");
    let err = fails_with(&["vectors", "--input", p, "--num-queries", "499"]);
    assert!(err.contains("at most 250"), "{err}");
    let err = fails_with(&["vectors", "--input", p, "--num-queries", "0"]);
    assert!(err.contains("--num-queries must be positive"), "{err}");
    let err = fails_with(&[
        "vectors",
        "--input",
        p,
        "--queries",
        p,
        "--num-queries",
        "501",
    ]);
    assert!(err.contains("more than the 500 vectors"), "{err}");
    let r = json(&bench(&[
        "vectors",
        "--input",
        p,
        "--num-queries",
        "250",
        "--bits",
        "2",
        "--json",
    ]));
    assert_eq!(
        (r["vectors"].as_u64(), r["queries"].as_u64()),
        (Some(250), Some(250))
    );
}

#[test]
fn options_that_do_not_apply_or_do_not_parse_are_errors_naming_them() {
    let npy = tmp("as-trace.npy");
    write_npy(&npy, 4, 4, &vectors(4, 4), false);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["synthetic", "--quick", "--plot", "x.png"], ".svg"),
        (
            vec!["synthetic", "--quick", "--sketch", "orthogonal"],
            "--sketch applies to --quantizer prod",
        ),
        (
            vec!["trace", "--quick", "--value-strategy", "prod"],
            "values cannot use prod",
        ),
        (vec!["trace", "--quick", "--key-bits", "3.7"], "4x45+3"),
        (
            vec!["trace", "--quick", "--key-bits", "2.5", "--split", "999"],
            "channel 999 is out of range for d = 64",
        ),
        (
            vec!["trace", "--trace", npy.to_str().unwrap()],
            "NumPy .npy file",
        ),
        (
            vec!["kernels", "--quantizer", "polar"],
            "invalid value 'polar'",
        ),
    ];
    for (args, needle) in cases {
        let err = fails_with(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // The trace error names the file.
    let err = fails_with(&["trace", "--trace", npy.to_str().unwrap()]);
    assert!(err.contains("as-trace.npy"), "{err}");
    let help = String::from_utf8_lossy(&bench(&["kernels", "--help"]).stdout).into_owned();
    assert!(help.contains("mse") && !help.contains("polar"), "{help}");
}

#[test]
fn counts_are_singular_where_they_are_one() {
    let out = bench(&["trace", "--quick", "--threads", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("| 1 layer x 2 kv / 4 q heads | 128 tokens |"),
        "{text}"
    );
    let out = bench(&["synthetic", "--quick", "--bits", "1", "--threads", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| 1 thread"), "{text}");
    assert!(!text.contains("1 threads"), "{text}");
}

/// Each prompt of a suite is followed by its own exact text, and a mean row per configuration
/// closes the table.
#[test]
fn real_model_prompt_suite_prints_each_exact_text_and_a_summary() {
    let prompts = tmp("two-prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"The cat\"}\n{\"prompt\": \"A dog runs\"}\n",
    )
    .unwrap();
    let out = bench(&[
        "real-model",
        "--model-dir",
        tiny_model(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--key-bits",
        "4",
        "--value-bits",
        "4",
        "--window",
        "0",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no line starting with {needle:?} in\n{text}"))
    };
    let (a, b, mean) = (
        at("-- The cat"),
        at("-- A dog runs"),
        at("-- mean over 2 prompts"),
    );
    assert!(a < b && b < mean, "{text}");
    let exact: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].trim_start().starts_with("exact text:"))
        .collect();
    assert_eq!(exact.len(), 2, "{text}");
    assert!(
        a < exact[0] && exact[0] < b && b < exact[1] && exact[1] < mean,
        "{text}"
    );
    assert!(lines[0..a].iter().any(|l| l.contains("ppl x")), "{text}");
}

/// Without a usable XDG_RUNTIME_DIR, a wgpu run prints no Mesa warning about it.
#[test]
fn gpu_runs_do_not_warn_about_the_runtime_dir() {
    let out = Command::new(env!("CARGO_BIN_EXE_tq-bench"))
        .args([
            "kernels",
            "--quick",
            "--vectors",
            "500",
            "--dim",
            "32",
            "--backend",
            "wgpu",
        ])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
    if out.status.success() {
        // Progress from the start, and a software adapter is named as such.
        assert!(
            err.contains("kernels: generating and quantizing 500 vectors"),
            "{err}"
        );
        let adapter = String::from_utf8_lossy(&out.stdout);
        if adapter.contains("llvmpipe") {
            assert!(err.contains("is a software adapter"), "{err}");
        }
    }
}

/// A relative --model-dir that is not there from the working directory is found from the
/// repository root (the default, artifacts/smollm2-135m-instruct, works from crates/ too).
#[test]
fn a_relative_model_dir_is_found_from_the_repository_root() {
    let out = Command::new(env!("CARGO_BIN_EXE_tq-bench"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "real-model",
            "--model-dir",
            "fixtures/tiny-llama",
            "--mode",
            "exact",
            "--max-new-tokens",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let r = json(&out);
    assert_eq!(r["model"], "tq-tiny-llama");
    let err = fails_with(&["real-model", "--model-dir", "no/such/bundle"]);
    assert!(err.contains("no/such/bundle"), "{err}");
}

/// The `compare` rows of a quick real-model run on the tiny bundle with `extra` options.
fn tiny_compare_rows(extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "real-model",
        "--model-dir",
        tiny_model(),
        "--quick",
        "--max-new-tokens",
        "2",
        "--json",
    ];
    args.extend(extra);
    let r = json(&bench(&args));
    r["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["mode"] == "compare")
        .cloned()
        .collect()
}

/// Without --key-bits, real-model measures the default cache; a grid option given then (even at
/// its default value) is an error naming --key-bits, not ignored.
#[test]
fn real_model_without_key_bits_runs_the_default_cache_or_refuses_grid_options() {
    let q = tiny_compare_rows(&[]);
    assert_eq!(q.len(), 1);
    assert_default_cache_row(&q[0]);
    let base = ["real-model", "--model-dir", tiny_model(), "--quick"];
    for extra in [
        ["--window", "4"],
        ["--sink", "0"],
        ["--scale", "least-squares"],
    ] {
        let err = fails_with(&[&base[..], &extra[..]].concat());
        assert!(err.contains("--key-bits"), "{extra:?}: {err}");
    }
    // --cache names whole configurations: a spec runs; with --key-bits or a grid option it is
    // an error rather than a silently ignored grid.
    let spec = "base=recommended,window=2";
    let rows = tiny_compare_rows(&["--cache", spec]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["window"].as_u64(), Some(2));
    for extra in [["--key-bits", "4"], ["--window", "4"]] {
        let err = fails_with(&[&base[..], &["--cache", spec], &extra[..]].concat());
        assert!(err.contains("--cache"), "{extra:?}: {err}");
    }
}
