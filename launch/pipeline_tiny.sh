#!/usr/bin/env bash
# The whole pipeline on tiny BERT: prepare data -> pretraining phase 1 (seq 128) -> phase 2
# (seq 512, from phase 1's weights) -> SQuAD v1.1 fine-tune -> official F1/EM, printed and
# written to OUT/pipeline.json. Local ranks (CPU by default), the shipped data by default.
#
#   launch/pipeline_tiny.sh OUT [OPTIMIZER]      OPTIMIZER: vrlamb (default) | lamb
#
# OUT must not exist or be empty. It gets data/ (unless DATA_ROOT is set), phase1/, phase2/
# (phase2/hf is the pretrained model), squad/ (predictions.json, results.json), loss.png and
# pipeline.json. Configs: configs/bert_tiny_phase{1,2}_OPTIMIZER.json, configs/squad_tiny.json.
#
# Environment: NGPUS (local ranks, default 2), DATA_ROOT (reuse DATA_ROOT/seq128 and
# DATA_ROOT/seq512 from launch/prepare_data.sh), PHASE1_STEPS / PHASE2_STEPS (override
# max_steps), SQUAD_ARGS (extra pretrain_bert/squad/run.py arguments, e.g. "--epochs 3
# --lr 3e-4"; default "--lr 3e-4": the tiny model is trained from scratch, not BERT-large).
# For a cluster, run launch/pretrain_bert.sh with a hostfile, then launch/run_squad.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
OUT=$1 OPT=${2:-vrlamb}
case "$OPT" in
  vrlamb|lamb) ;;
  *) echo "OPTIMIZER must be vrlamb or lamb, got '$OPT'" >&2; exit 2 ;;
esac
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "$OUT exists and is not empty; choose another OUT (nothing was changed)" >&2
  exit 2
fi
case "${NGPUS:=2}" in
  ''|*[!0-9]*|0) echo "NGPUS must be a positive integer, got '$NGPUS'" >&2; exit 2 ;;
esac
export NGPUS
if [ -z "${DS_ACCELERATOR:-}" ]; then
  DS_ACCELERATOR="$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
fi
export DS_ACCELERATOR
[ "$DS_ACCELERATOR" = cpu ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
read -r -a squad_args <<< "${SQUAD_ARGS:---lr 3e-4}"
start=$(date +%s)
for d in ${DATA_ROOT:+"$DATA_ROOT/seq128" "$DATA_ROOT/seq512"}; do
  [ -f "$d/meta.json" ] || { echo "DATA_ROOT: $d/meta.json is missing (launch/prepare_data.sh makes it)" >&2; exit 2; }
done
mkdir -p "$OUT"
if [ -n "${DATA_ROOT:-}" ]; then
  DATA=$DATA_ROOT
else
  echo "[pipeline] 1/4 preparing data in $OUT/data"
  bash "$ROOT/launch/prepare_data.sh" "$OUT/data"
  DATA=$OUT/data
fi

echo "[pipeline] 2/4 pretraining ($OPT, $NGPUS ranks): phase 1, then phase 2"
MASTER_PORT=$(python -m vrgd_ds.deepspeed.launching free-port 2>/dev/null | tail -n 1) \
  bash "$ROOT/launch/pretrain_bert.sh" "$ROOT/configs/bert_tiny" "$OPT" "$DATA/seq128" "$DATA/seq512" "$OUT" \
  --no-progress

echo "[pipeline] 3/4 SQuAD v1.1 fine-tuning from $OUT/phase2/hf: ${squad_args[*]}"
MASTER_PORT=$(python -m vrgd_ds.deepspeed.launching free-port 2>/dev/null | tail -n 1) \
  bash "$ROOT/launch/run_squad.sh" --init-checkpoint "$OUT/phase2/hf" --output-dir "$OUT/squad" --no-progress \
  "${squad_args[@]}"

echo "[pipeline] 4/4 summary"
python -m pretrain_bert.pipeline "$OUT" --wall-s "$(( $(date +%s) - start ))"
