//! The `real-model` workload: a decoder-only ONNX model run by tract with exact and quantized KV
//! caches (tq-onnx), compared step by step on generated continuations of prompts, or
//! teacher-forced over a text file for perplexity.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use indicatif::ProgressBar;
use serde::Serialize;
use tq_kv::{
    HeadCalibration, HeadConfig, KeyStrategy, OutlierChoice, RotationKind, ValueStrategy,
    WindowPrecision,
};
use tq_onnx::{
    CacheSpec, Decoder, Keep, LogitMetrics, Run, Sampling, calibrate, generate, replay,
    teacher_forced, token_match, trace_of,
};
use tq_quant::{ScaleMode, ScalePrecision};

/// Text the outlier channels and means of split or centred caches are calibrated on: ordinary
/// prose unrelated to the prompt suite and the perplexity text.
pub const CALIBRATION_TEXT: &str = "The river rose slowly through the spring, and by May the \
lower fields were under water. Farmers moved their animals to the hills, where the grass was \
thin but dry. In the town, the old bridge was closed, and people crossed on a ferry that ran \
every hour from dawn until dark. Children watched the brown water from the church steps and \
counted the branches that floated past. When the rain finally stopped, it took three weeks for \
the roads to open again, and the market returned to the square with fewer stalls than before.";

/// What the runs compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The exact cache only.
    Exact,
    /// Each quantized configuration only (free-running generation).
    Quantized,
    /// Exact, then each configuration teacher-forced on the exact tokens (lock-step metrics)
    /// and free-running (token match).
    Compare,
}

/// One prompt or text to run.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Short label (the prompt text or the file name).
    pub label: String,
    /// Token ids.
    pub ids: Vec<u32>,
}

/// Reads a prompt suite: one JSON object per line with a `prompt` string (blank lines and lines
/// starting with `#` are skipped).
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let p = v
            .get("prompt")
            .and_then(|p| p.as_str())
            .with_context(|| format!("{}:{}: no \"prompt\" string", path.display(), i + 1))?;
        out.push(p.to_string());
    }
    ensure!(!out.is_empty(), "{}: no prompts", path.display());
    Ok(out)
}

/// A quantized configuration with its label fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// Per-head configuration.
    pub head: HeadConfig,
    /// Outlier channel choice for split precisions.
    pub split: OutlierChoice,
}

impl Config {
    pub(crate) fn spec(&self, decoder: &Decoder) -> Result<CacheSpec> {
        let calibration = if HeadCalibration::needed(&self.head) {
            let ids = decoder.bundle().encode(CALIBRATION_TEXT)?;
            calibrate(decoder, &ids, &self.head, &self.split)
                .with_context(|| format!("calibrating with --split {}", self.split))?
        } else {
            Vec::new()
        };
        Ok(CacheSpec::Quantized {
            config: self.head.clone(),
            calibration,
        })
    }
}

