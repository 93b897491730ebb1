#!/usr/bin/env bash
# SQuAD v1.1 fine-tuning + evaluation of a BERT checkpoint on local ranks.
#
#   launch/run_squad.sh --init-checkpoint RUN/phase2/hf --output-dir RUN/squad [pretrain_bert/squad/run.py args]
#
# Every argument goes to pretrain_bert/squad/run.py (--deepspeed-config, --epochs, --lr, ...;
# `python pretrain_bert/squad/run.py --help`). Defaults: configs/squad_tiny.json and the SQuAD
# subsets in data/squad/. The paper's BERT-large recipe: --deepspeed-config configs/squad_bert_large.json.
#
# Environment: NGPUS (local ranks, default 2), MASTER_PORT (29500), DS_ACCELERATOR (cuda when
# torch sees a GPU, else cpu, as scripts/venv.sh sets it), OMP_NUM_THREADS (1 on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -eq 0 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
if [ -z "${DS_ACCELERATOR:-}" ]; then
  DS_ACCELERATOR="$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
fi
export DS_ACCELERATOR
[ "$DS_ACCELERATOR" = cpu ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MASTER_PORT=${MASTER_PORT:-29500}
# DeepSpeed's CPU all-reduce leaves a shared-memory file per rank and launch: the ranks remove
# theirs; a killed launch's are removed on exit (this launch's uid, address, port and ranks only)
trap 'python -m vrgd_ds.deepspeed.launching clean-shm "$MASTER_PORT" --addr 127.0.0.1 --ranks "${NGPUS:-2}" \
  2>/dev/null || true' EXIT
# a build lock left by a killed launch, or a hung build, fails here with its path, not silently in the ranks
python -m vrgd_ds.deepspeed.launching prepare-shm-op
deepspeed --num_gpus "${NGPUS:-2}" --master_port "$MASTER_PORT" "$ROOT/pretrain_bert/squad/run.py" "$@"
