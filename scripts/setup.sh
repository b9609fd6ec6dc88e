#!/usr/bin/env bash
# Creates .venv (once) and installs nashalign with its dev extra into it.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
# TORCH_SPEC picks the PyTorch build; the default is the CPU build these machines carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.nashalign-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
  # Pin torch first: an unpinned install would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install --quiet "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import nashalign, torch, transformers" 
  echo "$want" > "$stamp"
fi
