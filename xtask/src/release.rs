//! `cargo xtask release-check`: the release runbook. Runs each step in order, writes its output to
//! `target/release-check/NN-name.log`, prints a table of step, result, duration and log, and fails
//! when a required step fails. A required step that cannot run here (its tool is not installed)
//! fails the check with the reason; an optional one (coverage, Miri where no nightly toolchain
//! with Miri is installed) is reported as skipped with the reason, never as passed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Outcome of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// An optional step that cannot run here.
    Skip(String),
    /// A required step that cannot run here: fails the check.
    Unavailable(String),
}

/// One runbook step: a command line, or a reason it cannot run here.
pub struct Step {
    pub name: &'static str,
    pub required: bool,
    pub plan: Plan,
}

/// What a step does.
pub enum Plan {
    Run(Vec<String>),
    Skip(String),
}

fn cmd(parts: &[&str]) -> Plan {
    Plan::Run(parts.iter().map(|s| s.to_string()).collect())
}

fn has_cargo_subcommand(name: &str) -> bool {
    Command::new("cargo")
        .args([name, "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn has_miri() -> bool {
    Command::new("cargo")
        .args(["+nightly", "miri", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The usage text of `cargo xtask release-check --help`.
pub const USAGE: &str =
    "usage: cargo xtask release-check [--dry-run] [--advisory-db PATH] [--fuzz-seconds N]

Runs the release runbook in order and prints a table of step, result, seconds and log
(target/release-check/NN-step.log). Exits 1 when a required step fails or cannot run.

Steps: fmt, clippy, test, examples, tidy, coverage (optional: cargo-llvm-cov), audit (cargo-audit),
miri (optional: the scalar kernels of tq-core under Miri, needs a nightly toolchain with Miri),
fuzz (every fuzz target for --fuzz-seconds each: cargo-fuzz where nightly and cargo-fuzz are
installed, else the stable driver tq-fuzz), and quick runs of synthetic, trace and real-model.

options:
  --dry-run            list the steps and what each would run, run nothing
  --advisory-db PATH   audit against a local RustSec advisory database (offline); without it
                       cargo audit fetches the database, and fails where there is no network
  --fuzz-seconds N     seconds per fuzz target (default 30)
  -h, --help           this text

scripts/setup.sh --release-tools installs cargo-audit and cargo-llvm-cov.";

/// The runbook, in order. `advisory_db` audits offline against that database (else `cargo
/// audit` fetches it); `fuzz_seconds` is the time per fuzz target.
pub fn steps(root: &Path, advisory_db: Option<&Path>, fuzz_seconds: u64) -> Vec<Step> {
    let coverage = if has_cargo_subcommand("llvm-cov") {
        cmd(&["cargo", "llvm-cov", "--workspace", "--summary-only"])
    } else {
        Plan::Skip(
            "cargo-llvm-cov is not installed (scripts/setup.sh --release-tools installs it)".into(),
        )
    };
    // Accepted advisories live in .cargo/audit.toml with their reasons.
    let audit = if !has_cargo_subcommand("audit") {
        Plan::Skip(
            "cargo-audit is not installed (scripts/setup.sh --release-tools installs it)".into(),
        )
    } else {
        match advisory_db {
            None => cmd(&["cargo", "audit", "--deny", "warnings"]),
            Some(db) => {
                let mut v: Vec<String> = ["cargo", "audit", "--db"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                v.push(db.display().to_string());
                v.extend(["--no-fetch", "--deny", "warnings"].map(String::from));
                Plan::Run(v)
            }
        }
    };
    let miri = if has_miri() {
        // SIMD dispatch is off under Miri (cfg!(miri)), so the scalar twins run. proptest reads
        // the working directory (isolation off) and runs a few cases (Miri is ~1000x slower).
        cmd(&[
            "env",
            "MIRIFLAGS=-Zmiri-disable-isolation",
            "PROPTEST_CASES=4",
            "cargo",
            "+nightly",
            "miri",
            "test",
            "-p",
            "tq-core",
            "--lib",
            "--test",
            "soundness",
            "--",
            "scan",
            "bitpack",
            "refuse",
        ])
    } else {
        Plan::Skip(
            "no nightly toolchain with Miri (rustup +nightly component add miri installs it)"
                .into(),
        )
    };
    let fuzz = Plan::Run(
        [
            "cargo",
            "xtask",
            "fuzz",
            "--seconds",
            &fuzz_seconds.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    let trace_fixture = root
        .join("fixtures/trace-small.safetensors")
        .display()
        .to_string();
    let tiny_model = root.join("fixtures/tiny-llama").display().to_string();
    let prompts = root.join("fixtures/prompts.jsonl").display().to_string();
    vec![
        Step {
            name: "fmt",
            required: true,
            plan: cmd(&["cargo", "fmt", "--all", "--", "--check"]),
        },
        Step {
            name: "clippy",
            required: true,
            plan: cmd(&[
                "cargo",
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ]),
        },
        Step {
            name: "test",
            required: true,
            plan: cmd(&["cargo", "test", "--workspace", "--all-features"]),
        },
        Step {
            name: "examples",
            required: true,
            plan: cmd(&["cargo", "check", "--workspace", "--examples"]),
        },
        Step {
            name: "tidy",
            required: true,
            plan: cmd(&["cargo", "xtask", "tidy"]),
        },
        Step {
            name: "coverage",
            required: false,
            plan: coverage,
        },
        Step {
            name: "audit",
            required: true,
            plan: audit,
        },
        Step {
            name: "miri",
            required: false,
            plan: miri,
        },
        Step {
            name: "fuzz",
            required: true,
            plan: fuzz,
        },
        Step {
            name: "synthetic quick",
            required: true,
            plan: cmd(&[
                "cargo",
                "run",
                "--release",
                "-p",
                "tq-bench",
                "--",
                "synthetic",
                "--quick",
                "--json",
            ]),
        },
        Step {
            name: "trace quick",
            required: true,
            plan: Plan::Run(
                [
                    "cargo",
                    "run",
                    "--release",
                    "-p",
                    "tq-bench",
                    "--",
                    "trace",
                    "--trace",
                    &trace_fixture,
                    "--key-bits",
                    "4,3.5",
                    "--value-bits",
                    "4",
                    "--json",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ),
        },
        Step {
            name: "real-model quick",
            required: true,
            plan: Plan::Run(
                [
                    "cargo",
                    "run",
                    "--release",
                    "-p",
                    "tq-bench",
                    "--",
                    "real-model",
                    "--model-dir",
                    &tiny_model,
                    "--prompts",
                    &prompts,
                    "--quick",
                    "--key-bits",
                    "4,2.5",
                    "--value-bits",
                    "4",
                    "--json",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ),
        },
    ]
}

/// Runs the runbook (or lists it with `dry_run`); returns whether every required step passed.
pub fn release_check(root: &Path, args: &[String]) -> Result<bool> {
    let mut dry_run = false;
    let mut advisory_db: Option<PathBuf> = None;
    let mut fuzz_seconds = 30u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(true);
            }
            "--dry-run" => dry_run = true,
            "--advisory-db" => {
                advisory_db = Some(PathBuf::from(
                    it.next().context("--advisory-db needs a PATH")?,
                ))
            }
            "--fuzz-seconds" => {
                let v = it.next().context("--fuzz-seconds needs a number")?;
                fuzz_seconds =
                    v.parse().ok().filter(|&n| n > 0).with_context(|| {
                        format!("--fuzz-seconds '{v}' is not a positive integer")
                    })?;
            }
            other => bail!(
                "unknown release-check option '{other}' (expected --dry-run, --advisory-db PATH, --fuzz-seconds N; see --help)"
            ),
        }
    }
    if let Some(db) = &advisory_db
        && !db.is_dir()
    {
        bail!("advisory database {} is not a directory", db.display());
    }
    let steps = steps(root, advisory_db.as_deref(), fuzz_seconds);
    let logs = root.join("target/release-check");
    if dry_run {
        for (i, s) in steps.iter().enumerate() {
            let what = match &s.plan {
                Plan::Run(c) => c.join(" "),
                Plan::Skip(why) if s.required => format!("(cannot run, fails the check: {why})"),
                Plan::Skip(why) => format!("(skipped: {why})"),
            };
            println!(
                "{:>2}. {:<18} {:<9} {what}",
                i + 1,
                s.name,
                if s.required { "required" } else { "optional" }
            );
        }
        return Ok(true);
    }
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut rows = Vec::new();
    let mut ok = true;
    for (i, s) in steps.iter().enumerate() {
        let log = logs.join(format!("{:02}-{}.log", i + 1, s.name.replace(' ', "-")));
        let start = Instant::now();
        let outcome = match &s.plan {
            Plan::Skip(why) if s.required => {
                std::fs::write(&log, format!("cannot run: {why}\n")).ok();
                Outcome::Unavailable(why.clone())
            }
            Plan::Skip(why) => {
                std::fs::write(&log, format!("skipped: {why}\n")).ok();
                Outcome::Skip(why.clone())
            }
            Plan::Run(c) => {
                eprintln!("release-check: {} ...", s.name);
                let out = Command::new(&c[0])
                    .args(&c[1..])
                    .current_dir(root)
                    .output()
                    .with_context(|| format!("cannot run {}", c[0]))?;
                let mut text = format!("$ {}\n", c.join(" ")).into_bytes();
                text.extend(&out.stdout);
                text.extend(&out.stderr);
                std::fs::write(&log, text)
                    .with_context(|| format!("cannot write {}", log.display()))?;
                if out.status.success() {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                }
            }
        };
        if matches!(outcome, Outcome::Fail | Outcome::Unavailable(_)) && s.required {
            ok = false;
        }
        rows.push((
            s.name,
            s.required,
            outcome,
            start.elapsed().as_secs_f64(),
            log,
        ));
    }
    println!(
        "{:<18} {:<9} {:<8} {:>9}  log",
        "step", "", "result", "seconds"
    );
    for (name, required, outcome, secs, log) in &rows {
        let result = match outcome {
            Outcome::Pass => "PASS".to_string(),
            Outcome::Fail | Outcome::Unavailable(_) => "FAIL".to_string(),
            Outcome::Skip(_) => "SKIP".to_string(),
        };
        let rel = log.strip_prefix(root).unwrap_or(log).display().to_string();
        println!(
            "{name:<18} {:<9} {result:<8} {secs:>9.1}  {rel}",
            if *required { "required" } else { "optional" }
        );
        if let Outcome::Skip(why) | Outcome::Unavailable(why) = outcome {
            println!("{:<18} {:<9} {:<8} {:>9}  ({why})", "", "", "", "");
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runbook_order_and_skips_are_explicit() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."));
        let s = steps(root, None, 5);
        let names: Vec<&str> = s.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "fmt",
                "clippy",
                "test",
                "examples",
                "tidy",
                "coverage",
                "audit",
                "miri",
                "fuzz",
                "synthetic quick",
                "trace quick",
                "real-model quick"
            ]
        );
        // The audit is required: without a local database it fetches one (cargo audit's default),
        // or, where cargo-audit is missing, it cannot run and so fails the check.
        assert!(s[6].required);
        match &s[6].plan {
            Plan::Run(cmd) => assert!(!cmd.iter().any(|a| a == "--no-fetch")),
            Plan::Skip(why) => assert!(why.contains("cargo-audit is not installed")),
        }
        assert!(
            matches!(&s[8].plan, Plan::Run(cmd) if cmd.join(" ") == "cargo xtask fuzz --seconds 5")
        );
        assert!(root.join("fixtures/trace-small.safetensors").is_file());
        assert!(root.join("fixtures/tiny-llama/model.onnx").is_file());
        assert!(
            matches!(&s[11].plan, Plan::Run(cmd) if cmd.iter().any(|a| a.ends_with("tiny-llama")))
        );
        assert!(release_check(root, &["--bogus".into()]).is_err());
        assert!(release_check(root, &["--fuzz-seconds".into(), "0".into()]).is_err());
        assert!(release_check(root, &["--advisory-db".into(), "/nonexistent".into()]).is_err());
        assert!(release_check(root, &["--dry-run".into()]).unwrap());
        assert!(release_check(root, &["--help".into()]).unwrap());
    }
}
