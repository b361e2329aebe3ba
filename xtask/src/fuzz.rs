//! `cargo xtask fuzz [--seconds N] [--engine auto|libfuzzer|stable] [--target NAME,...]`: runs
//! every fuzz target of `crates/tq-fuzz` for a bounded time and prints executions, seconds and
//! findings per target.
//!
//! With `auto` (the default) the coverage-guided libFuzzer runs through cargo-fuzz where a nightly
//! toolchain and cargo-fuzz are installed, each target over a scratch copy of its seed corpus
//! (`target/fuzz-corpus/NAME`, so the committed seeds in `fixtures/fuzz/NAME` are only read);
//! elsewhere the stable mutation driver `tq-fuzz` runs. A crash fails the command; libFuzzer
//! writes the input under `fuzz/artifacts/NAME/`, tq-fuzz under `target/fuzz-crashes/NAME/`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// The fuzz targets (the names of crates/tq-fuzz's `TARGETS` and of fuzz/Cargo.toml's binaries).
pub const TARGETS: [&str; 8] = [
    "npy",
    "fvecs",
    "vectors-safetensors",
    "batch",
    "kv-cache",
    "kv-trace",
    "bundle-config",
    "cli-lists",
];

fn has_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `Done N runs in S second(s)`, libFuzzer's last line: the executions.
fn libfuzzer_runs(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.starts_with("Done "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the fuzz command; returns whether no target found a crash.
pub fn run(root: &Path, args: &[String]) -> Result<bool> {
    let mut seconds = 30u64;
    let mut engine = "auto".to_string();
    let mut targets: Vec<String> = TARGETS.iter().map(|s| s.to_string()).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().context("--seconds needs a number")?;
                seconds = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .with_context(|| format!("--seconds '{v}' is not a positive integer"))?;
            }
            "--engine" => engine = it.next().context("--engine needs a name")?.clone(),
            "--target" => {
                let v = it.next().context("--target needs names")?;
                targets = v.split(',').map(String::from).collect();
                if let Some(t) = targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
                    bail!("unknown target '{t}' (targets: {})", TARGETS.join(", "));
                }
            }
            "-h" | "--help" => {
                println!(
                    "usage: cargo xtask fuzz [--seconds N] [--engine auto|libfuzzer|stable] [--target NAME,...]\n\nRuns each fuzz target for N seconds (default 30) and prints executions and findings.\nauto: libFuzzer through cargo-fuzz where nightly and cargo-fuzz are installed, else the stable\ndriver (cargo run --release -p tq-fuzz). Targets: {}",
                    TARGETS.join(", ")
                );
                return Ok(true);
            }
            other => bail!("unknown fuzz option '{other}' (see cargo xtask fuzz --help)"),
        }
    }
    let libfuzzer = match engine.as_str() {
        "auto" => has_cargo_fuzz(),
        "libfuzzer" if has_cargo_fuzz() => true,
        "libfuzzer" => bail!(
            "cargo-fuzz on a nightly toolchain is not installed (cargo install cargo-fuzz; rustup toolchain install nightly)"
        ),
        "stable" => false,
        other => bail!("unknown engine '{other}' (expected auto, libfuzzer or stable)"),
    };
    if !libfuzzer {
        eprintln!("fuzz: stable driver (tq-fuzz), {seconds} s per target");
        let status = Command::new("cargo")
            .args(["run", "--release", "-q", "-p", "tq-fuzz", "--", "--seconds"])
            .arg(seconds.to_string())
            .arg("--target")
            .arg(targets.join(","))
            .current_dir(root)
            .status()
            .context("cannot run cargo")?;
        return Ok(status.success());
    }
    eprintln!("fuzz: libFuzzer (cargo +nightly fuzz), {seconds} s per target");
    let mut clean = true;
    let mut rows = Vec::new();
    for t in &targets {
        let scratch = root.join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("cannot create {}", scratch.display()))?;
        let seeds = root.join("fixtures/fuzz").join(t);
        eprintln!("fuzz: {t} ...");
        let start = Instant::now();
        let out = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", "-O", t])
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .current_dir(root)
            .output()
            .context("cannot run cargo fuzz")?;
        let secs = start.elapsed().as_secs_f64();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let logfile = root.join("target/fuzz-corpus").join(format!("{t}.log"));
        std::fs::write(&logfile, &log).ok();
        let result = if out.status.success() {
            "clean"
        } else if log.contains("failed to build fuzz script") {
            "NO BUILD"
        } else {
            "CRASH"
        };
        clean &= out.status.success();
        rows.push((t.clone(), libfuzzer_runs(&log), secs, result, logfile));
    }
    println!(
        "{:<20} {:>12} {:>9} {:>8}  log",
        "target", "executions", "seconds", "result"
    );
    for (t, runs, secs, result, log) in rows {
        let rel = log.strip_prefix(root).unwrap_or(&log).display().to_string();
        println!(
            "{t:<20} {:>12} {secs:>9.1} {result:>8}  {rel}",
            runs.map_or("-".into(), |r| r.to_string()),
        );
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_last_line() {
        let log = "#1024 pulse cov: 10\nDone 123456 runs in 31 second(s)\nstat::number_of_executed_units: 123456\n";
        assert_eq!(libfuzzer_runs(log), Some(123_456));
        assert_eq!(libfuzzer_runs("crashed"), None);
    }

    #[test]
    fn targets_match_the_fuzz_crate_and_the_harness() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."));
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap_or_default();
        for t in TARGETS {
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t}");
            assert!(root.join("fixtures/fuzz").join(t).is_dir(), "{t}");
        }
        // The same names, in the same order, as the fuzz crate's TARGETS table.
        let lib =
            std::fs::read_to_string(root.join("crates/tq-fuzz/src/lib.rs")).unwrap_or_default();
        let names: Vec<&str> = lib
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name: \"")?.strip_suffix("\","))
            .collect();
        assert_eq!(names, TARGETS);
        assert!(run(root, &["--target".into(), "nope".into()]).is_err());
    }
}
