//! `real-model --context`: decode speed, cache bytes and memory at long contexts. For each
//! length the text's tokens (repeated as needed) are prefilled in chunks, then a few tokens are
//! decoded greedily; each row is one length × one cache (the exact cache on the float and the
//! native path, each quantized configuration on the chosen path), measured alone: each row runs in
//! its own child process (this binary, re-run with the same arguments and
//! `TQ_BENCH_CONTEXT_ROW` naming the row), so no row reuses memory an earlier row freed, and the
//! row's peak resident memory growth is its own (the peak is reset after the model is loaded,
//! Linux `/proc/self/clear_refs`). Where the binary cannot re-run itself, rows run in turn in
//! this process.

use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tq_onnx::{Attention, CacheSpec, Decoder, Sequence};

use crate::cmd::strategy_label;
use crate::real::Config;

/// The environment variable that makes a run measure only row `i` (its value) of the
/// lengths × caches list, in a child process of the run that lists them (internal: set only by
/// [`run_child`]; a run that finds it set measures that one row).
const ROW_ENV: &str = "TQ_BENCH_CONTEXT_ROW";

/// One row of the long-context workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContextRow {
    /// Tokens of context before decoding.
    pub context: usize,
    /// `exact` or the quantized cache's label.
    pub config: String,
    /// `native` or `float`.
    pub attention: String,
    /// Stored bits per coordinate of the cache at the end (32 for an f32 cache).
    pub bits_per_coordinate: f64,
    /// Decode tokens per second (greedy, one token per step, after the prefill).
    pub tokens_per_s: f64,
    /// Prefill tokens per second (chunks of `--chunk` tokens).
    pub prefill_tokens_per_s: f64,
    /// Bytes the cache holds at the end (codes, scales, sink and window rows; the float past on the float
    /// path with an exact cache).
    pub cache_bytes: usize,
    /// Bytes of the same tokens' keys and values as f16.
    pub f16_cache_bytes: usize,
    /// Peak resident memory growth over the row (bytes): what the row's run added at its peak
    /// (null where the OS does not tell).
    pub peak_rss_bytes: Option<usize>,
}

/// Resident memory facts of this process (Linux `/proc/self/status`), in bytes.
fn status_kb(key: &str) -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak resident memory to the current one; `true` when the OS allows it.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The cache's label: precisions, strategies, window (and sink).
fn label(c: &Config) -> String {
    let h = &c.head;
    let window = match h.sink {
        0 => format!("w{}", h.window),
        _ => crate::cmd::window_label(h.window, h.sink, h.window_precision),
    };
    format!(
        "k{} v{} {} {window}",
        h.key_precision,
        h.value_precision,
        strategy_label(
            h.key_strategy,
            h.value_strategy,
            crate::kv::uses_groups(h).then_some(h.group),
            Some(h.scale_precision),
        ),
    )
}

