#!/usr/bin/env bash
# Sets up both environments (scripts/setup.sh), lints, runs the test suite in .venv, then the
# vLLM-marked tests in .venv-vllm against the real engine (CPU build). Extra arguments go to both
# pytest runs; when they select no vLLM test, the second run's "no tests collected" is not an error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup.sh vllm
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest "$@"
status=0
if [ "$#" -eq 0 ]; then
  # One pytest process per vLLM test file: an engine started in-process by one file changed what the
  # next file's subprocess engines log (their "Initializing a V1 LLM engine" lines, which the online
  # tests count) when all ran in one process; each file alone passes.
  for file in tests/test_vllm*.py; do
    .venv-vllm/bin/python -m pytest -m vllm "$file" || status=$?
    [ "$status" -eq 0 ] || exit "$status"
  done
else
  .venv-vllm/bin/python -m pytest -m vllm "$@" || status=$?
  if [ "$status" -ne 0 ] && ! { [ "$status" -eq 5 ] && [ "$#" -gt 0 ]; }; then
    exit "$status"
  fi
fi
