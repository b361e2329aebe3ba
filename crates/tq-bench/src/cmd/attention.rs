//! `attention`: decode-step attention time on quantized caches against f32 and f16 baselines
//! ([`crate::kv`]).

use anyhow::{Result, ensure};
use clap::Args;
use serde::Serialize;
use tq_bench::count;
use tq_kv::{HeadConfig, KeyStrategy, Precision, ValueStrategy};

use super::{NamedConfig, Report, pool, progress_bar};
use crate::kv;

/// `attention`'s options.
#[derive(Args)]
pub struct AttentionArgs {
    /// Cached tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,8192,32768")]
    pub tokens: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Query heads.
    #[arg(long, default_value_t = 1)]
    pub heads: usize,
    /// KV heads (grouped-query attention when fewer than --heads) [default: --heads].
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Independent caches (each with its own generated tokens) the timed steps cycle through, as
    /// a decoder's layers do (SmolLM2-135M has 30): once they outgrow the CPU's last-level
    /// cache, every step reads its cache from memory, as in a real decode step. The default
    /// times one cache, which stays in the CPU's caches between steps. Times are per step (one
    /// layer), for the f32 and f16 baselines alike.
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// Key and value precisions, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    pub bits: Vec<String>,
    /// Key quantizers, comma-separated: mse, prod, polar, kivi.
    #[arg(long, value_delimiter = ',', default_value = "mse")]
    pub key_strategy: Vec<KeyStrategy>,
    /// Value quantizer: mse, polar or kivi.
    #[arg(long, default_value = "mse")]
    pub value_strategy: ValueStrategy,
    /// KIVI's group size (a power of two in 16..=128).
    #[arg(long, default_value_t = tq_quant::DEFAULT_KIVI_GROUP)]
    pub group: usize,
    /// Stored widths of the MSE streams' per-vector scales, comma-separated: f32, f16.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub scale_precision: Vec<tq_quant::ScalePrecision>,
    /// Named configurations instead of the --bits / --key-strategy grid, comma-separated:
    /// recommended (tq_kv::HeadConfig::recommended, the documented default: KIVI 4-bit keys,
    /// 3-bit TurboQuant_mse values, f16 sink and window), paper (TurboQuant_mse 4-bit keys and
    /// values) and compact (HeadConfig::compact, its key split calibrated on the generated
    /// keys), each at --dim.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        conflicts_with_all = ["bits", "key_strategy", "value_strategy", "group", "scale_precision"]
    )]
    pub config: Vec<NamedConfig>,
    /// Seconds spent timing each of the three caches (quantized, f32, f16) per row; they are
    /// timed in alternating rounds and each reports its median round.
    #[arg(long, default_value_t = 0.5)]
    pub budget: f64,
    /// Worker threads, comma-separated: one set of rows per count (kv heads run in parallel)
    /// [default: all cores].
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Seed of the quantizers and of generated data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `attention`'s JSON report.
#[derive(Serialize)]
pub struct AttentionReport {
    workload: &'static str,
    source: &'static str,
    seed: u64,
    threads: Vec<usize>,
    /// The instruction set of the scan and accumulation kernels.
    isa: &'static str,
    results: Vec<kv::AttentionRow>,
}

