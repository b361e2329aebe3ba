//! `search`: maximum-inner-product search on the user's vectors, TurboQuant next to exact float
//! search, uniform scalar quantization and product quantization ([`crate::search`]).

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Args;
use serde::Serialize;
use tq_bench::count;
use tq_core::RotationKind;
use tq_quant::ScaleMode;

use super::{InputArgs, KvCommon, Report, load_base_and_queries, pool};
use crate::{plot, search};

/// `search`'s options.
#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Bits per coordinate, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub bits: Vec<u32>,
    /// Recall 1@k for these k.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub k: Vec<usize>,
    /// Random rotation of TurboQuant.
    #[arg(long, default_value = "hadamard")]
    pub rotation: RotationKind,
    /// Per-vector scalar of TurboQuant_mse (docs/SCALES.md).
    #[arg(long, default_value = "unbiased")]
    pub scale: ScaleMode,
    /// Also draw recall 1@k against k for every method and width into this SVG file.
    #[arg(long, value_parser = plot::svg_path)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub common: KvCommon,
}

#[derive(Serialize)]
/// `search`'s JSON report.
pub struct SearchReport {
    workload: &'static str,
    source: &'static str,
    input: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    queries_input: Option<String>,
    dim: usize,
    vectors: usize,
    queries: usize,
    seed: u64,
    rotation: RotationKind,
    threads: usize,
    results: Vec<search::SearchRow>,
    /// The k of recall 1@k (the table's columns).
    #[serde(skip)]
    ks: Vec<usize>,
}

/// Runs `search`.
///
/// # Errors
/// Unreadable input; bad options.
pub fn run(a: SearchArgs) -> Result<SearchReport> {
    let SearchArgs {
        input,
        bits,
        k,
        rotation,
        scale,
        plot: plot_path,
        common,
    } = a;
    let c = &common;
    for &b in &bits {
        ensure!((1..=8).contains(&b), "--bits {b} is out of range (1..=8)");
    }
    let (base, qs) = load_base_and_queries(&input, false, c.seed)?;
    let (threads, pool) = pool(c.threads)?;
    let settings = search::SearchSettings {
        bits,
        ks: k,
        rotation,
        scale,
        seed: c.seed,
    };
    let results = pool.install(|| search::run(&base, &qs, &settings))?;
    let report = SearchReport {
        workload: "search",
        source: "file",
        input: input.input.display().to_string(),
        queries_input: input.queries_file.as_ref().map(|p| p.display().to_string()),
        dim: base.dim,
        vectors: base.rows,
        queries: qs.rows,
        seed: c.seed,
        rotation,
        threads,
        results,
        ks: settings.ks.clone(),
    };
    if let Some(path) = &plot_path {
        let series = report
            .results
            .iter()
            .map(|r| plot::Series {
                name: format!("{} ({} bits/vec)", r.method, r.bits_per_vector),
                points: settings
                    .ks
                    .iter()
                    .filter_map(|k| r.recall_1_at_k.get(&k.to_string()).map(|v| (*k as f64, *v)))
                    .collect(),
                dashed: r.method == "float",
            })
            .collect();
        let chart = plot::Chart {
            title: format!("recall 1@k, {} (d = {})", report.input, report.dim),
            x_label: "k".into(),
            y_label: "recall 1@k".into(),
            log_y: false,
            log_x: true,
            series,
        };
        plot::write(path, &[chart])?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report)
}

impl Report for SearchReport {
    fn print_table(&self) {
        println!(
            "search | {} | d = {} | {} | {} | {}",
            self.input,
            self.dim,
            count(self.vectors, "vector"),
            count(self.queries, "query"),
            count(self.threads, "thread")
        );
        let ks: Vec<String> = self.ks.iter().map(|k| k.to_string()).collect();
        print!("{:<22} {:>4} {:>9}", "method", "bits", "bits/vec");
        for k in &ks {
            print!(" {:>6}", format!("R@{k}"));
        }
        println!(" {:>9} {:>9}", "index s", "search s");
        for r in &self.results {
            print!("{:<22} {:>4} {:>9.0}", r.method, r.bits, r.bits_per_vector);
            for k in &ks {
                print!(" {:>6.3}", r.recall_1_at_k.get(k).copied().unwrap_or(0.0));
            }
            println!(" {:>9.3} {:>9.3}", r.index_seconds, r.search_seconds);
        }
    }
}
