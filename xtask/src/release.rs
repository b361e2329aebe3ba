//! `cargo xtask release-check`: the release runbook. Runs each step in order, writes its output to
//! `target/release-check/NN-name.log`, prints a table of step, result, duration and log, and fails
//! when a required step fails. Optional tools (coverage, the dependency audit) that are not
//! installed, or an audit without an advisory database, are reported as skipped with the reason,
//! never as passed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Outcome of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip(String),
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

/// The runbook, in order. `advisory_db` enables the audit.
pub fn steps(root: &Path, advisory_db: Option<&Path>) -> Vec<Step> {
    let coverage = if has_cargo_subcommand("llvm-cov") {
        cmd(&["cargo", "llvm-cov", "--workspace", "--summary-only"])
    } else {
        Plan::Skip(
            "cargo-llvm-cov is not installed (scripts/setup.sh --release-tools installs it)".into(),
        )
    };
    let audit = match advisory_db {
        None => Plan::Skip("no --advisory-db PATH given".into()),
        Some(_) if !has_cargo_subcommand("audit") => Plan::Skip(
            "cargo-audit is not installed (scripts/setup.sh --release-tools installs it)".into(),
        ),
        Some(db) => {
            let mut v: Vec<String> = ["cargo", "audit", "--db"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            v.push(db.display().to_string());
            v.push("--no-fetch".into());
            // Accepted advisories live in .cargo/audit.toml with their reasons.
            v.push("--deny".into());
            v.push("warnings".into());
            Plan::Run(v)
        }
    };
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
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dry-run" => dry_run = true,
            "--advisory-db" => {
                advisory_db = Some(PathBuf::from(
                    it.next().context("--advisory-db needs a PATH")?,
                ))
            }
            other => bail!(
                "unknown release-check option '{other}' (expected --dry-run, --advisory-db PATH)"
            ),
        }
    }
    if let Some(db) = &advisory_db
        && !db.is_dir()
    {
        bail!("advisory database {} is not a directory", db.display());
    }
    let steps = steps(root, advisory_db.as_deref());
    let logs = root.join("target/release-check");
    if dry_run {
        for (i, s) in steps.iter().enumerate() {
            let what = match &s.plan {
                Plan::Run(c) => c.join(" "),
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
        if outcome == Outcome::Fail && s.required {
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
            Outcome::Fail => "FAIL".to_string(),
            Outcome::Skip(_) => "SKIP".to_string(),
        };
        let rel = log.strip_prefix(root).unwrap_or(log).display().to_string();
        println!(
            "{name:<18} {:<9} {result:<8} {secs:>9.1}  {rel}",
            if *required { "required" } else { "optional" }
        );
        if let Outcome::Skip(why) = outcome {
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
        let s = steps(root, None);
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
                "synthetic quick",
                "trace quick",
                "real-model quick"
            ]
        );
        assert!(matches!(&s[6].plan, Plan::Skip(why) if why.contains("advisory-db")));
        assert!(root.join("fixtures/trace-small.safetensors").is_file());
        assert!(root.join("fixtures/tiny-llama/model.onnx").is_file());
        assert!(
            matches!(&s[9].plan, Plan::Run(cmd) if cmd.iter().any(|a| a.ends_with("tiny-llama")))
        );
        assert!(release_check(root, &["--bogus".into()]).is_err());
        assert!(release_check(root, &["--advisory-db".into(), "/nonexistent".into()]).is_err());
        assert!(release_check(root, &["--dry-run".into()]).unwrap());
    }
}
