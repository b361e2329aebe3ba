#!/usr/bin/env bash
# Installs what the two README commands need beyond Cargo's own downloads: the rustfmt and clippy
# components of the installed toolchain. Safe to run more than once.
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust from https://rustup.rs first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
# `./scripts/setup.sh --release-tools` also installs what `cargo xtask release-check` uses for
# coverage and the dependency audit (several minutes of compilation; not needed for the tests).
if [ "${1:-}" = "--release-tools" ]; then
  rustup component add llvm-tools
  cargo install --locked cargo-llvm-cov
  cargo install --locked cargo-audit
fi
echo "setup: ok ($(cargo --version))"
