#!/usr/bin/env bash
# The project's test command: formatting, lints, every test, and the layering check.
# Runs on a fresh clone after scripts/setup.sh; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== cargo xtask tidy"
cargo xtask tidy
