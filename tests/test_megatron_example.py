"""examples/megatron_vrlamb.py trains on 2 CPU ranks, launched by torchrun as a user would."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ds_helpers import tail

pytest.importorskip("megatron.core")

ROOT = Path(__file__).parents[1]


ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")


def example_cmd(*args, ranks=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            str(ROOT / "tests" / "megatron_example_cpu.py"), *map(str, args)]


def run_example(*args, ranks=2):
    out = subprocess.run(example_cmd(*args, ranks=ranks), capture_output=True, text=True, env=ENV, cwd=ROOT,
                         timeout=300)
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


def losses(out) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in re.findall(r"step +(\d+)  loss ([\d.]+)", out.stdout)}


def test_example_with_tensor_parallelism_trains_the_same_model(tmp_path):
    """--tensor-model-parallel-size 2 on 2 ranks (the layers split by Megatron's
    Column/RowParallelLinear, data-parallel size 1) against 1 rank with the whole layers:
    the same losses to fp32 rounding, with the distributed optimizer, and without it but
    with sequence parallelism (fc2's bias gets partial gradients); then a tensor-parallel
    save through Megatron's distributed checkpointing resumes exactly at tensor-parallel size 2,
    and on 1 rank without tensor parallelism continues as the whole-layer run (to fp32 rounding)."""
    run = ["--steps", "12", "--optimizer", "vrlamb", "--micro-batches", "4"]
    whole = losses(run_example(*run, ranks=1))
    split_run = run_example(*run, "--tensor-model-parallel-size", "2")
    split = losses(split_run)
    plain = losses(run_example(*run, "--tensor-model-parallel-size", "2", "--no-distributed-optimizer",
                               "--sequence-parallel"))
    assert sorted(whole) == sorted(split) == sorted(plain) == [0, 10, 11]
    assert whole[11] < 0.9 * whole[0]
    for step, loss in whole.items():
        assert split[step] == pytest.approx(loss, rel=1e-4) and plain[step] == pytest.approx(loss, rel=1e-4)
    tp = ["--tensor-model-parallel-size", "2", "--save", tmp_path, "--dist-checkpoint"]
    run_example(*run, *tp, "--stop-after", "6")
    assert sorted(f.name for f in (tmp_path / "dist").iterdir()) == ["iter_0000006", "latest"]
    resumed = run_example(*run, "--tensor-model-parallel-size", "2", "--resume", tmp_path)
    assert "at step 6" in resumed.stdout
    assert last_step(resumed, 11) == last_step(split_run, 11)  # the unbroken run
    on_one = run_example(*run, "--resume", tmp_path, ranks=1)
    assert "at step 6" in on_one.stdout
    assert losses(on_one)[11] == pytest.approx(whole[11], rel=1e-4)


def test_example_with_pipeline_parallelism_trains_the_same_model(tmp_path):
    """--pipeline-model-parallel-size 2 on 2 ranks (one layer per stage, Megatron's 1F1B
    schedule, data-parallel size 1) against 1 rank with both layers: the same losses to fp32
    rounding; each stage's own optimizer file resumes the pipelined run exactly; a save
    through Megatron's distributed checkpointing resumes on 1 rank without pipeline
    parallelism and continues as the 1-rank run."""
    run = ["--steps", "12", "--optimizer", "vrlamb", "--micro-batches", "4"]
    pp = ["--pipeline-model-parallel-size", "2"]
    whole = losses(run_example(*run, ranks=1))
    piped_run = run_example(*run, *pp)
    piped = losses(piped_run)
    assert sorted(whole) == sorted(piped) == [0, 10, 11] and whole[11] < 0.9 * whole[0]
    for step, loss in whole.items():
        assert piped[step] == pytest.approx(loss, rel=1e-4)
    run_example(*run, *pp, "--save", tmp_path / "own", "--stop-after", "6")
    assert sorted(f.relative_to(tmp_path / "own").as_posix() for f in (tmp_path / "own").rglob("*.pt")) == [
        "pp0/optimizer.pt", "pp1/optimizer.pt"]
    resumed = run_example(*run, *pp, "--resume", tmp_path / "own")
    assert "at step 6" in resumed.stdout
    assert last_step(resumed, 11) == last_step(piped_run, 11)  # the unbroken run
    unpiped = subprocess.run(example_cmd(*run, "--resume", tmp_path / "own", ranks=1), capture_output=True,
                             text=True, env=ENV, cwd=ROOT, timeout=300)
    assert unpiped.returncode != 0
    assert ("it holds one optimizer checkpoint per pipeline stage (pp0, ...), saved with "
            "--pipeline-model-parallel-size 2; resume with it") in unpiped.stdout + unpiped.stderr
    run_example(*run, *pp, "--save", tmp_path / "dist", "--dist-checkpoint", "--stop-after", "6")
    on_one = run_example(*run, "--resume", tmp_path / "dist", ranks=1)
    assert "at step 6" in on_one.stdout
    assert losses(on_one)[11] == pytest.approx(whole[11], rel=1e-4)


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
    other = subprocess.run(example_cmd("--steps", "12", "--optimizer", "vradam", "--micro-batches", "2",
                                       "--resume", tmp_path), capture_output=True, text=True, env=ENV, cwd=ROOT,
                           timeout=300)
    assert other.returncode != 0
    assert "saved with --micro-batches 4, this run has 2; resume with the same value" in other.stdout + other.stderr
    (tmp_path / "optimizer").mkdir()  # a sharded folder beside the file: which one is meant?
    both = subprocess.run(example_cmd("--steps", "12", "--optimizer", "vradam", "--resume", tmp_path),
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert both.returncode != 0
    assert ("expected one checkpoint there, optimizer.pt, the sharded folder optimizer or the distributed "
            "checkpoint folder dist; found 2") in both.stdout + both.stderr
    (tmp_path / "dist").write_text("not a folder")  # a distributed save cannot start: every rank stops, none hangs
    blocked = subprocess.run(example_cmd("--steps", 12, "--stop-after", 2, "--save", tmp_path, "--dist-checkpoint"),
                             capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert blocked.returncode != 0
    assert f"--save: cannot start {tmp_path / 'dist' / 'iter_0000002'}: [Errno 20] Not a directory" in (
        blocked.stdout + blocked.stderr)


FOLDER = {"file": "", "sharded": "optimizer", "dist": "dist"}


def _in_progress(ckpt: Path, fmt: str) -> list[Path]:
    """What a save being written leaves: a temporary file beside optimizer.pt, or (sharded,
    dist) a version / iteration folder that ``latest`` does not name."""
    if fmt == "file":
        return list(ckpt.glob(".optimizer.pt.tmp.*"))
    try:
        latest = (ckpt / FOLDER[fmt] / "latest").read_text().strip()
    except FileNotFoundError:
        return []
    return [d for d in (ckpt / FOLDER[fmt]).glob("v*" if fmt == "sharded" else "iter_*") if d.name != latest]


def _saved_iteration(ckpt: Path, fmt: str) -> int:
    """The complete checkpoint's iteration: every file of it loads (a partial file raises)."""
    if fmt == "file":
        return torch.load(ckpt / "optimizer.pt", weights_only=True)["user_state"]["iteration"]
    if fmt == "dist":
        from megatron.core import dist_checkpointing

        folder = ckpt / "dist" / (ckpt / "dist" / "latest").read_text().strip()
        assert (folder / ".metadata").exists() and list(folder.glob("*.distcp"))
        return dist_checkpointing.load_common_state_dict(str(folder))["run"]["iteration"]
    version = ckpt / "optimizer" / (ckpt / "optimizer" / "latest").read_text().strip()
    shards = sorted(version.glob("shard-*.pt"))
    assert [f.name for f in shards] == ["shard-00000-of-00002.pt", "shard-00001-of-00002.pt"]
    for f in shards:
        torch.load(f, weights_only=True)
    return torch.load(version / "meta.pt", weights_only=True)["user_state"]["iteration"]


@pytest.mark.parametrize("fmt", list(FOLDER))
def test_example_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, fmt):
    """A run saving every step is SIGKILLed (launcher and ranks) while a save is being written:
    the checkpoint is the previous complete one, --resume continues from it, its next save
    removes what the killed save left, and the resumed steps are the uninterrupted run's."""
    ckpt = tmp_path / "ckpt"
    run = ["--steps", 400, "--optimizer", "vrlamb", "--hidden", 65536, "--micro-batches", 2]
    save = ["--save", ckpt, *{"file": [], "sharded": ["--sharded"], "dist": ["--dist-checkpoint"]}[fmt]]
    complete = ckpt / (FOLDER[fmt] or "optimizer.pt") / ("latest" if FOLDER[fmt] else "")
    proc = subprocess.Popen(example_cmd(*run, *save, "--save-every", 1), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = []  # torchrun and its ranks (each rank in a session of its own: one killpg is not enough)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if not job and complete.exists():
                launcher = psutil.Process(proc.pid)
                job = [launcher, *launcher.children(recursive=True)]
            if job and _in_progress(ckpt, fmt):
                for p in job:  # kill -9 of the whole job while a save is being written
                    p.kill()
                break
            time.sleep(0.0005)
    finally:
        for p in job or [psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        proc.wait()
        psutil.wait_procs(job, timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before a save could be caught midway"
    assert _in_progress(ckpt, fmt), "the kill did not land while a save was being written"
    n = _saved_iteration(ckpt, fmt)
    resumed = run_example(*run, "--resume", ckpt, "--stop-after", n + 2, *save)
    assert f"at step {n}" in resumed.stdout
    assert not _in_progress(ckpt, fmt)
    if FOLDER[fmt]:
        assert len(list((ckpt / FOLDER[fmt]).glob("v*" if fmt == "sharded" else "iter_*"))) == 1
    whole = run_example(*run, "--stop-after", n + 2)
    assert last_step(resumed, n + 1) == last_step(whole, n + 1)


@pytest.mark.parametrize("argv, message", [
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size must be >= 1 and divide --hidden (64), got 3"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size >= 2 that divides "
                              "--micro-batch-size (16), got 1"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size", "5"],
     "--sequence-parallel needs --tensor-model-parallel-size >= 2 that divides --micro-batch-size (5), got 2"),
    (["--pipeline-model-parallel-size", "3"], "--pipeline-model-parallel-size must be 1 or 2 (the MLP has 2 "
                                              "layers), got 3"),
    (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"],
     "--pipeline-model-parallel-size 2 with --tensor-model-parallel-size > 1 is not in this example"),
    (["--dist-checkpoint"], "--dist-checkpoint needs --save, and not --sharded"),
    (["--save", "ckpt", "--sharded", "--dist-checkpoint"], "--dist-checkpoint needs --save, and not --sharded"),
])
def test_example_refuses_settings_that_do_not_fit(argv, message, capsys):
    """Refused by the argument parser, before any process group or model is made."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from megatron_vrlamb import parse_args
    finally:
        sys.path.remove(str(ROOT / "examples"))
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
