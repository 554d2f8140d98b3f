#!/usr/bin/env bash
# Set up, lint (ruff), then run the test suite (CPU; Triton kernels through TRITON_INTERPRET=1).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long real-model runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check shadowkv tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
