//! `tq-bench`: end-to-end workloads for the tq quantizers.
//!
//! `synthetic` quantizes random unit vectors; `vectors` quantizes the user's own vectors from
//! `.npy`, `.fvecs` or `.safetensors`. Both report, per bit width, distortion, inner-product error,
//! recall and throughput as a table or (with `--json`) one JSON object (schema in
//! `docs/REPORT_SCHEMA.md`).

mod data;
mod eval;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_quant::SketchKind;

use crate::data::Vectors;
use crate::eval::{BitsResult, EvalSettings, QuantizerKind, Truth};

#[derive(Parser)]
#[command(
    name = "tq-bench",
    version,
    about = "TurboQuant workloads: quantize vectors, measure distortion, inner-product error, recall and speed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Random unit vectors in R^dim (Gaussian, normalised) with independent random queries.
    Synthetic {
        /// Vector dimension.
        #[arg(long, default_value_t = 128)]
        dim: usize,
        /// Base vectors to quantize [default: 100000, or 10000 with --quick].
        #[arg(long)]
        vectors: Option<usize>,
        /// Queries [default: 1000, or 100 with --quick].
        #[arg(long)]
        queries: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Your own vectors: `.npy` (2-D float32, C or Fortran order), `.fvecs`, or `.safetensors`
    /// (a 2-D F32 tensor named `vectors`). Norms are kept as they are.
    Vectors {
        /// The base vectors.
        #[arg(long)]
        input: PathBuf,
        /// Query vectors (same formats). Without it, a seeded random sample of the input is held
        /// out as queries.
        #[arg(long = "queries")]
        queries_file: Option<PathBuf>,
        /// Held-out queries when no query file is given [default: min(1000, rows/10), or 100 with --quick].
        #[arg(long)]
        num_queries: Option<usize>,
        /// Use at most this many base vectors (the first ones).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Bit widths to evaluate, comma-separated (1..=8).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    bits: Vec<u32>,
    /// mse (TurboQuant_mse) or prod (TurboQuant_prod: unbiased inner products).
    #[arg(long, value_enum, default_value_t = QuantizerKind::Mse)]
    quantizer: QuantizerKind,
    /// Random rotation: hadamard (O(d log d)) or haar (dense, O(d²)).
    #[arg(long, default_value = "hadamard")]
    rotation: RotationKind,
    /// QJL matrix for --quantizer prod: gaussian (paper) or orthogonal (lower variance).
    #[arg(long, default_value = "gaussian")]
    sketch: SketchKind,
    /// Seed of the quantizer and of synthetic data / query sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker threads for batch quantization and scoring [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Small sizes that finish in seconds.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// The JSON report (schema in docs/REPORT_SCHEMA.md).
#[derive(Serialize)]
struct Report {
    workload: &'static str,
    source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queries_input: Option<String>,
    seed: u64,
    dim: usize,
    vectors: usize,
    queries: usize,
    quantizer: QuantizerKind,
    rotation: RotationKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    sketch: Option<SketchKind>,
    threads: usize,
    results: Vec<BitsResult>,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Synthetic {
            dim,
            vectors,
            queries,
            common,
        } => {
            ensure!(dim >= 2, "--dim must be at least 2");
            let n = vectors.unwrap_or(if common.quick { 10_000 } else { 100_000 });
            let q = queries.unwrap_or(if common.quick { 100 } else { 1000 });
            ensure!(n > 0 && q > 0, "--vectors and --queries must be positive");
            let base = data::synthetic_base(n, dim, common.seed);
            let qs = data::synthetic_queries(q, dim, common.seed);
            execute("synthetic", "synthetic", None, None, base, qs, &common)
        }
        Command::Vectors {
            input,
            queries_file,
            num_queries,
            limit,
            common,
        } => {
            let mut base = data::load(&input)?;
            if let Some(l) = limit {
                ensure!(l > 0, "--limit must be positive");
                base.rows = base.rows.min(l);
                base.data.truncate(base.rows * base.dim);
            }
            let (base, qs) = match &queries_file {
                Some(path) => {
                    let qs = data::load(path)?;
                    ensure!(
                        qs.dim == base.dim,
                        "queries have dimension {} but the input has {}",
                        qs.dim,
                        base.dim
                    );
                    let qs = match num_queries {
                        Some(k) => qs.select(&(0..k.min(qs.rows)).collect::<Vec<_>>()),
                        None => qs,
                    };
                    (base, qs)
                }
                None => hold_out(base, num_queries, common.quick, common.seed)?,
            };
            let q = queries_file.as_ref().map(|p| p.display().to_string());
            execute(
                "vectors",
                "file",
                Some(input.display().to_string()),
                q,
                base,
                qs,
                &common,
            )
        }
    }
}

/// Splits a seeded random sample of `k` rows off as queries.
fn hold_out(all: Vectors, k: Option<usize>, quick: bool, seed: u64) -> Result<(Vectors, Vectors)> {
    let k = k
        .unwrap_or(if quick { 100 } else { 1000.min(all.rows / 10) })
        .min(all.rows.saturating_sub(1));
    ensure!(
        k > 0,
        "the input has {} vectors: too few to hold out queries (give --queries FILE)",
        all.rows
    );
    let mut r = SeededRng::new(seed, stream::QUERIES);
    let perm = r.permutation(all.rows);
    let mut is_query = vec![false; all.rows];
    let mut qidx: Vec<usize> = perm[..k].iter().map(|&i| i as usize).collect();
    qidx.sort_unstable();
    for &i in &qidx {
        is_query[i] = true;
    }
    let bidx: Vec<usize> = (0..all.rows).filter(|&i| !is_query[i]).collect();
    Ok((all.select(&bidx), all.select(&qidx)))
}

fn execute(
    workload: &'static str,
    source: &'static str,
    input: Option<String>,
    queries_input: Option<String>,
    base: Vectors,
    queries: Vectors,
    c: &Common,
) -> Result<()> {
    for &b in &c.bits {
        if !(1..=8).contains(&b) {
            bail!("--bits {b} is out of range (1..=8)");
        }
    }
    let threads = c
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ensure!(threads > 0, "--threads must be positive");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start the thread pool")?;
    let settings = EvalSettings {
        quantizer: c.quantizer,
        rotation: c.rotation,
        sketch: c.sketch,
        seed: c.seed,
        ip_queries: queries.rows.min(100),
    };
    let show = !c.json && std::io::stderr().is_terminal();
    let progress = if show {
        let steps = c.bits.len() * (queries.rows + settings.ip_queries);
        let pb = ProgressBar::new(steps as u64);
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let results = pool.install(|| -> Result<Vec<BitsResult>> {
        progress.set_message("exact search");
        let truth = Truth::compute(&base, &queries, settings.ip_queries);
        c.bits
            .iter()
            .map(|&b| {
                progress.set_message(format!("{} bits", b));
                eval::eval_bits(&settings, &base, &queries, &truth, b, &progress)
            })
            .collect()
    })?;
    progress.finish_and_clear();
    let report = Report {
        workload,
        source,
        input,
        queries_input,
        seed: c.seed,
        dim: base.dim,
        vectors: base.rows,
        queries: queries.rows,
        quantizer: c.quantizer,
        rotation: c.rotation,
        sketch: (c.quantizer == QuantizerKind::Prod).then_some(c.sketch),
        threads,
        results,
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "{} | quantizer {:?} | rotation {} | d = {} | {} vectors | {} queries | seed {} | {} thread(s)",
        r.workload,
        r.quantizer,
        r.rotation.name(),
        r.dim,
        r.vectors,
        r.queries,
        r.seed,
        r.threads
    );
    if let Some(i) = &r.input {
        println!("input: {i}");
    }
    println!(
        "{:>4} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>10} {:>11}",
        "bits",
        "d_mse",
        "theory",
        "ip_bias",
        "ip_rmse",
        "ip_mse*d",
        "bound",
        "R@1",
        "R@4",
        "R@16",
        "B/vec",
        "quant M/s",
        "score M/s"
    );
    for x in &r.results {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.5}"));
        let rec = |k: &str| x.recall_1_at_k.get(k).copied().unwrap_or(0.0);
        println!(
            "{:>4} {:>9.5} {:>9} {:>10.2e} {:>9.5} {:>9.5} {:>9} {:>6.3} {:>6.3} {:>6.3} {:>6} {:>10.3} {:>11.1}",
            x.bits,
            x.d_mse,
            opt(x.d_mse_theory),
            x.ip_bias,
            x.ip_rmse,
            x.ip_mse_times_d,
            opt(x.ip_mse_times_d_bound),
            rec("1"),
            rec("4"),
            rec("16"),
            x.bytes_per_vector,
            x.quantize_vectors_per_s / 1e6,
            x.score_keys_per_s / 1e6
        );
    }
}
