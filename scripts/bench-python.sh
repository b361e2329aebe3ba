#!/usr/bin/env bash
# Builds the Python package in release mode into the project's venv, installs faiss-cpu there as
# the optional peer, fetches GloVe (data/, git-ignored) and runs scripts/bench_python.py.
# Usage: scripts/bench-python.sh [bench_python.py options, e.g. --threads 1]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$PWD/$(./scripts/python-venv.sh)"
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --quiet --release --locked -m crates/tq-py/Cargo.toml
"$venv/bin/pip" install --quiet --disable-pip-version-check faiss-cpu
./scripts/fetch-glove.sh
"$venv/bin/python" scripts/bench_python.py "$@"
