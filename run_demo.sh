#!/usr/bin/env bash
# The main job on its built-in default: the paper's linear-regression experiment
# (SGD vs VR-SGD, plus the gamma/k sensitivity sweep) on CPU; results in results/linreg/.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/venv.sh
exec python -m benchmarks.linreg "$@"