/// Runs every length × cache. `float` and `native` are the decoders on each path (either may be
/// absent); quantized configurations run on `native` when given, else on `float`.
///
/// # Errors
/// A context past the model's positions, an empty text, no decoder; step errors.
#[allow(clippy::too_many_arguments)]
pub fn run(
    float: Option<&Decoder>,
    native: Option<&Decoder>,
    text: &[u32],
    contexts: &[usize],
    configs: &[Config],
    decode: usize,
    chunk: usize,
    json: bool,
) -> Result<Vec<ContextRow>> {
    let Some(any) = native.or(float) else {
        bail!("no decoder to run");
    };
    ensure!(!text.is_empty(), "the context text has no tokens");
    ensure!(chunk > 0, "--chunk must be positive");
    ensure!(
        decode > 0,
        "--max-new-tokens must be positive with --context"
    );
    let cfg = any.config();
    if let (Some(max), Some(&longest)) = (cfg.max_positions, contexts.iter().max())
        && longest + decode > max
    {
        bail!(
            "--context {longest} plus {decode} decoded tokens exceeds the model's {max} positions \
             (max_position_embeddings)"
        );
    }
    ensure!(
        contexts.iter().all(|&c| c > 0),
        "--context lengths must be positive"
    );
    let quant_on = native.or(float).map(Decoder::attention);
    let mut jobs: Vec<(String, &Decoder, CacheSpec)> = Vec::new();
    for dec in [float, native].into_iter().flatten() {
        jobs.push(("exact".into(), dec, CacheSpec::Exact));
    }
    let qdec = if quant_on == Some(Attention::Native) {
        native
    } else {
        float
    };
    if let Some(q) = qdec {
        for c in configs {
            jobs.push((label(c), q, c.spec(q)?));
        }
    }
    let list: Vec<(usize, usize)> = contexts
        .iter()
        .flat_map(|&c| (0..jobs.len()).map(move |j| (c, j)))
        .collect();
    let only = match std::env::var(ROW_ENV) {
        Ok(v) => Some(
            v.parse::<usize>()
                .ok()
                .filter(|&i| i < list.len())
                .with_context(|| format!("{ROW_ENV}={v} names no row of {}", list.len()))?,
        ),
        Err(_) => None,
    };
    let steps = |c: usize| c.div_ceil(chunk) + decode;
    let (layers, kv, d) = (any.layers(), any.kv_heads(), any.head_dim());
    if only.is_none()
        && list.len() > 1
        && let Ok(exe) = std::env::current_exe()
    {
        let all: usize = list.iter().map(|&(c, _)| steps(c)).sum();
        let pb = crate::cmd::progress_bar(json, all);
        let mut rows = Vec::new();
        for (i, &(context, j)) in list.iter().enumerate() {
            let (name, dec, _) = &jobs[j];
            pb.set_message(format!(
                "{context} tokens, {name} ({}), own process",
                dec.attention().name()
            ));
            rows.push(run_child(&exe, i)?);
            pb.inc(steps(context) as u64);
        }
        pb.finish_and_clear();
        return Ok(rows);
    }
    let total: usize = list
        .iter()
        .enumerate()
        .filter(|&(i, _)| only.is_none_or(|o| o == i))
        .map(|(_, &(c, _))| steps(c))
        .sum();
    let pb = crate::cmd::progress_bar(json || only.is_some(), total);
    let mut rows = Vec::new();
    for (i, &(context, j)) in list.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let ids: Vec<u32> = text.iter().copied().cycle().take(context).collect();
        {
            let (name, dec, spec) = &jobs[j];
            pb.set_message(format!(
                "{context} tokens, {name} ({})",
                dec.attention().name()
            ));
            let can_reset = reset_peak_rss();
            let before = status_kb("VmRSS:");
            let mut seq = Sequence::new(dec, spec)?;
            let t = Instant::now();
            let mut last = Vec::new();
            for part in ids.chunks(chunk) {
                last = seq.feed(part)?.logits;
                pb.inc(1);
            }
            let prefill_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..decode {
                let next = last
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i as u32);
                last = seq.feed(&[next])?.logits;
                pb.inc(1);
            }
            let decode_s = t.elapsed().as_secs_f64();
            let peak = status_kb("VmHWM:");
            let cache_bytes = seq.kv_bytes();
            let coords = 2 * layers * kv * seq.len() * d;
            rows.push(ContextRow {
                context,
                config: name.clone(),
                attention: dec.attention().name().to_string(),
                bits_per_coordinate: 8.0 * cache_bytes as f64 / coords.max(1) as f64,
                tokens_per_s: decode as f64 / decode_s.max(1e-12),
                prefill_tokens_per_s: context as f64 / prefill_s.max(1e-12),
                cache_bytes,
                f16_cache_bytes: seq.f16_bytes(),
                peak_rss_bytes: match (can_reset, before, peak) {
                    (true, Some(b), Some(p)) => Some(p.saturating_sub(b)),
                    _ => None,
                },
            });
        }
    }
    pb.finish_and_clear();
    Ok(rows)
}

/// Runs row `i` in a child process: this binary with this process's arguments (plus `--json`),
/// `TQ_BENCH_CONTEXT_ROW=i`; its report's one context row.
fn run_child(exe: &std::path::Path, i: usize) -> Result<ContextRow> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if !args.iter().any(|a| a == "--json") {
        args.push("--json".into());
    }
    let out = std::process::Command::new(exe)
        .args(&args)
        .env(ROW_ENV, i.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .with_context(|| format!("cannot run row {i} in a child process"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // The error line (or a panic's message), not a trailing backtrace hint.
        let why = err
            .lines()
            .rev()
            .find(|l| l.starts_with("error") || l.contains("panicked"))
            .unwrap_or("no error message");
        bail!(
            "row {i} failed in its child process ({}): {why}",
            out.status
        );
    }
    #[derive(Deserialize)]
    struct Child {
        contexts: Vec<ContextRow>,
    }
    let child: Child = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("row {i}: the child process's report does not parse"))?;
    child
        .contexts
        .into_iter()
        .next()
        .with_context(|| format!("row {i}: the child process reported no row"))
}

/// Prints the rows as a table.
pub fn print(rows: &[ContextRow]) {
    let mb = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "{:>7} {:>24} {:>9} {:>6} {:>9} {:>10} {:>9} {:>9} {:>7} {:>9}",
        "context",
        "cache",
        "attention",
        "bits",
        "tok/s",
        "prefill/s",
        "cache MB",
        "f16 MB",
        "x f16",
        "RSS+ MB"
    );
    for r in rows {
        println!(
            "{:>7} {:>24} {:>9} {:>6.2} {:>9.2} {:>10.1} {:>9.1} {:>9.1} {:>7.2} {:>9}",
            r.context,
            r.config,
            r.attention,
            r.bits_per_coordinate,
            r.tokens_per_s,
            r.prefill_tokens_per_s,
            mb(r.cache_bytes),
            mb(r.f16_cache_bytes),
            r.f16_cache_bytes as f64 / r.cache_bytes.max(1) as f64,
            r.peak_rss_bytes
                .map_or("-".to_string(), |b| format!("{:.1}", mb(b))),
        );
    }
}
