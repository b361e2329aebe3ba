//! `cargo xtask samples`: regenerates the sample outputs in README.md and docs/*.md from the
//! current release binary, so they cannot go stale.
//!
//! A sample is a fenced `text` block right after a marker line naming the command:
//!
//! ````text
//! <!-- sample: tq-bench synthetic --quick --threads 1 -->
//! ```text
//! ...output...
//! ```
//! ````
//!
//! The command's stdout replaces the block. Commands run from the repository root through
//! `cargo run --release -p tq-bench --` (so the binary is never stale, wherever the target folder
//! is). A sample whose command fails here (it needs the exported SmolLM2, say) is kept, reported,
//! and makes the command exit 1. The test `samples_follow_the_binary` in
//! tq-bench checks that every sample still has the current output's shape.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The marker that opens a sample.
pub const MARKER: &str = "<!-- sample: ";

/// Files that hold samples.
pub const FILES: [&str; 3] = ["README.md", "docs/CLI.md", "docs/REAL_MODEL.md"];

/// Rewrites every sample of `text` with `run(command)`; returns the new text and how many samples
/// were replaced. A `run` error keeps that sample and is reported through `skipped`.
pub fn rewrite(
    text: &str,
    run: &mut dyn FnMut(&str) -> Result<String>,
    skipped: &mut Vec<String>,
) -> Result<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    let mut i = 0;
    let mut n = 0;
    while i < lines.len() {
        let line = lines[i];
        out.push(line.to_string());
        i += 1;
        let Some(cmd) = line
            .strip_prefix(MARKER)
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        if lines.get(i) != Some(&"```text") {
            bail!("the sample '{cmd}' is not followed by a ```text block");
        }
        let end = lines[i + 1..]
            .iter()
            .position(|l| *l == "```")
            .map(|p| i + 1 + p)
            .with_context(|| format!("the sample '{cmd}' has no closing ```"))?;
        match run(cmd) {
            Ok(stdout) => {
                out.push("```text".into());
                out.extend(stdout.lines().map(str::to_string));
                out.push("```".into());
                n += 1;
            }
            Err(e) => {
                skipped.push(format!("{cmd}: {e:#}"));
                out.extend(lines[i..=end].iter().map(|l| l.to_string()));
            }
        }
        i = end + 1;
    }
    let mut s = out.join("\n");
    if text.ends_with('\n') {
        s.push('\n');
    }
    Ok((s, n))
}

/// Builds the release binary and rewrites every sample of [`FILES`].
pub fn run(root: &Path) -> Result<bool> {
    let status = Command::new("cargo")
        .args(["build", "--release", "-q", "-p", "tq-bench"])
        .current_dir(root)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release -p tq-bench failed");
    }
    let mut skipped = Vec::new();
    for f in FILES {
        let path = root.join(f);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {f}"))?;
        let mut exec = |cmd: &str| -> Result<String> {
            let args: Vec<&str> = cmd
                .strip_prefix("tq-bench ")
                .context("a sample command starts with 'tq-bench '")?
                .split_whitespace()
                .collect();
            eprintln!("samples: {cmd}");
            let out = Command::new("cargo")
                .args(["run", "--release", "-q", "-p", "tq-bench", "--"])
                .args(&args)
                .current_dir(root)
                .output()
                .context("cannot run tq-bench")?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let (new, n) = rewrite(&text, &mut exec, &mut skipped)?;
        if new != text {
            write(&path, &new)?;
        }
        println!("samples: {f}: {n} regenerated");
    }
    for s in &skipped {
        eprintln!("samples: kept (its command failed here): {s}");
    }
    Ok(skipped.is_empty())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_marked_blocks() {
        let text = "a\n<!-- sample: tq-bench x -->\n```text\nold\n```\nb\n```text\nkeep\n```\n";
        let mut skipped = Vec::new();
        let (new, n) = rewrite(text, &mut |c| Ok(format!("ran {c}\n")), &mut skipped).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            new,
            "a\n<!-- sample: tq-bench x -->\n```text\nran tq-bench x\n```\nb\n```text\nkeep\n```\n"
        );
        let (kept, n) = rewrite(text, &mut |_| bail!("no model"), &mut skipped).unwrap();
        assert_eq!((kept.as_str(), n), (text, 0));
        assert_eq!(skipped.len(), 1);
        assert!(
            rewrite(
                "<!-- sample: x -->\nno block\n",
                &mut |_| Ok(String::new()),
                &mut skipped
            )
            .is_err()
        );
    }
}
