//! Project automation. `cargo xtask release-check` runs the release runbook (see `release`);
//! `cargo xtask tidy` checks the workspace's structural rules:
//!
//! - layering: a `tq-*` crate depends only on the `tq-*` crates below it ([`ALLOWED`]), in normal,
//!   dev and build dependencies alike;
//! - every member inherits the workspace lints (`[lints] workspace = true`);
//! - every crate under `crates/` is a workspace member and its folder name equals its package name;
//! - no file that git tracks or would track (ignored files are not judged) is larger than
//!   [`MAX_FILE_BYTES`], so heavy artefacts stay out of git.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

mod fuzz;
mod release;
mod samples;

/// The tq crates each crate may depend on (the layering of docs/ARCHITECTURE.md).
const ALLOWED: &[(&str, &[&str])] = &[
    ("tq-core", &[]),
    ("tq-quant", &["tq-core"]),
    ("tq-kv", &["tq-quant", "tq-core"]),
    ("tq-gpu", &["tq-quant", "tq-core"]),
    ("tq-onnx", &["tq-kv", "tq-quant", "tq-core"]),
    (
        "tq-bench",
        &["tq-onnx", "tq-gpu", "tq-kv", "tq-quant", "tq-core"],
    ),
    (
        "tq-fuzz",
        &["tq-bench", "tq-onnx", "tq-kv", "tq-quant", "tq-core"],
    ),
    ("tq-py", &["tq-kv", "tq-quant", "tq-core"]),
];

/// Largest file allowed in the source tree.
const MAX_FILE_BYTES: u64 = 5 * 1024 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("tidy") => tidy(&workspace_root()),
        Some("samples") => match samples::run(&workspace_root()) {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!(
                "samples: some samples were kept because their command failed (see above)"
            )),
            Err(e) => Err(e),
        },
        Some("fuzz") => match fuzz::run(&workspace_root(), &args[1..]) {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!(
                "fuzz: a target crashed (inputs under fuzz/artifacts/ or target/fuzz-crashes/)"
            )),
            Err(e) => Err(e),
        },
        Some("release-check") => match release::release_check(&workspace_root(), &args[1..]) {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!(
                "release-check: a required step failed (see the table and its logs)"
            )),
            Err(e) => Err(e),
        },
        Some("-h" | "--help") | None => {
            println!(
                "usage: cargo xtask <command>\n\ncommands:\n  tidy                   check crate layering, lints inheritance, member list and file sizes\n  fuzz [--seconds N]     run every fuzz target for N seconds (cargo xtask fuzz --help)\n  samples                regenerate the sample outputs in README.md and docs/ from the release binary\n  release-check [--dry-run] [--advisory-db PATH] [--fuzz-seconds N]\n                         run the release runbook (fmt, clippy, tests, examples, tidy, coverage,\n                         dependency audit, Miri, fuzzing, quick workloads) and print a table\n                         with each step's log (cargo xtask release-check --help)"
            );
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!(
            "unknown command '{other}' (try: cargo xtask --help)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn read_toml(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("cannot parse {}", path.display()))
}

/// All dependency tables of a manifest: top-level and `target.*` normal, dev and build.
fn dependency_names(manifest: &toml::Table) -> Vec<String> {
    let kinds = ["dependencies", "dev-dependencies", "build-dependencies"];
    let mut names = Vec::new();
    let mut collect = |t: &toml::Table| {
        for k in kinds {
            if let Some(deps) = t.get(k).and_then(|v| v.as_table()) {
                for (name, spec) in deps {
                    let real = spec.get("package").and_then(|p| p.as_str()).unwrap_or(name);
                    names.push(real.to_string());
                }
            }
        }
    };
    collect(manifest);
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        for t in targets.values().filter_map(|v| v.as_table()) {
            collect(t);
        }
    }
    names
}

