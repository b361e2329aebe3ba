//! `tq-fuzz`: runs the fuzz targets with the stable mutation driver for a set time or number of
//! inputs and prints executions, parse rate and crashes per target.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tq_fuzz::{Budget, TARGETS};

/// Fuzz tq's parsers of outside bytes (.npy, .fvecs, saved batches, KV caches, traces, decoder
/// config.json, CLI lists) with a seeded mutation loop over the seed corpus. Panicking inputs are
/// written to the crash folder and the command exits 1. The coverage-guided twin of each target
/// runs under cargo-fuzz: `cargo +nightly fuzz run TARGET` in this repository.
#[derive(Parser)]
#[command(name = "tq-fuzz")]
struct Cli {
    /// Targets, comma-separated [default: all]. See --list.
    #[arg(long, value_delimiter = ',')]
    target: Vec<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 10.0, conflicts_with = "runs")]
    seconds: f64,
    /// Mutated inputs per target instead of a time budget.
    #[arg(long)]
    runs: Option<u64>,
    /// Seed of the mutations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seed corpus folder, one subfolder per target.
    #[arg(long, default_value = "fixtures/fuzz")]
    corpus: PathBuf,
    /// Where panicking inputs are written (one subfolder per target).
    #[arg(long, default_value = "target/fuzz-crashes")]
    crashes: PathBuf,
    /// List the targets and exit.
    #[arg(long)]
    list: bool,
    /// Write the generated seed corpus into --corpus and exit.
    #[arg(long)]
    write_corpus: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tq-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    if cli.list {
        for t in TARGETS {
            println!("{:<20} {}", t.name, t.about);
        }
        return Ok(true);
    }
    let targets: Vec<&tq_fuzz::Target> = if cli.target.is_empty() {
        TARGETS.iter().collect()
    } else {
        cli.target
            .iter()
            .map(|n| {
                tq_fuzz::target(n)
                    .with_context(|| format!("unknown target '{n}' (tq-fuzz --list names them)"))
            })
            .collect::<Result<_>>()?
    };
    if cli.write_corpus {
        for t in &targets {
            let dir = cli.corpus.join(t.name);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            for (name, bytes) in tq_fuzz::corpus::seeds(t.name)? {
                let p = dir.join(name);
                std::fs::write(&p, bytes)
                    .with_context(|| format!("cannot write {}", p.display()))?;
            }
        }
        println!("wrote the seed corpus under {}", cli.corpus.display());
        return Ok(true);
    }
    if !(cli.seconds > 0.0 && cli.seconds.is_finite()) {
        bail!("--seconds must be a positive number");
    }
    let budget = match cli.runs {
        Some(n) => Budget::Runs(n),
        None => Budget::Time(Duration::from_secs_f64(cli.seconds)),
    };
    println!(
        "{:<20} {:>8} {:>12} {:>10} {:>8} {:>8}",
        "target", "seeds", "executions", "execs/s", "parsed", "crashes"
    );
    let mut clean = true;
    for t in targets {
        let dir = cli.corpus.join(t.name);
        let seeds = tq_fuzz::read_corpus(&dir)
            .with_context(|| format!("cannot read the corpus {}", dir.display()))?;
        let s = tq_fuzz::fuzz(t, &seeds, budget, cli.seed, &cli.crashes)
            .with_context(|| format!("cannot write a crash under {}", cli.crashes.display()))?;
        println!(
            "{:<20} {:>8} {:>12} {:>10.0} {:>7.1}% {:>8}",
            t.name,
            seeds.len(),
            s.executions,
            s.executions as f64 / s.seconds.max(1e-9),
            100.0 * s.parsed as f64 / s.executions.max(1) as f64,
            s.crashes.len()
        );
        for c in &s.crashes {
            println!("  crash: {}", c.display());
        }
        clean &= s.crashes.is_empty();
    }
    Ok(clean)
}
