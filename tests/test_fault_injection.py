"""SIGKILL at random points of real runs; nothing complete is ever torn, every resume ends on the
uninterrupted run.

Pretraining (2 CPU ranks through the real `deepspeed` launcher, 6 steps, a checkpoint every 2,
an eval every 3, retention keeping 2): a chain of launches on one output folder, each killed
at a point drawn from a seeded generator, then resumed with ``--resume``, until a launch
finishes. A kill is either a named point of pretrain_bert/faults.py on one rank or on all
(mid-step, mid-eval, a torn metrics line, a torn DeepSpeed file, after the files, before the
completion record, mid-retention, mid-consolidation, mid-export of hf/) or a ``kill -9`` of
the whole launch (launcher and ranks) after a random delay. After every kill:

- complete.json lists only checkpoints equal, bitwise, to the uninterrupted run's at the same
  step (weights, every optimizer state tensor, hyperparameters, engine counters, scheduler);
- hf/, where it exists, equals the uninterrupted run's hf/;
- every whole line of metrics.jsonl equals the uninterrupted run's record (timing aside).

At the end metrics.jsonl equals the uninterrupted run's, record for record, and so does hf/.
Data preparation (`python -m pretrain_bert.data`) is killed after random delays; a folder that
looks complete (meta.json) must equal an uninterrupted preparation byte for byte, and the
rerun must produce exactly that. The default run does a short version; ``-m slow`` the long one.
All launches use a private torch extensions folder, so a lock a kill leaves can only stall us.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_helpers import ROOT, local_launch
from pretrain_bert.checkpointing import read_complete
from vrgd_ds.deepspeed import launching

VOCAB = ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt"
CORPUS = ROOT / "data" / "corpus" / "wikitext-2-valid.txt"
STEPS, KEEP, EVERY_CKPT, EVERY_EVAL = 6, 2, 2, 3
RANK0_ONLY = {"metrics", "prune", "consolidated", "hf-written", "hf-swap"}  # the rest happen on both ranks


def config(keep):
    return {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
            "optimizer": {"type": "VRLAMB", "params": {"lr": 4e-3, "weight_decay": 0.01, "gamma": 0.1}},
            "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
            "pretraining": {"phase": 1, "model": "tiny", "seq_len": 128, "max_predictions": 20, "max_steps": STEPS,
                            "warmup_proportion": 0.25, "eval_every": EVERY_EVAL, "eval_batches": 2,
                            "checkpoint_every": EVERY_CKPT,
                            "keep_checkpoints": keep}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, configs and a private torch extensions folder holding the built shm op."""
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    root = tmp_path_factory.mktemp("faults")
    prepare_pretraining_data([CORPUS], VOCAB, root / "data", InstanceConfig(
        dupe_factor=2, max_documents=12, heldout_fraction=0.2))
    shared = launching.shm_op_build_dir({})
    if shared.is_dir():  # a copy of an up-to-date build makes the first load a no-op for ninja
        shutil.copytree(shared, root / "ext" / shared.name, ignore=shutil.ignore_patterns("lock"))
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(root / "ext"))
    env.pop("PRETRAIN_BERT_FAULT", None)
    launching.prepare_shm_op(env=env)
    for name, keep in (("reference.json", 0), ("faulty.json", KEEP)):
        (root / name).write_text(json.dumps(config(keep)))
    return {"root": root, "env": env}


