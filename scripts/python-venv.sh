#!/usr/bin/env bash
# Prints the path of the project's Python venv (artifacts/.cache/venv, or $TQ_CACHE_DIR/venv),
# creating it with the exporter's packages (gguf, numpy, onnx, tokenizers) and the Python package's build and test tools (maturin, pytest) on first use.
# `--check` only tells (exit 0: built and complete, 1: missing or incomplete) and builds nothing.
#
# Crash-safe: the venv counts as built only when its marker file (.tq-complete, holding the package
# list) was written after every install finished. A venv without it (an interrupted run, Ctrl-C
# during pip) or with another package list is removed and built again.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TQ_CACHE_DIR:-artifacts/.cache}/venv"
packages="gguf==0.19.0 numpy onnx tokenizers maturin pytest"
marker="$venv/.tq-complete"
if [ -x "$venv/bin/python" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$packages" ]; then
  echo "$venv"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  exit 1
fi
if [ -e "$venv" ]; then
  echo "python-venv: $venv is incomplete (an interrupted setup) or has another package list: building it again" >&2
  rm -rf "$venv"
fi
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv" >&2
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet --disable-pip-version-check $packages >&2
echo "$packages" > "$marker.tmp"
mv "$marker.tmp" "$marker"
echo "$venv"
