#!/usr/bin/env bash
# The test suite (slow experiment-style runs are skipped; add `-m slow` to run them).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/venv.sh
exec python -m pytest -q "$@"