/// One result row (a prompt or text × a configuration). Fields that a mode does not measure
/// are `null`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The prompt (or text file) label.
    pub prompt: String,
    /// exact | quantized | compare | perplexity.
    pub mode: String,
    /// Key bits per coordinate (null for the exact cache).
    pub key_bits: Option<f64>,
    /// Value bits per coordinate.
    pub value_bits: Option<f64>,
    /// Key precision as given (`4`, `2.5`, `4x32+2`).
    pub key_precision: Option<String>,
    /// Value precision as given.
    pub value_precision: Option<String>,
    /// Key quantizer.
    pub key_strategy: Option<KeyStrategy>,
    /// Value quantizer.
    pub value_strategy: Option<ValueStrategy>,
    /// KIVI's group size, when keys or values use KIVI.
    pub group: Option<usize>,
    /// Per-vector scalar of MSE parts.
    pub scale: Option<ScaleMode>,
    /// Stored width of that scalar (`f32`, `f16`).
    pub scale_precision: Option<ScalePrecision>,
    /// Keys and values centred on calibrated means.
    pub centered: Option<bool>,
    /// Most recent tokens kept unquantized.
    pub window: Option<usize>,
    /// First tokens kept unquantized for good.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<usize>,
    /// Stored width of the sink and window rows (`f32`, `f16`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_precision: Option<WindowPrecision>,
    /// Random rotation of the quantizers.
    pub rotation: Option<RotationKind>,
    /// Mean stored bits per coordinate over keys and values (codes and per-vector scalars).
    pub bits_per_coordinate: Option<f64>,
    /// Tokens compared (targets in teacher-forced text mode, generated tokens otherwise).
    pub tokens: usize,
    /// Next-token argmax agreement with the exact run.
    pub top1_agreement: Option<f64>,
    /// Top-k overlap of the next-token logits.
    pub topk_overlap: Option<f64>,
    /// RMS difference of the logits.
    pub logit_rmse: Option<f64>,
    /// Mean KL(exact ‖ quantized) of the next-token distributions (nats).
    pub kl_divergence: Option<f64>,
    /// Fraction of positions where the free-running quantized generation equals the exact one.
    pub token_match_rate: Option<f64>,
    /// First generated position where they differ (null when identical or not measured).
    pub first_divergence_step: Option<usize>,
    /// Perplexity of the exact run's tokens (or the text) under the exact cache.
    pub perplexity_exact: Option<f64>,
    /// The same tokens' perplexity under the quantized cache.
    pub perplexity_quantized: Option<f64>,
    /// perplexity_quantized / perplexity_exact.
    pub perplexity_ratio: Option<f64>,
    /// Prefill tokens per second of the exact run.
    pub prefill_tokens_per_s: Option<f64>,
    /// Decode tokens per second with the exact cache.
    pub decode_tokens_per_s_exact: Option<f64>,
    /// Decode tokens per second with the quantized cache (same token schedule).
    pub decode_tokens_per_s_quantized: Option<f64>,
    /// Bytes of the exact cache stored as f16.
    pub kv_bytes_exact: usize,
    /// Bytes of the quantized cache (codes and scalars), same tokens.
    pub kv_bytes_quantized: Option<usize>,
    /// kv_bytes_exact / kv_bytes_quantized.
    pub kv_ratio_vs_f16: Option<f64>,
    /// Text of the exact run (or of the quantized run in quantized mode).
    pub generated_text: String,
    /// Text of the free-running quantized run (compare mode).
    pub generated_text_quantized: Option<String>,
}

impl Row {
    fn base(prompt: &str, mode: &str, tokens: usize, f16_bytes: usize, text: String) -> Self {
        Self {
            prompt: prompt.to_string(),
            mode: mode.to_string(),
            key_bits: None,
            value_bits: None,
            key_precision: None,
            value_precision: None,
            key_strategy: None,
            value_strategy: None,
            group: None,
            scale: None,
            scale_precision: None,
            centered: None,
            window: None,
            sink: None,
            window_precision: None,
            rotation: None,
            bits_per_coordinate: None,
            tokens,
            top1_agreement: None,
            topk_overlap: None,
            logit_rmse: None,
            kl_divergence: None,
            token_match_rate: None,
            first_divergence_step: None,
            perplexity_exact: None,
            perplexity_quantized: None,
            perplexity_ratio: None,
            prefill_tokens_per_s: None,
            decode_tokens_per_s_exact: None,
            decode_tokens_per_s_quantized: None,
            kv_bytes_exact: f16_bytes,
            kv_bytes_quantized: None,
            kv_ratio_vs_f16: None,
            generated_text: text,
            generated_text_quantized: None,
        }
    }

    fn with_metrics(mut self, m: &LogitMetrics) -> Self {
        self.top1_agreement = Some(m.top1_agreement);
        self.topk_overlap = Some(m.topk_overlap);
        self.logit_rmse = Some(m.logit_rmse);
        self.kl_divergence = Some(m.kl_divergence);
        self.perplexity_exact = Some(m.perplexity_exact);
        self.perplexity_quantized = Some(m.perplexity_quantized);
        self.perplexity_ratio = Some(m.perplexity_quantized / m.perplexity_exact);
        self
    }

