#!/usr/bin/env bash
# Create or reuse .venv at the repo root with vrgd-ds and its dev and megatron extras installed.
# Sourced by run_demo.sh and run_tests.sh. Without a GPU, torch is pinned to the CPU build
# (an unpinned torch would pull several GB of CUDA packages).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[venv] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.vrgd-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/venv.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q torch
    else
      python -m pip install -q "torch==${VRGD_TORCH_VERSION:-2.13.0}"
    fi
  fi
  python -m pip install -q -e "$ROOT[dev,megatron]"
  echo "$want" > "$stamp"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