def launch(setup, out, cfg="faulty.json", fault=None, kill_after=None, resume=False, extra_env=None):
    """One launch; returns (exit code, output, whether our timer killed it)."""
    env = dict(setup["env"], **(extra_env or {}))
    if fault:
        env["PRETRAIN_BERT_FAULT"] = fault
    args = ["--config", setup["root"] / cfg, "--data", setup["root"] / "data", "--output-dir", out, "--no-progress",
            *(["--resume"] if resume else [])]
    timed_out = False
    # prepare=False: the set-up built the op; a lock left by a kill is the ranks' guard's to handle
    with local_launch(ROOT / "pretrain_bert" / "run_pretraining.py", args, 2, env, prepare=False) as (cmd, env):
        port = cmd[cmd.index("--master_port") + 1]
        proc = subprocess.Popen(cmd, cwd=setup["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=kill_after or 600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank at once, as kill -9 of the job
            output, _ = proc.communicate()
            timed_out = True
            assert kill_after, f"launch did not finish in 600 s:\n{output[-3000:]}"
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    assert not left, f"the launch's /dev/shm buffers survived the clean-up: {left}"
    return proc.returncode, output, timed_out


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run (every checkpoint kept) and its wall time. It starts with a stale
    build lock in place, as a launch killed while loading the shm op leaves it."""
    out = setup["root"] / "reference"
    lock = Path(setup["env"]["TORCH_EXTENSIONS_DIR"]) / launching.SHM_OP / "lock"
    lock.touch()
    start = time.monotonic()
    rc, output, _ = launch(setup, out, "reference.json")
    seconds = time.monotonic() - start
    assert rc == 0, output[-4000:]
    return {"out": out, "seconds": seconds, "output": output, "lock": lock, "consolidated": {},
            "metrics": {key(r): r for r in metrics(out)}, "hf": hf_weights(out / "hf")}


def key(record):
    return ("eval" if "eval_loss" in record else "train", record["step"])


def metrics(out):
    """Whole lines of metrics.jsonl, without the timing field."""
    path = Path(out) / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # the last piece is "" or torn
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]


def hf_weights(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


def same(a, b, where="") -> list[str]:
    """Differences between two nested structures of tensors and plain values (bitwise)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))[:5]}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [f"{where}: tensors differ"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def check_nothing_torn(out, reference) -> list[str]:
    """What a kill left that an uninterrupted run would not have (empty: nothing lost or torn)."""
    from vrgd_ds.deepspeed.checkpoint import consolidate

    problems = []
    record = read_complete(out / "checkpoints")
    for kept in record["kept"] if record else []:
        if kept["step"] not in reference["consolidated"]:
            reference["consolidated"][kept["step"]] = consolidate(reference["out"] / "checkpoints" / kept["tag"])
        try:
            mine = consolidate(out / "checkpoints" / kept["tag"])
        except Exception as err:  # a torn file that complete.json vouches for
            problems.append(f"{kept['tag']}: {type(err).__name__}: {err}")
            continue
        problems += [f"{kept['tag']}{d}" for d in same(mine, reference["consolidated"][kept["step"]])]
    if record and (len(record["kept"]) > KEEP or record["kept"][-1]["tag"] != record["tag"]):
        problems.append(f"retention: {record}")
    if (out / "hf").exists():
        problems += [f"hf{d}" for d in same(hf_weights(out / "hf"), reference["hf"])]
    for rec in metrics(out):
        if rec != reference["metrics"].get(key(rec)):
            problems.append(f"metrics.jsonl: {rec} != {reference['metrics'].get(key(rec))}")
    return problems


def hits_left(start):
    """How often each named point is reached (per rank) by a launch that resumes at ``start``."""
    steps = STEPS - start
    ckpts = sum(1 for s in range(start + 1, STEPS + 1) if s % EVERY_CKPT == 0 or s == STEPS)
    evals = sum(1 for s in range(start + 1, STEPS + 1) if s % EVERY_EVAL == 0 or s == STEPS)
    hits = {"micro": 2 * steps, "eval": 2 * evals, "metrics": steps + evals, "torch-save": ckpts, "saved": ckpts,
            "before-mark": ckpts, "prune": 3 if start < STEPS else 0,  # step 6 drops step 2: 3 files
            "consolidated": 1, "hf-written": 1, "hf-swap": 1}
    return {point: n for point, n in hits.items() if n}


def draw_fault(rng, seconds, start):
    """A named point the launch will reach, on one rank or all, or a kill -9 after a delay (or,
    half the time once only the export is left, none: the chain ends and a new one starts)."""
    if start == STEPS and rng.random() < 0.5:
        return None, None
    if rng.random() < 0.3:
        return None, rng.uniform(1.0, 0.9 * seconds)
    hits = hits_left(start)
    point = rng.choice(sorted(hits))
    rank = rng.choice(["", ":0"] if point in RANK0_ONLY else ["", ":0", ":1"])
    return f"{point}:{rng.randint(1, hits[point])}{rank}", None


def kill_and_resume(setup, reference, seed, kills, first=()):
    """Chains of launches (``first`` faults, then drawn ones) until ``kills`` kills happened; a
    chain ends when a launch finishes (a drawn delay may outlast a short resume) and is then
    checked whole. Returns (kills by kind, stale locks removed); fails on the first problem."""
    rng, counts, stale, first = random.Random(seed), collections.Counter(), 0, list(first)
    for chain in itertools.count():
        out = setup["root"] / f"chain-{seed}-{chain}"
        while True:
            record = read_complete(out / "checkpoints")
            fault, delay = (None, None) if sum(counts.values()) >= kills else (first.pop(0), None) if first else \
                draw_fault(rng, reference["seconds"], record["step"] if record else 0)
            rc, output, timed_out = launch(setup, out, fault=fault, kill_after=delay,
                                           resume=(out / "run.json").exists())
            stale += output.count("removed stale lock")
            if rc == 0 and not timed_out:
                assert fault is None, f"seed {seed}: {fault} was never reached"
                break
            what = f"kill -9 after {delay:.1f} s" if timed_out else fault
            assert timed_out or "-9" in output, f"seed {seed}, {what}: failed without our kill:\n{output[-4000:]}"
            counts["timer" if timed_out else fault.split(":")[0]] += 1
            problems = check_nothing_torn(out, reference)
            assert not problems, f"seed {seed}, after {what}: {problems[:5]}"
        assert metrics(out) == list(reference["metrics"].values()), f"seed {seed}: the resumed curve differs"
        assert not same(hf_weights(out / "hf"), reference["hf"]) and not check_nothing_torn(out, reference)
        shutil.rmtree(out)
        if sum(counts.values()) >= kills:
            return counts, stale


def report(name, counts, stale):
    total = sum(counts.values())
    print(f"\n[fault-injection] {name}: {total} kills, 0 lost ({dict(sorted(counts.items()))}); "
          f"stale build locks removed by the ranks: {stale}")


def test_a_stale_build_lock_does_not_stall_a_launch(reference):
    """The reference launch started with a lock nobody held: the ranks removed it and went on."""
    assert f"removed stale lock {reference['lock']}" in reference["output"]
    assert not reference["lock"].exists()


def test_a_held_build_lock_fails_naming_it_within_the_bound(setup, tmp_path):
    lock = Path(setup["env"]["TORCH_EXTENSIONS_DIR"]) / launching.SHM_OP / "lock"
    code = ("import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); "
            "print('held', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        rc, output, _ = launch(setup, tmp_path / "run", extra_env={launching.LOCK_TIMEOUT_ENV: "5"})
        seconds = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
        lock.unlink(missing_ok=True)
    assert rc != 0 and seconds < 120, (rc, seconds)
    assert f"{lock}: held by pid {holder.pid}" in output and "giving up" in output, output[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_kills_at_random_points_lose_nothing(setup, reference):
    """Short version: every rank killed after step 4's files are synced and before they are marked
    complete (the resume must redo step 4 from step 2), then one drawn kill."""
    counts, stale = kill_and_resume(setup, reference, seed=20261126, kills=2, first=["before-mark:2"])
    report("pretraining, short", counts, stale)
    assert counts["before-mark"] >= 1 and sum(counts.values()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_many_kills_at_random_points_lose_nothing(setup, reference, seed):
    counts, stale = kill_and_resume(setup, reference, seed=seed, kills=8)
    report(f"pretraining, seed {seed}", counts, stale)
    assert sum(counts.values()) == 8


# ------------------------------------------------------------------ data preparation


def tree_bytes(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def prepare_cli(out):
    cmd = [sys.executable, "-m", "pretrain_bert.data", "--input", str(CORPUS), "--vocab", str(VOCAB), "--out", str(out),
           "--seq-len", "128", "--max-predictions", "20", "--dupe-factor", "2", "--max-documents", "20",
           "--heldout-fraction", "0.2", "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_data_preparation(tmp_path, seed, kills):
    rng, ref = random.Random(seed), tmp_path / "ref"
    start = time.monotonic()
    proc = prepare_cli(ref)
    output, _ = proc.communicate(timeout=300)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, output
    expected, done = tree_bytes(ref), 0
    for trial in range(kills):
        out = tmp_path / f"out{trial}"
        proc = prepare_cli(out)
        time.sleep(rng.uniform(0.3, seconds))
        proc.kill()
        proc.communicate()
        done += proc.returncode == -signal.SIGKILL
        assert not out.exists() or tree_bytes(out) == expected, f"trial {trial}: a torn complete-looking folder"
        if not out.exists():
            proc = prepare_cli(out)
            output, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, output
        assert tree_bytes(out) == expected, f"trial {trial}: the rerun differs"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")] == []  # partials removed
    return done


def test_data_preparation_killed_then_rerun_is_identical(tmp_path):
    kills = kill_data_preparation(tmp_path, seed=7, kills=2)
    print(f"\n[fault-injection] data preparation, short: {kills} kills, 0 lost")


@pytest.mark.slow
def test_data_preparation_killed_many_times_then_rerun_is_identical(tmp_path):
    kills = kill_data_preparation(tmp_path, seed=11, kills=12)
    print(f"\n[fault-injection] data preparation: {kills} kills, 0 lost")
    assert kills >= 8
