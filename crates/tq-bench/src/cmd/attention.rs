//! `attention`: decode-step attention time on quantized caches against an f32 baseline
//! ([`crate::kv`]).

use anyhow::{Result, ensure};
use clap::Args;
use serde::Serialize;
use tq_bench::count;
use tq_kv::{HeadConfig, KeyStrategy, Precision, ValueStrategy};

use super::{KvCommon, Report, pool, progress_bar};
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
    /// Seconds spent timing each configuration.
    #[arg(long, default_value_t = 0.5)]
    pub budget: f64,
    #[command(flatten)]
    pub common: KvCommon,
}

/// `attention`'s JSON report.
#[derive(Serialize)]
pub struct AttentionReport {
    workload: &'static str,
    source: &'static str,
    seed: u64,
    threads: usize,
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
        bits,
        key_strategy,
        value_strategy,
        group,
        budget,
        common,
    } = a;
    let kv_heads = kv_heads.unwrap_or(heads);
    let c = &common;
    ensure!(dim >= 2, "--dim must be at least 2");
    ensure!(
        budget > 0.0 && budget.is_finite(),
        "--budget must be positive"
    );
    let (threads, pool) = pool(c.threads)?;
    let precisions = bits
        .iter()
        .map(|b| Precision::parse(b, dim))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let pb = progress_bar(c.json, tokens.len() * precisions.len() * key_strategy.len());
    let results = pool.install(|| -> Result<Vec<kv::AttentionRow>> {
        let mut rows = Vec::new();
        for &t in &tokens {
            for &p in &precisions {
                for &ks in &key_strategy {
                    pb.set_message(format!("T = {t}, {p} bits, {} keys", ks.name()));
                    let cfg = HeadConfig {
                        key_strategy: ks,
                        value_strategy,
                        group,
                        seed: c.seed,
                        ..HeadConfig::new(dim, p, p)
                    };
                    rows.push(kv::eval_attention(&cfg, t, heads, kv_heads, budget)?);
                    pb.inc(1);
                }
            }
        }
        Ok(rows)
    })?;
    pb.finish_and_clear();
    let report = AttentionReport {
        workload: "attention",
        source: "synthetic",
        seed: c.seed,
        threads,
        results,
    };
    Ok(report)
}

impl Report for AttentionReport {
    fn print_table(&self) {
        println!(
            "attention | decode step, one query per head | {}",
            count(self.threads, "thread")
        );
        println!(
            "{:>8} {:>5} {:>10} {:>7} {:>5} {:>12} {:>12} {:>8} {:>12} {:>8}",
            "tokens",
            "bits",
            "keys/vals",
            "q/kv",
            "dim",
            "f32 us",
            "tq us",
            "speedup",
            "cache KiB",
            "x f16"
        );
        for r in &self.results {
            println!(
                "{:>8} {:>5} {:>10} {:>7} {:>5} {:>12.1} {:>12.1} {:>8.2} {:>12.1} {:>8.2}",
                r.tokens,
                r.bits,
                format!("{}/{}", r.key_strategy.name(), r.value_strategy.name()),
                format!("{}/{}", r.heads, r.kv_heads),
                r.dim,
                r.f32_seconds_per_query * 1e6,
                r.quantized_seconds_per_query * 1e6,
                r.speedup,
                r.cache_bytes as f64 / 1024.0,
                r.f16_bytes as f64 / r.cache_bytes as f64
            );
        }
    }
}
