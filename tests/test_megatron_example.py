"""examples/megatron_vrlamb.py trains on 2 CPU ranks, launched by torchrun as a user would."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ds_helpers import tail

pytest.importorskip("megatron.core")

ROOT = Path(__file__).parents[1]


def test_example_trains_on_two_ranks():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "megatron_example_cpu.py"), "--steps", "12"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, tail(out)
    m = re.search(r"vrlamb: loss ([\d.]+) -> ([\d.]+) in 12 steps \(k = 2 ranks x 4 micro-batches\)", out.stdout)
    assert m, out.stdout[-3000:]
    first, last = float(m.group(1)), float(m.group(2))
    assert last < 0.8 * first, (first, last)
