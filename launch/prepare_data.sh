#!/usr/bin/env bash
# Prepare phase-1 (seq 128, 20 predictions) and phase-2 (seq 512, 80 predictions) data.
#
#   launch/prepare_data.sh OUT_ROOT [TEXT_FILES_OR_FOLDERS...]
#
# Default input: the shipped WikiText-2 validation text. Writes OUT_ROOT/seq128 and
# OUT_ROOT/seq512 (static masks, dupe factor 5, seed 12345). VOCAB overrides the vocabulary.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OUT=$1
shift
INPUTS=("$@")
[ ${#INPUTS[@]} -gt 0 ] || INPUTS=("$ROOT/data/corpus/wikitext-2-valid.txt")
VOCAB=${VOCAB:-$ROOT/data/vocab/bert-base-uncased-vocab.txt}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
python -m pretrain_bert.data --input "${INPUTS[@]}" --vocab "$VOCAB" --out "$OUT/seq128" \
  --seq-len 128 --max-predictions 20 --dupe-factor 5 --heldout-fraction 0.1
python -m pretrain_bert.data --input "${INPUTS[@]}" --vocab "$VOCAB" --out "$OUT/seq512" \
  --seq-len 512 --max-predictions 80 --dupe-factor 5 --heldout-fraction 0.1
