//! docs/REPORT_SCHEMA.md against the binary: every field a workload's `--json` report prints is
//! documented in that workload's section (top level, result rows and their nested objects), so a
//! field added to a report type without its documentation fails here. docs/FORMATS.md against the
//! writers: every tensor and metadata key of a saved batch of each kind is documented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Every identifier written inside backticks in `text`.
fn documented(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .flat_map(|code| {
            code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The sections of REPORT_SCHEMA.md: the text before the first `## ` heading (synthetic and
/// vectors), then each `## ` section, keyed by the workload its heading names.
fn sections() -> Vec<(String, BTreeSet<String>)> {
    let text = std::fs::read_to_string(root().join("docs/REPORT_SCHEMA.md")).unwrap();
    let mut parts = text.split("\n## ");
    let mut out = vec![("vectors".to_string(), documented(parts.next().unwrap()))];
    for part in parts {
        let heading = part.lines().next().unwrap();
        let workload = heading
            .split_whitespace()
            .nth(1)
            .expect("a heading names `tq-bench WORKLOAD --json`")
            .to_string();
        out.push((workload, documented(part)));
    }
    out
}

/// Every object key in a report: the top level, each result row, and the keys of nested objects
/// and arrays of objects (map-like objects keyed by numbers, such as `recall_1_at_k`, are
/// skipped: their keys are values).
fn keys(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k.parse::<f64>().is_err() {
                    out.insert(k.clone());
                    keys(x, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| keys(x, out)),
        _ => {}
    }
}

fn report(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tq-bench"))
        .args(args)
        .arg("--json")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_report_field_is_documented_in_its_section() {
    let glove = "fixtures/glove-2k.npy";
    let tiny = "fixtures/tiny-llama";
    let attention = |flag: &'static str, value: &'static str| {
        let args = [
            "--tokens", "64", "--dim", "64", flag, value, "--budget", "0.01",
        ];
        ("attention", [&["attention"][..], &args].concat())
    };
    let runs: Vec<(&str, Vec<&str>)> = vec![
        (
            "vectors",
            vec![
                "synthetic",
                "--quick",
                "--vectors",
                "300",
                "--queries",
                "5",
                "--bits",
                "2",
            ],
        ),
        (
            "vectors",
            vec![
                "synthetic",
                "--quick",
                "--vectors",
                "300",
                "--queries",
                "5",
                "--bits",
                "2",
                "--quantizer",
                "prod",
            ],
        ),
        (
            "vectors",
            vec![
                "vectors", "--input", glove, "--limit", "400", "--quick", "--bits", "2", "--center",
            ],
        ),
        ("trace", vec!["trace", "--quick", "--key-bits", "3,2.5"]),
        // A grid of bit widths and a named configuration.
        attention("--bits", "2"),
        attention("--config", "recommended"),
        (
            "search",
            vec![
                "search",
                "--input",
                glove,
                "--limit",
                "400",
                "--num-queries",
                "5",
                "--bits",
                "2",
                "--k",
                "1,4",
            ],
        ),
        (
            "kernels",
            vec!["kernels", "--backend", "cpu", "--quick", "--vectors", "500"],
        ),
        (
            "real-model",
            vec!["real-model", "--model-dir", tiny, "--max-new-tokens", "3"],
        ),
        (
            "real-model",
            vec![
                "real-model",
                "--model-dir",
                tiny,
                "--text",
                "fixtures/prose.txt",
                "--max-tokens",
                "8",
            ],
        ),
        (
            "real-model",
            vec![
                "real-model",
                "--model-dir",
                tiny,
                "--text",
                "fixtures/prose.txt",
                "--context",
                "16",
                "--max-new-tokens",
                "2",
            ],
        ),
    ];
    let sections = sections();
    for (workload, args) in runs {
        let doc = &sections
            .iter()
            .find(|(w, _)| w == workload)
            .unwrap_or_else(|| panic!("REPORT_SCHEMA.md has no section for {workload}"))
            .1;
        let mut printed = BTreeSet::new();
        keys(&report(&args), &mut printed);
        let missing: Vec<&String> = printed.difference(doc).collect();
        assert!(
            missing.is_empty(),
            "{args:?} prints fields REPORT_SCHEMA.md does not document in its {workload} section: {missing:?}"
        );
    }
}

#[test]
fn every_saved_batch_tensor_and_key_is_documented() {
    use tq_quant::{EncodedVectors, QuantizerKind, QuantizerSpec, RotationKind};
    let text = std::fs::read_to_string(root().join("docs/FORMATS.md")).unwrap();
    let start = text.find("## Saved batches").unwrap();
    let end = start + text[start..].find("\n## ").unwrap();
    let doc = documented(&text[start..end]);
    let d = 32;
    let xs: Vec<f32> = (0..4 * d).map(|i| (i % 13) as f32 - 6.0).collect();
    let mean = tq_quant::MseQuantizer::calibrate_mean(&xs, d).unwrap();
    for spec in [
        QuantizerSpec::new(QuantizerKind::Mse, d, 3, RotationKind::Hadamard, 1),
        QuantizerSpec::new(QuantizerKind::Mse, d, 3, RotationKind::Haar, 1).with_mean(Some(mean)),
        QuantizerSpec::new(QuantizerKind::Prod, d, 3, RotationKind::Hadamard, 1),
        QuantizerSpec::new(QuantizerKind::Polar, d, 4, RotationKind::Hadamard, 1),
    ] {
        let mut b = spec.build().unwrap().new_batch();
        b.extend(&xs).unwrap();
        let bytes = b.to_safetensors().unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let config: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
        let mut written: BTreeSet<String> = st.names().into_iter().map(str::to_string).collect();
        written.extend(meta.keys().cloned());
        written.insert(meta["kind"].clone());
        written.extend(config.as_object().unwrap().keys().cloned());
        let missing: Vec<&String> = written.difference(&doc).collect();
        assert!(
            missing.is_empty(),
            "a saved {:?} batch writes names FORMATS.md does not document: {missing:?}",
            spec.kind
        );
    }
}
