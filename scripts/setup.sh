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
echo "setup: ok ($(cargo --version))"
