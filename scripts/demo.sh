#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on its embedded default. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nashalign demo "$@"
