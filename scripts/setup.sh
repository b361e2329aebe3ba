#!/usr/bin/env bash
# Installs what the two README commands need beyond Cargo's own downloads: the rustfmt and clippy
# components of the installed toolchain and, on Linux, Mesa's software Vulkan for the GPU tests.
# Safe to run more than once.
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust from https://rustup.rs first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
# The GPU tests (crates/tq-gpu) run on Mesa's software Vulkan (lavapipe) when the machine has no
# GPU: install it from Debian's packages unless a Vulkan driver for it is already there.
if [ "$(uname -s)" = "Linux" ] && ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
    apt="$sudo env DEBIAN_FRONTEND=noninteractive apt-get"
    $apt install -y -q mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1 \
      || { $apt update -q >/dev/null && $apt install -y -q mesa-vulkan-drivers libvulkan1 >/dev/null; }
    echo "setup: installed mesa-vulkan-drivers and libvulkan1 (lavapipe)"
  else
    echo "setup: no apt-get; install Mesa's Vulkan drivers (lavapipe) for the GPU tests" >&2
  fi
fi
# `./scripts/setup.sh --release-tools` also installs what `cargo xtask release-check` uses for
# coverage and the dependency audit (several minutes of compilation; not needed for the tests).
# With a nightly toolchain it adds Miri (the release check runs tq-core's scalar kernels under it)
# and cargo-fuzz (libFuzzer for the fuzz targets); without one, those steps use their fallbacks.
if [ "${1:-}" = "--release-tools" ]; then
  rustup component add llvm-tools
  cargo install --locked cargo-llvm-cov
  cargo install --locked cargo-audit
  if rustup toolchain install nightly --profile minimal --component miri,rust-src; then
    cargo install --locked cargo-fuzz
  else
    echo "setup: no nightly toolchain here: release-check skips Miri and fuzzes with the stable driver" >&2
  fi
fi
echo "setup: ok ($(cargo --version))"
