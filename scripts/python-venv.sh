#!/usr/bin/env bash
# Prints the path of the project's Python venv (artifacts/.cache/venv, or $TQ_CACHE_DIR/venv),
# creating it with the exporter's packages (gguf, numpy, onnx, tokenizers) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TQ_CACHE_DIR:-artifacts/.cache}/venv"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check gguf==0.19.0 numpy onnx tokenizers >&2
fi
echo "$venv"
