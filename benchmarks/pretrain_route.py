"""The pretraining route a user takes, end to end, on this machine's accelerator.

    python -m benchmarks.pretrain_route [--precision bf16] [--ranks N] [--squad] [--timeout S] [--out results/pretrain_route]

Prepares phase-1 and phase-2 data from the shipped corpus, writes the tiny BERT's VRLAMB
configs with the chosen precision (the global batch of ``configs/bert_tiny_*``, the
accumulation left to DeepSpeed), and runs ``launch/pretrain_bert.sh`` with ``NGPUS`` local
ranks and phase 1's optimizer state carried into phase 2: the same script, launcher and
files a user's run goes through. Then it checks what the user gets:

- both phases exit 0 with the steps asked for and finite losses;
- each phase's ``hf/`` folder holds exactly the fp32 master weights of its last complete
  checkpoint (consolidated from the ZeRO shards), not the bf16/fp16 copies;
- the loss plot is written;
- with ``--squad``, the next step of the route: ``launch/run_squad.sh`` fine-tunes phase 2's
  ``hf/`` export on the same ranks (64 training questions of the shipped subset, one epoch)
  and scores 40 dev questions with the official metric; it must exit 0 with every question
  answered and finite scores. The scores of a model pretrained for a few steps mean nothing;
  this checks that the files, launcher and devices fit together.

On CUDA it runs 1 rank by default (NCCL), on the CPU 2 (gloo). Writes
``pretrain_route_<precision>.json`` and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRECISION = {"fp32": {}, "bf16": {"bf16": {"enabled": True}},
             "fp16": {"fp16": {"enabled": True, "initial_scale_power": 8}}}


def write_configs(prefix: Path, precision: str, stage: int) -> None:
    for phase in (1, 2):
        cfg = json.loads((ROOT / "configs" / f"bert_tiny_phase{phase}_vrlamb.json").read_text())
        cfg.pop("gradient_accumulation_steps", None)  # DeepSpeed derives it from the rank count
        cfg.update(json.loads(json.dumps(PRECISION[precision])))
        cfg["zero_optimization"]["stage"] = stage
        cfg["pretraining"].update(eval_every=2, eval_batches=2, checkpoint_every=2)
        Path(f"{prefix}_phase{phase}_vrlamb.json").write_text(json.dumps(cfg, indent=1))


def prepare_data(work: Path) -> dict[int, Path]:
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    out = {}
    for seq, pred in ((128, 20), (512, 80)):
        cfg = InstanceConfig(seq_len=seq, max_predictions=pred, dupe_factor=2, max_documents=12,
                             heldout_fraction=0.2)
        prepare_pretraining_data([ROOT / "data" / "corpus" / "wikitext-2-valid.txt"],
                                 ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt", work / f"data{seq}", cfg,
                                 progress=False)
        out[seq] = work / f"data{seq}"
    return out


def check_phase(phase_dir: Path, steps: int) -> dict:
    from transformers import BertForPreTraining
    from transformers.utils import logging as hf_logging

    from vrgd_ds.deepspeed.checkpoint import consolidate

    hf_logging.disable_progress_bar()
    records = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    tag = json.loads((phase_dir / "checkpoints" / "complete.json").read_text())["tag"]
    masters = consolidate(phase_dir / "checkpoints" / tag)["weights"]
    exported = BertForPreTraining.from_pretrained(phase_dir / "hf").state_dict()
    mismatched = [n for n, w in masters.items() if not torch.equal(exported[n], w)]
    return {"steps": len(losses), "losses": losses, "checkpoint": tag,
            "hf_is_the_fp32_masters": not mismatched, "mismatched": mismatched[:5],
            "ok": len(losses) == steps and all(math.isfinite(v) for v in losses) and not mismatched}


SQUAD_QUESTIONS = (64, 40)  # fine-tuned on, scored


def launch(what: str, cmd: list[str], env: dict, cwd: Path, log: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a launch script (its own process group) within ``timeout`` seconds; its output goes to
    ``log``. One that runs over is stopped with all its ranks (SIGTERM, then SIGKILL after 10 s)
    and ends this run with a message naming it."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
                stdout, stderr = proc.communicate(timeout=grace)
                break
            except ProcessLookupError:
                stdout, stderr = proc.communicate()
                break
            except subprocess.TimeoutExpired:
                continue
        log.write_text(stdout + "\n---- stderr\n" + stderr)
        raise SystemExit(f"{what} took more than --timeout {timeout:g} s and was stopped with its ranks "
                         f"(output: {log}). If it sat silent, look for a stale 'lock' file in torch's "
                         f"extensions folder.")
    log.write_text(stdout + "\n---- stderr\n" + stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_squad(work: Path, out: Path, precision: str, env: dict, timeout: float) -> dict:
    """``launch/run_squad.sh`` on phase 2's export (same ranks and device); its results."""
    from vrgd_ds.deepspeed.launching import free_port

    squad_dir = work / "squad"
    train, evaluate = SQUAD_QUESTIONS
    cmd = ["bash", str(ROOT / "launch" / "run_squad.sh"), "--init-checkpoint", str(work / "run" / "phase2" / "hf"),
           "--output-dir", str(squad_dir), "--max-train-examples", str(train), "--max-eval-examples", str(evaluate),
           "--epochs", "1", "--no-progress"]
    start = time.perf_counter()
    proc = launch("launch/run_squad.sh", cmd, dict(env, MASTER_PORT=str(free_port())), work,
                  out / f"squad_route_{precision}.log", timeout)
    result = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode == 0:
        res = json.loads((squad_dir / "results.json").read_text())
        result.update({k: res[k] for k in ("f1", "exact_match", "steps", "train_examples", "eval_examples",
                                            "eval_missing", "world_size", "train_loss_last")})
    result["ok"] = (proc.returncode == 0 and (result["train_examples"], result["eval_examples"],
                                              result["eval_missing"]) == (train, evaluate, 0)
                    and all(math.isfinite(result[k]) for k in ("f1", "exact_match", "train_loss_last")))
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=sorted(PRECISION), default="bf16")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=2)
    ap.add_argument("--ranks", type=int, default=None, help="local ranks (default: 1 on CUDA, 2 on the CPU)")
    ap.add_argument("--phase1-steps", type=int, default=4)
    ap.add_argument("--phase2-steps", type=int, default=2)
    ap.add_argument("--squad", action="store_true",
                    help="then fine-tune phase 2's export on SQuAD with launch/run_squad.sh and score it")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds each launch (pretraining, SQuAD) may take")
    ap.add_argument("--out", default="results/pretrain_route")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    ranks = args.ranks or (1 if cuda else 2)
    out = Path(args.out)
    work = out / f"work_{args.precision}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    data = prepare_data(work)
    write_configs(work / "cfg", args.precision, args.stage)
    from vrgd_ds.deepspeed.launching import free_port

    env = dict(os.environ, NGPUS=str(ranks), CARRY_OPTIMIZER_STATE="1", PHASE1_STEPS=str(args.phase1_steps),
               PHASE2_STEPS=str(args.phase2_steps), MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    cmd = ["bash", str(ROOT / "launch" / "pretrain_bert.sh"), str(work / "cfg"), "vrlamb", str(data[128]),
           str(data[512]), str(work / "run"), "--no-progress"]
    proc = launch("launch/pretrain_bert.sh", cmd, env, work, out / f"pretrain_route_{args.precision}.log",
                  args.timeout)
    result = {"precision": args.precision, "stage": args.stage, "ranks": ranks,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode == 0:
        result["phase1"] = check_phase(work / "run" / "phase1", args.phase1_steps)
        result["phase2"] = check_phase(work / "run" / "phase2", args.phase2_steps)
        result["loss_plot"] = (work / "run" / "loss.png").exists()
    result["ok"] = (proc.returncode == 0 and result["phase1"]["ok"] and result["phase2"]["ok"]
                    and result["loss_plot"])
    if args.squad and result["ok"]:
        result["squad"] = run_squad(work, out, args.precision, env, args.timeout)
        result["ok"] = result["squad"]["ok"]
    elif args.squad:
        result["squad_skipped"] = "the pretraining route failed, so there is no phase 2 export to fine-tune"
    (out / f"pretrain_route_{args.precision}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("phase1", "phase2", "squad")}))
    for phase in ("phase1", "phase2"):
        if phase in result:
            r = result[phase]
            print(f"{phase}: {r['steps']} steps, losses {[round(v, 3) for v in r['losses']]}, checkpoint "
                  f"{r['checkpoint']}, hf = fp32 masters: {r['hf_is_the_fp32_masters']}")
    if "squad_skipped" in result:
        print(f"squad: not run: {result['squad_skipped']}")
    if "squad" in result:
        r = result["squad"]
        print(f"squad: exit {r['returncode']}" + (f", {r['steps']} steps on {r['world_size']} ranks, F1 {r['f1']:.2f}, "
                                                   f"EM {r['exact_match']:.2f} on {r['eval_examples']} questions"
                                                   if r["returncode"] == 0 else ""))
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
