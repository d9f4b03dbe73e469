#!/usr/bin/env bash
# Runs the test suite in the project's environment (set up first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
