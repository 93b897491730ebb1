#!/usr/bin/env bash
# BERT pretraining, phase 1 then phase 2, through `deepspeed --hostfile`.
#
#   launch/pretrain_bert.sh CONFIG_PREFIX OPTIMIZER DATA128 DATA512 OUT [extra run_pretraining args]
#
#   CONFIG_PREFIX  configs/bert_tiny, configs/bert_large_64k-32k, ... (the phase files are
#                  ${CONFIG_PREFIX}_phase{1,2}_${OPTIMIZER}.json)
#   OPTIMIZER      vrlamb | lamb
#   DATA128/512    folders from `python -m pretrain_bert.data` (seq 128 / 20 and 512 / 80)
#   OUT            run folder: OUT/phase1, OUT/phase2
#
# Environment: HOSTFILE (default launch/hostfile), MASTER_ADDR (default: first host of the
# hostfile), MASTER_PORT (29500), LAUNCHER (pdsh), CARRY_OPTIMIZER_STATE=1 to carry phase 1's
# optimizer state into phase 2, PHASE1_STEPS / PHASE2_STEPS to override each phase's
# max_steps, RESUME=1 to continue each started phase from its newest complete checkpoint (from
# step 0 if it has none; a finished phase only writes its hf/ again); without it a phase folder
# that already holds a run is refused, untouched. `deepspeed --hostfile` always checks the
# hosts over ssh, localhost included (launch/README.md); NGPUS=N instead starts N local ranks
# without a hostfile or ssh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 5 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PREFIX=$1 OPT=$2 DATA128=$3 DATA512=$4 OUT=$5
shift 5
HOSTFILE=${HOSTFILE:-$ROOT/launch/hostfile}
if [ -z "${NGPUS:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "no hostfile $HOSTFILE (set HOSTFILE, or NGPUS for local ranks)" >&2; exit 2; }
  MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}
fi
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-pdsh}
for f in "${PREFIX}_phase1_${OPT}.json" "${PREFIX}_phase2_${OPT}.json"; do
  [ -f "$f" ] || { echo "no config $f (CONFIG_PREFIX=$PREFIX, OPTIMIZER=$OPT)" >&2; exit 2; }
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# DeepSpeed's CPU all-reduce leaves a shared-memory file per rank and launch: the ranks remove
# theirs; a killed launch's are removed on exit (this launch's uid, address and port only)
trap 'python -m vrgd_ds.deepspeed.launching clean-shm "$MASTER_PORT" --addr "${MASTER_ADDR:-127.0.0.1}" \
  2>/dev/null || true' EXIT
steps() { [ -n "${1:-}" ] && echo --max-steps "$1"; true; }
resume() { [ "${RESUME:-0}" = 1 ] && [ -f "$1/run.json" ] && echo --resume; true; }
run() {
  # a build lock left by a killed launch, or a hung build, fails here with its path, not silently in the ranks
  python -m vrgd_ds.deepspeed.launching prepare-shm-op
  if [ -n "${NGPUS:-}" ]; then
    deepspeed --num_gpus "$NGPUS" --master_port "$MASTER_PORT" "$ROOT/pretrain_bert/run_pretraining.py" "$@"
  else
    deepspeed --hostfile "$HOSTFILE" --launcher "$LAUNCHER" --master_addr "$MASTER_ADDR" \
      --master_port "$MASTER_PORT" "$ROOT/pretrain_bert/run_pretraining.py" "$@"
  fi
}
# shellcheck disable=SC2046
run --config "${PREFIX}_phase1_${OPT}.json" --data "$DATA128" --output-dir "$OUT/phase1" \
  $(steps "${PHASE1_STEPS:-}") $(resume "$OUT/phase1") "$@"
carry=()
[ "${CARRY_OPTIMIZER_STATE:-0}" = 1 ] && carry=(--carry-optimizer-state)
run --config "${PREFIX}_phase2_${OPT}.json" --data "$DATA512" --output-dir "$OUT/phase2" \
  --init-checkpoint "$OUT/phase1/hf" "${carry[@]}" $(steps "${PHASE2_STEPS:-}") $(resume "$OUT/phase2") "$@"
python -m pretrain_bert.plot "$OUT/phase1" "$OUT/phase2" --labels "phase 1" "phase 2" --phases --out "$OUT/loss.png"
