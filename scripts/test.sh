#!/usr/bin/env bash
# Install vlforge (scripts/install.sh) and run the test suite: unit, integration, gpu (skipped without CUDA).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m unit         # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/python -m pytest "$@"
