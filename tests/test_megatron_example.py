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


def run_example(*args):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "megatron_example_cpu.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, tail(out)
    return out


def last_step(out, step):
    m = re.search(rf"step +{step}  loss ([\d.]+)  grad norm ([\d.]+)", out.stdout)
    assert m, out.stdout[-3000:]
    return m.groups()


def test_example_trains_on_two_ranks():
    out = run_example("--steps", "12")
    m = re.search(r"vrlamb: loss ([\d.]+) -> ([\d.]+) in 12 steps \(k = 2 ranks x 4 micro-batches\)", out.stdout)
    assert m, out.stdout[-3000:]
    first, last = float(m.group(1)), float(m.group(2))
    assert last < 0.8 * first, (first, last)


def test_example_stops_saves_and_resumes_as_if_it_had_not_stopped(tmp_path):
    """--stop-after 5 --save, then --resume: step 11's loss and gradient norm are those of the
    12-step run without a stop (same data, schedule, optimizer state and weights)."""
    whole = run_example("--steps", "12", "--optimizer", "vradam")
    first = run_example("--steps", "12", "--optimizer", "vradam", "--stop-after", "5", "--save", str(tmp_path))
    assert "in 5 steps" in first.stdout
    assert [f.name for f in tmp_path.iterdir()] == ["optimizer.pt"]
    second = run_example("--steps", "12", "--optimizer", "vradam", "--resume", str(tmp_path))
    assert "resumed from" in second.stdout and "at step 5" in second.stdout
    assert last_step(second, 11) == last_step(whole, 11)