    fn with_config(mut self, c: &Config, d: usize, run: &Run) -> Self {
        let (kb, vb) = (
            c.head.key_precision.bits_per_coordinate(d),
            c.head.value_precision.bits_per_coordinate(d),
        );
        self.key_bits = Some(kb);
        self.value_bits = Some(vb);
        self.key_precision = Some(c.head.key_precision.to_string());
        self.value_precision = Some(c.head.value_precision.to_string());
        self.key_strategy = Some(c.head.key_strategy);
        self.value_strategy = Some(c.head.value_strategy);
        self.group = crate::kv::uses_groups(&c.head).then_some(c.head.group);
        self.scale = Some(c.head.scale);
        self.scale_precision = Some(c.head.scale_precision);
        self.centered = Some(c.head.center);
        self.window = Some(c.head.window);
        self.sink = Some(c.head.sink);
        self.window_precision = Some(c.head.window_precision);
        self.rotation = Some(c.head.rotation);
        // Stored bits per coordinate, scalars included, from the cache's exact byte count.
        let coords = run.f16_bytes as f64 / 2.0;
        self.bits_per_coordinate = Some(run.kv_bytes as f64 * 8.0 / coords.max(1.0));
        self.kv_bytes_quantized = Some(run.kv_bytes);
        self.kv_ratio_vs_f16 = Some(run.f16_bytes as f64 / run.kv_bytes.max(1) as f64);
        self.kv_bytes_exact = run.f16_bytes;
        self
    }
}

/// Runs every prompt in `mode` for every configuration.
#[allow(clippy::too_many_arguments)]
pub fn run_prompts(
    decoder: &Decoder,
    prompts: &[Prompt],
    configs: &[Config],
    mode: Mode,
    max_new: usize,
    sampling: Sampling,
    top_k: usize,
    dump_trace: Option<&PathBuf>,
    json: bool,
) -> Result<Vec<Row>> {
    ensure!(max_new >= 1, "--max-new-tokens must be at least 1");
    let d = decoder.head_dim();
    let specs = configs
        .iter()
        .map(|c| c.spec(decoder))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for (pi, p) in prompts.iter().enumerate() {
        let per_config = match mode {
            Mode::Exact => 0,
            Mode::Quantized => max_new,
            Mode::Compare => 2 * max_new,
        };
        let pb = crate::cmd::progress_bar(
            json,
            max_new * (mode != Mode::Quantized) as usize + per_config * configs.len(),
        );
        pb.set_message(format!("prompt {}/{}", pi + 1, prompts.len()));
        let tick = |pb: &ProgressBar| pb.inc(1);
        let text = |ids: &[u32]| decoder.bundle().decode(ids).map_err(anyhow::Error::from);
        match mode {
            Mode::Quantized => {
                for (c, spec) in configs.iter().zip(&specs) {
                    let run = generate(
                        decoder,
                        spec,
                        &p.ids,
                        max_new,
                        sampling,
                        Keep::default(),
                        &mut || tick(&pb),
                    )?;
                    let mut row = Row::base(
                        &p.label,
                        "quantized",
                        run.tokens.len(),
                        run.f16_bytes,
                        text(&run.tokens)?,
                    )
                    .with_config(c, d, &run);
                    row.decode_tokens_per_s_quantized = Some(run.timing.decode_tokens_per_s());
                    row.prefill_tokens_per_s = Some(run.timing.prefill_tokens_per_s());
                    rows.push(row);
                }
            }
            Mode::Exact | Mode::Compare => {
                let keep = Keep {
                    logits: mode == Mode::Compare,
                    trace: dump_trace.is_some() && pi == 0,
                };
                let exact = generate(
                    decoder,
                    &CacheSpec::Exact,
                    &p.ids,
                    max_new,
                    sampling,
                    keep,
                    &mut || tick(&pb),
                )?;
                if keep.trace
                    && let Some(path) = dump_trace
                {
                    write_trace(decoder, &exact, path)?;
                }
                let exact_text = text(&exact.tokens)?;
                let mut base = Row::base(
                    &p.label,
                    if mode == Mode::Exact {
                        "exact"
                    } else {
                        "compare"
                    },
                    exact.tokens.len(),
                    exact.f16_bytes,
                    exact_text,
                );
                base.prefill_tokens_per_s = Some(exact.timing.prefill_tokens_per_s());
                base.decode_tokens_per_s_exact = Some(exact.timing.decode_tokens_per_s());
                if mode == Mode::Exact {
                    rows.push(base);
                    pb.finish_and_clear();
                    continue;
                }
                for (c, spec) in configs.iter().zip(&specs) {
                    let (rep, cmp) = replay(
                        decoder,
                        spec,
                        &p.ids,
                        &exact.tokens,
                        &exact.logits,
                        top_k,
                        &mut || tick(&pb),
                    )?;
                    let free = generate(
                        decoder,
                        spec,
                        &p.ids,
                        max_new,
                        sampling,
                        Keep::default(),
                        &mut || tick(&pb),
                    )?;
                    let m = cmp.summary();
                    let (rate, first) = token_match(&exact.tokens, &free.tokens);
                    let mut row = base.clone().with_config(c, d, &rep);
                    row = row.with_metrics(&m);
                    row.token_match_rate = Some(rate);
                    row.first_divergence_step = first;
                    row.decode_tokens_per_s_quantized = Some(rep.timing.decode_tokens_per_s());
                    row.generated_text_quantized = Some(text(&free.tokens)?);
                    rows.push(row);
                }
            }
        }
        pb.finish_and_clear();
    }
    Ok(rows)
}

