#!/usr/bin/env bash
# Regenerates the fixtures. fixtures/glove-2k.npy: the first 2000 GloVe 6B 50d vectors (PDDL-1.0) as a C-order
# float32 .npy, used by the CLI tests as a small real embedding set. Checking is the default
# (the committed file is used as is); run this only to regenerate it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-glove.sh
python3 - <<'PY'
import ast, struct
src = open("data/glove-6b-50d.npy", "rb").read()
hlen = struct.unpack("<H", src[8:10])[0]
header = ast.literal_eval(src[10:10 + hlen].decode("latin1"))
rows, dim = header["shape"]
assert header["descr"] == "<f4" and header["fortran_order"], header
data = src[10 + hlen:]
keep = 2000
out = bytearray()
for i in range(keep):
    for j in range(dim):
        k = 4 * (j * rows + i)
        out += data[k:k + 4]
h = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (keep, dim)
h += " " * ((64 - (10 + len(h) + 1) % 64) % 64) + "\n"
with open("fixtures/glove-2k.npy", "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode("latin1") + bytes(out))
print("wrote fixtures/glove-2k.npy", keep, "x", dim)
PY
# A small synthetic K/V trace (1 layer, 2 kv / 4 q heads, 128 tokens, d = 64, seed 42) for the
# trace quick path of `cargo xtask release-check`.
cargo run --quiet --release -p tq-bench -- trace --quick --seed 42 --save-trace fixtures/trace-small.safetensors --json > /dev/null
echo "wrote fixtures/trace-small.safetensors"
# The tiny decoder bundle (2 layers, seeded random weights, a byte-level BPE tokenizer trained on a
# built-in text) and the malformed bundles the tq-onnx tests must reject.
venv="$(./scripts/python-venv.sh)"
"$venv/bin/python" scripts/export_llama_onnx.py --tiny --seed 7 --out fixtures/tiny-llama
"$venv/bin/python" scripts/make_bad_bundles.py