/// Runs `attention`.
///
/// # Errors
/// Bad options or precisions; cache errors.
pub fn run(a: AttentionArgs) -> Result<AttentionReport> {
    let AttentionArgs {
        tokens,
        dim,
        heads,
        kv_heads,
        layers,
        bits,
        key_strategy,
        value_strategy,
        group,
        scale_precision,
        config,
        budget,
        threads,
        seed,
        json,
    } = a;
    let kv_heads = kv_heads.unwrap_or(heads);
    ensure!(dim >= 2, "--dim must be at least 2");
    ensure!(layers >= 1, "--layers must be at least 1");
    ensure!(
        budget > 0.0 && budget.is_finite(),
        "--budget must be positive"
    );
    let threads: Vec<Option<usize>> = if threads.is_empty() {
        vec![None]
    } else {
        threads.into_iter().map(Some).collect()
    };
    // The caches of one set of rows: (named configuration, head configuration, progress label).
    let mut caches: Vec<(Option<NamedConfig>, HeadConfig, String)> = Vec::new();
    if config.is_empty() {
        let precisions = bits
            .iter()
            .map(|b| Precision::parse(b, dim))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for &p in &precisions {
            for &ks in &key_strategy {
                for &sp in &scale_precision {
                    let cfg = HeadConfig {
                        key_strategy: ks,
                        value_strategy,
                        group,
                        seed,
                        scale_precision: sp,
                        ..HeadConfig::new(dim, p, p)
                    };
                    let label = format!("{p} bits, {} keys, {} scales", ks.name(), sp.name());
                    caches.push((None, cfg, label));
                }
            }
        }
    } else {
        for &n in &config {
            let cfg = HeadConfig {
                seed,
                ..n.head(dim)
            };
            caches.push((Some(n), cfg, format!("{} configuration", n.name())));
        }
    }
    let pb = progress_bar(json, threads.len() * tokens.len() * caches.len());
    let (mut results, mut counts) = (Vec::new(), Vec::new());
    for &th in &threads {
        let (count, pool) = pool(th)?;
        counts.push(count);
        pool.install(|| -> Result<()> {
            for &t in &tokens {
                for (named, cfg, label) in &caches {
                    pb.set_message(format!("{count} thr, T = {t}, {label}"));
                    let mut row = kv::eval_attention(cfg, t, heads, kv_heads, layers, budget)?;
                    row.config = named.map(|n| n.name());
                    results.push(row);
                    pb.inc(1);
                }
            }
            Ok(())
        })?;
    }
    pb.finish_and_clear();
    let report = AttentionReport {
        workload: "attention",
        source: "synthetic",
        seed,
        threads: counts,
        isa: tq_core::scan::kernel_isa(),
        results,
    };
    Ok(report)
}

impl Report for AttentionReport {
    fn print_table(&self) {
        let threads: Vec<String> = self.threads.iter().map(|&t| count(t, "thread")).collect();
        let layers = self.results.first().map_or(1, |r| r.layers);
        let caches = if layers > 1 {
            format!("{layers} layers cycled")
        } else {
            "one layer".to_string()
        };
        println!(
            "attention | decode step, one query per head | {caches} | {} | kernels {} | median of alternating rounds",
            threads.join(", "),
            self.isa
        );
        println!(
            "{:>8} {:>5} {:>12} {:>7} {:>5} {:>4} {:>10} {:>10} {:>10} {:>7} {:>7} {:>11} {:>6}",
            "tokens",
            "bits",
            "keys/vals",
            "q/kv",
            "dim",
            "thr",
            "f32 us",
            "f16 us",
            "tq us",
            "vs f32",
            "vs f16",
            "cache KiB",
            "x f16"
        );
        for r in &self.results {
            println!(
                "{:>8} {:>5} {:>12} {:>7} {:>5} {:>4} {:>10.1} {:>10.1} {:>10.1} {:>7.2} {:>7.2} {:>11.1} {:>6.2}",
                r.tokens,
                r.bits,
                r.config.map_or_else(
                    || crate::cmd::strategy_label(
                        r.key_strategy,
                        r.value_strategy,
                        None,
                        Some(r.scale_precision)
                    ),
                    String::from
                ),
                format!("{}/{}", r.heads, r.kv_heads),
                r.dim,
                r.threads,
                r.f32_seconds_per_query * 1e6,
                r.f16_seconds_per_query * 1e6,
                r.quantized_seconds_per_query * 1e6,
                r.speedup,
                r.f16_speedup,
                r.cache_bytes as f64 / 1024.0,
                r.f16_bytes as f64 / r.cache_bytes as f64
            );
        }
    }
}