fn tidy(root: &Path) -> Result<()> {
    let ws = read_toml(&root.join("Cargo.toml"))?;
    let members: Vec<String> = ws
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .context("root Cargo.toml has no [workspace] members")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mut problems = Vec::new();
    for member in &members {
        let manifest = read_toml(&root.join(member).join("Cargo.toml"))?;
        let name = manifest
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string();
        let folder = Path::new(member)
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("");
        if folder != name {
            problems.push(format!(
                "{member}: folder name '{folder}' differs from package name '{name}'"
            ));
        }
        let inherits = manifest
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(|w| w.as_bool())
            == Some(true);
        if !inherits {
            problems.push(format!("{name}: missing `[lints] workspace = true`"));
        }
        let tq_deps: Vec<String> = dependency_names(&manifest)
            .into_iter()
            .filter(|d| d.starts_with("tq-"))
            .collect();
        if name.starts_with("tq-") {
            let Some((_, allowed)) = ALLOWED.iter().find(|(n, _)| *n == name) else {
                problems.push(format!(
                    "{name}: not in xtask's layering table; add it to ALLOWED"
                ));
                continue;
            };
            for dep in tq_deps {
                if !allowed.contains(&dep.as_str()) {
                    problems.push(format!(
                        "{name} depends on {dep}, which is not below it (allowed: {allowed:?})"
                    ));
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(root.join("crates")) {
        for e in entries.flatten() {
            let rel = format!("crates/{}", e.file_name().to_string_lossy());
            if e.path().join("Cargo.toml").exists() && !members.contains(&rel) {
                problems.push(format!("{rel} is not a workspace member"));
            }
        }
    }
    check_file_sizes(root, &mut problems)?;
    if problems.is_empty() {
        println!(
            "tidy: {} members, layering and file sizes OK",
            members.len()
        );
        Ok(())
    } else {
        for p in &problems {
            eprintln!("tidy: {p}");
        }
        bail!("{} problem(s)", problems.len())
    }
}

/// The files git tracks or would track (`git ls-files --cached --others --exclude-standard`),
/// relative to `root`; `None` outside a git checkout.
fn git_files(root: &Path) -> Option<Vec<PathBuf>> {
    let out = std::process::Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(
        out.stdout
            .split(|&b| b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
            .collect(),
    )
}

/// Flags files over [`MAX_FILE_BYTES`] among those git tracks or would track, so ignored build
/// folders anywhere in the checkout (a second `CARGO_TARGET_DIR`, `fuzz/target`) are never judged.
/// Outside a git checkout, walks the tree skipping `target`, `artifacts`, `.git` and `data`.
fn check_file_sizes(root: &Path, problems: &mut Vec<String>) -> Result<()> {
    let Some(files) = git_files(root) else {
        return check_sizes(root, root, problems);
    };
    for rel in files {
        // A tracked file deleted in the working tree has no size to judge.
        let Ok(meta) = std::fs::metadata(root.join(&rel)) else {
            continue;
        };
        if meta.is_file() && meta.len() > MAX_FILE_BYTES {
            problems.push(format!("{} is {} bytes (limit {MAX_FILE_BYTES}): generate it with a script into a git-ignored folder", rel.display(), meta.len()));
        }
    }
    Ok(())
}

fn check_sizes(root: &Path, dir: &Path, problems: &mut Vec<String>) -> Result<()> {
    for e in std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
    {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if matches!(name.as_str(), "target" | "artifacts" | ".git" | "data") {
            continue;
        }
        let meta = e.metadata()?;
        if meta.is_dir() {
            check_sizes(root, &path, problems)?;
        } else if meta.len() > MAX_FILE_BYTES {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            problems.push(format!("{rel} is {} bytes (limit {MAX_FILE_BYTES}): generate it with a script into a git-ignored folder", meta.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ignored files are never judged, wherever they are; files git would track are.
    #[test]
    fn file_sizes_judge_what_git_tracks_or_would_track() {
        let dir = std::env::temp_dir().join(format!("tq-tidy-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("build")).unwrap();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap()
        };
        if !git(&["init", "-q"]).status.success() {
            eprintln!("git is not available here; skipping");
            return;
        }
        std::fs::write(dir.join(".gitignore"), "build/\n").unwrap();
        let big = vec![0u8; MAX_FILE_BYTES as usize + 1];
        std::fs::write(dir.join("build/huge.bin"), &big).unwrap();
        std::fs::write(dir.join("small.txt"), b"ok").unwrap();
        let mut problems = Vec::new();
        check_file_sizes(&dir, &mut problems).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        std::fs::write(dir.join("new.bin"), &big).unwrap();
        check_file_sizes(&dir, &mut problems).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("new.bin is"), "{problems:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_dependencies_in_every_table() {
        let m: toml::Table = r#"
            [dependencies]
            tq-core = { path = "x" }
            [dev-dependencies]
            renamed = { package = "tq-kv", path = "y" }
            [target.'cfg(unix)'.build-dependencies]
            tq-onnx = "1"
        "#
        .parse()
        .unwrap();
        let mut d = dependency_names(&m);
        d.sort();
        assert_eq!(d, vec!["tq-core", "tq-kv", "tq-onnx"]);
    }

    #[test]
    fn an_upward_dependency_is_rejected() {
        let dir = std::env::temp_dir().join(format!("xtask-tidy-{}", std::process::id()));
        let core = dir.join("crates/tq-core");
        std::fs::create_dir_all(&core).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            "[workspace]\nmembers = [\"crates/tq-core\"]\n",
        )
        .unwrap();
        std::fs::write(core.join("Cargo.toml"), "[package]\nname = \"tq-core\"\n[dependencies]\ntq-quant = \"1\"\n[lints]\nworkspace = true\n").unwrap();
        let err = tidy(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.to_string().contains("1 problem"), "{err}");
    }

    #[test]
    fn the_workspace_is_tidy() {
        tidy(&workspace_root()).unwrap();
    }
}
