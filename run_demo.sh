#!/usr/bin/env bash
# The main job on its built-in default: tiny BERT pretraining with VR-LAMB on DeepSpeed,
# 2 CPU ranks: prepare the shipped corpus, phase 1 (seq 128, batch 64), phase 2 (seq 512,
# batch 32) from phase 1's weights. Output in runs/demo-<time>/. A few minutes.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/venv.sh
exec python -m pretrain_bert.demo "$@"