/// Teacher-forced perplexity of `text` (at most `max_tokens` tokens) under the exact cache and
/// each configuration, with the next-token metrics of every position.
#[allow(clippy::too_many_arguments)]
pub fn run_text(
    decoder: &Decoder,
    label: &str,
    ids: &[u32],
    configs: &[Config],
    top_k: usize,
    dump_trace: Option<&PathBuf>,
    json: bool,
) -> Result<Vec<Row>> {
    ensure!(
        ids.len() >= 2,
        "{label}: the text has fewer than two tokens"
    );
    let d = decoder.head_dim();
    let steps = ids.len() - 1;
    let pb = crate::cmd::progress_bar(json, steps * (1 + configs.len()));
    pb.set_message(label.to_string());
    let keep = Keep {
        logits: true,
        trace: dump_trace.is_some(),
    };
    let exact = teacher_forced(decoder, &CacheSpec::Exact, ids, keep, &mut || pb.inc(1))?;
    if let Some(path) = dump_trace {
        write_trace(decoder, &exact, path)?;
    }
    let mut rows = Vec::new();
    for c in configs {
        let spec = c.spec(decoder)?;
        let (rep, cmp) = replay(
            decoder,
            &spec,
            &ids[..1],
            &ids[1..],
            &exact.logits,
            top_k,
            &mut || pb.inc(1),
        )?;
        let m = cmp.summary();
        let mut row = Row::base(
            label,
            "perplexity",
            m.targets,
            exact.f16_bytes,
            String::new(),
        )
        .with_config(c, d, &rep);
        row = row.with_metrics(&m);
        row.decode_tokens_per_s_exact = Some(exact.timing.decode_tokens_per_s());
        row.decode_tokens_per_s_quantized = Some(rep.timing.decode_tokens_per_s());
        rows.push(row);
    }
    pb.finish_and_clear();
    Ok(rows)
}

