//! `trace`: attention quality of quantized KV caches on a K/V trace ([`crate::kv`]).

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;
use serde::Serialize;
use tq_bench::count;
use tq_core::RotationKind;
use tq_kv::{KvTrace, SyntheticTrace};
use tq_quant::ScaleMode;

use super::{
    KvCacheArgs, KvCommon, KvGrid, Report, kv_configs, pool, progress_bar, strategy_label,
};
use crate::kv;

/// `trace`'s options.
#[derive(Args)]
pub struct TraceArgs {
    /// The trace file; default: the synthetic outlier trace (2 layers, 2 kv / 4 q heads, 512 tokens, d = 128).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Key precisions, comma-separated: integers, 2.5 / 3.5 (outlier splits) or OBxCOUNT+RB.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub key_bits: Vec<String>,
    /// Per-vector scalars of MSE keys and values, comma-separated: norm, unbiased, least-squares.
    #[arg(long = "scale", value_delimiter = ',', default_value = "norm")]
    pub scales: Vec<ScaleMode>,
    /// Without --trace: a small synthetic trace (1 layer, 2 kv / 4 q heads, 128 tokens, d = 64).
    #[arg(long)]
    pub quick: bool,
    /// Also write the evaluated trace to this file (safetensors trace format).
    #[arg(long)]
    pub save_trace: Option<PathBuf>,
    /// Most recent tokens kept unquantized (at --window-precision).
    #[arg(long, default_value_t = 0)]
    pub window: usize,
    /// Set by the CLI when a grid option (one of [`GRID_ARGS`]) was given on the command line.
    #[arg(skip)]
    pub grid_given: bool,
    #[command(flatten)]
    pub cache: KvCacheArgs,
    #[command(flatten)]
    pub common: KvCommon,
}

/// `trace`'s JSON report.
#[derive(Serialize)]
pub struct TraceReport {
    workload: &'static str,
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<String>,
    model: String,
    seed: u64,
    layers: usize,
    kv_heads: usize,
    q_heads: usize,
    tokens: usize,
    head_dim: usize,
    queries: usize,
    threads: usize,
    results: Vec<kv::TraceRow>,
}

/// The ids of `trace`'s grid options: given with --config or --cache, they are an error rather
/// than ignored.
pub const GRID_ARGS: [&[&str]; 2] = [&super::CACHE_GRID_ARGS, &["key_bits", "scales", "window"]];

/// Runs `trace`.
///
/// # Errors
/// An unreadable or invalid trace; bad precisions; cache errors.
pub fn run(a: TraceArgs) -> Result<TraceReport> {
    let TraceArgs {
        trace: path,
        key_bits,
        scales,
        quick,
        save_trace,
        window,
        cache,
        common,
        grid_given,
    } = a;
    ensure!(
        !(grid_given && !(cache.config.is_empty() && cache.caches.is_empty())),
        "{}",
        super::real_model::LISTED_NOT_GRID
    );
    let c = &common;
    let trace = match &path {
        Some(p) => KvTrace::load(p).with_context(|| p.display().to_string())?,
        None if quick => SyntheticTrace {
            layers: 1,
            tokens: 128,
            head_dim: 64,
            queries: 8,
            outlier_channels: 4,
            seed: c.seed,
            ..SyntheticTrace::default()
        }
        .generate()?,
        None => SyntheticTrace {
            seed: c.seed,
            ..SyntheticTrace::default()
        }
        .generate()?,
    };
    if let Some(out) = &save_trace {
        trace.save(out)?;
    }
    let d = trace.head_dim;
    let configs = kv_configs(
        &KvGrid {
            key_bits: &key_bits,
            value_bits: &cache.value_bits,
            pair: cache.pair,
            strategies: &cache.key_strategy,
            value_strategies: &cache.value_strategy,
            groups: &cache.group,
            named: &cache.config,
            caches: &cache.caches,
            scales: &scales,
            scale_precisions: &cache.scale_precision,
            sinks: &cache.sink,
            window_precisions: &cache.window_precision,
            center: cache.center,
            windows: &[window],
            rotations: &[RotationKind::Hadamard],
        },
        d,
        c.seed,
    )?;
    let (threads, pool) = pool(c.threads)?;
    let pb = progress_bar(
        c.json,
        configs.len() * trace.layers * trace.q_heads * trace.n_queries(),
    );
    let results = pool.install(|| {
        configs
            .iter()
            .map(|cfg| kv::eval_trace(&trace, cfg, &cache.split, &pb))
            .collect::<Result<Vec<_>>>()
    })?;
    pb.finish_and_clear();
    let report = TraceReport {
        workload: "trace",
        source: trace.meta.source.clone(),
        input: path.map(|p| p.display().to_string()),
        model: trace.meta.model.clone(),
        seed: c.seed,
        layers: trace.layers,
        kv_heads: trace.kv_heads,
        q_heads: trace.q_heads,
        tokens: trace.tokens,
        head_dim: d,
        queries: trace.n_queries(),
        threads,
        results,
    };
    Ok(report)
}

impl Report for TraceReport {
    fn print_table(&self) {
        println!(
            "trace | {} ({}) | {} x {} kv / {} q heads | {} | d = {} | {} per head",
            self.model,
            self.source,
            count(self.layers, "layer"),
            self.kv_heads,
            self.q_heads,
            count(self.tokens, "token"),
            self.head_dim,
            count(self.queries, "query")
        );
        println!(
            "{:>8} {:>8} {:>15} {:>13} {:>6} {:>6} {:>10} {:>10} {:>8} {:>8} {:>10} {:>8}",
            "keys",
            "values",
            "k/v",
            "scale",
            "window",
            "bits",
            "out_err",
            "score_rmse",
            "top1",
            "top8",
            "KL",
            "x f16"
        );
        for r in &self.results {
            println!(
                "{:>8} {:>8} {:>15} {:>13} {:>6} {:>6.2} {:>10.5} {:>10.5} {:>8.3} {:>8.3} {:>10.2e} {:>8.2}",
                r.key_precision,
                r.value_precision,
                strategy_label(
                    r.key_strategy,
                    r.value_strategy,
                    r.group,
                    Some(r.scale_precision),
                ),
                r.scale.name(),
                super::window_label(r.window, r.sink, r.window_precision),
                r.bits_per_coordinate,
                r.overall.output_rel_error,
                r.overall.score_rmse,
                r.overall.top1_agreement,
                r.overall.topk_overlap,
                r.overall.kl_divergence,
                r.memory_ratio_vs_f16
            );
        }
    }
}
