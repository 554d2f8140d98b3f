#!/usr/bin/env bash
# Set up, then answer a question about the ~2K-token document shipped in shadowkv/data with the
# default model (SmolLM2-135M-Instruct) on the CPU. Extra arguments go to `shadowkv generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/shadowkv generate --file demo --chat --device cpu --max-new-tokens 48 "$@" \
  "Answer the question using the document above.
Question: Where is the 1907 lens displayed today?"