fn write_trace(decoder: &Decoder, run: &Run, path: &Path) -> Result<()> {
    let tq_onnx::RunTrace { trace, queries } = trace_of(decoder, run)?;
    trace
        .save(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if queries == tq_onnx::TraceQueries::KeysAsProxy {
        eprintln!(
            "note: the graph exposes no queries.<i> outputs; {} holds each kv head's keys as its query heads' queries",
            path.display()
        );
    }
    eprintln!(
        "wrote {} ({} layers x {} kv heads x {} tokens, d = {})",
        path.display(),
        trace.layers,
        trace.kv_heads,
        trace.tokens,
        trace.head_dim
    );
    Ok(())
}

/// One row per configuration averaged over the prompts of a suite (rows of mode `compare`):
/// arithmetic means of bits, top-1, top-k, KL, token match and decode rates, and the geometric
/// mean of the perplexity ratios (the ratio of the mean per-token losses' exponentials). Labelled
/// `suite`; empty when no row compares a configuration.
pub fn suite_summary(rows: &[Row]) -> Vec<Row> {
    // Every field that tells one configuration from another.
    let key = |r: &Row| {
        format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            r.key_precision,
            r.value_precision,
            r.key_strategy,
            r.value_strategy,
            r.group,
            r.scale,
            r.scale_precision,
            r.centered,
            r.window,
            r.sink,
            r.window_precision,
            r.rotation
        )
    };
    let mut order: Vec<String> = Vec::new();
    let mut groups: std::collections::HashMap<String, Vec<&Row>> = Default::default();
    for r in rows.iter().filter(|r| r.mode == "compare") {
        let k = key(r);
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(r);
    }
    let mean = |g: &[&Row], f: fn(&Row) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = g.iter().filter_map(|r| f(r)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    order
        .iter()
        .map(|k| {
            let g = &groups[k];
            let first = g[0];
            let log_ratio = mean(g, |r| r.perplexity_ratio.map(f64::ln));
            Row {
                prompt: "suite".into(),
                tokens: g.iter().map(|r| r.tokens).sum(),
                bits_per_coordinate: mean(g, |r| r.bits_per_coordinate),
                top1_agreement: mean(g, |r| r.top1_agreement),
                topk_overlap: mean(g, |r| r.topk_overlap),
                logit_rmse: mean(g, |r| r.logit_rmse),
                kl_divergence: mean(g, |r| r.kl_divergence),
                token_match_rate: mean(g, |r| r.token_match_rate),
                first_divergence_step: None,
                perplexity_exact: None,
                perplexity_quantized: None,
                perplexity_ratio: log_ratio.map(f64::exp),
                prefill_tokens_per_s: mean(g, |r| r.prefill_tokens_per_s),
                decode_tokens_per_s_exact: mean(g, |r| r.decode_tokens_per_s_exact),
                decode_tokens_per_s_quantized: mean(g, |r| r.decode_tokens_per_s_quantized),
                kv_bytes_exact: g.iter().map(|r| r.kv_bytes_exact).sum(),
                kv_bytes_quantized: g.iter().map(|r| r.kv_bytes_quantized).sum(),
                kv_ratio_vs_f16: mean(g, |r| r.kv_ratio_vs_f16),
                generated_text: String::new(),
                generated_text_quantized: None,
                ..first.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod suite_tests {
    use super::*;

    fn row(prompt: &str, kb: &str, top1: f64, ratio: f64) -> Row {
        let mut r = Row::base(prompt, "compare", 10, 100, "t".into());
        r.key_precision = Some(kb.into());
        r.top1_agreement = Some(top1);
        r.perplexity_ratio = Some(ratio);
        r
    }

    #[test]
    fn suite_rows_average_each_configuration_over_prompts() {
        let rows = vec![
            Row::base("a", "exact", 10, 100, "x".into()),
            row("a", "4", 0.9, 1.1),
            row("a", "2", 0.5, 2.0),
            row("b", "4", 0.7, 1.0 / 1.1),
            row("b", "2", 0.3, 8.0),
        ];
        let s = suite_summary(&rows);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].key_precision.as_deref(), Some("4"));
        assert!((s[0].top1_agreement.unwrap() - 0.8).abs() < 1e-12);
        assert!((s[0].perplexity_ratio.unwrap() - 1.0).abs() < 1e-12);
        assert!((s[1].perplexity_ratio.unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(s[1].tokens, 20);
    }

    /// Configurations that differ only in the scale width or the sink stay separate rows.
    #[test]
    fn scale_width_and_sink_separate_configurations() {
        let mut rows = Vec::new();
        for prompt in ["a", "b"] {
            for (precision, sink) in [
                (ScalePrecision::F32, 0),
                (ScalePrecision::F16, 0),
                (ScalePrecision::F16, 4),
            ] {
                let mut r = row(prompt, "4", 0.9, 1.1);
                r.scale_precision = Some(precision);
                r.sink = Some(sink);
                rows.push(r);
            }
        }
        let s = suite_summary(&rows);
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|r| r.tokens == 20));
        assert_eq!(s[1].scale_precision, Some(ScalePrecision::F16));
        assert_eq!(s[2].sink, Some(4));
    }
}
