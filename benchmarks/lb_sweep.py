"""Large-batch sweep: LAMB vs VR-LAMB in BERT phase-1 pretraining across global batch sizes.

    python -m benchmarks.lb_sweep [--batches 64 256 1024 2048] [--epochs 2] [--seeds 3]
                                  [--seed-batches 64 1024] [--ranks 2] [--data runs/data/wikitext2-valid-128]
                                  [--out results/lb_sweep] [--fresh] [--quick]

Every run is the real pipeline: ``deepspeed --num_gpus R pretrain_bert/run_pretraining.py``
with a phase-1 config derived from ``configs/bert_tiny_phase1_<opt>.json``: global batch B,
k = ranks x accumulation >= 8 groups, LR square-root scaled from the smallest batch
(``pretrain_bert.schedule.sqrt_scaled_lr``), the same number of epochs at every batch (so
big batches take few steps), held-out evaluation 16 times per run. ``--seeds`` seeds run at the
``--seed-batches`` key points (all batches if not given) and one seed elsewhere. A finished run
whose folder holds the same config is reused, so a sweep can be extended (more seeds, more
batches) without running again what is already there; ``--fresh`` runs everything again. On GPUs, point
``--config-prefix`` at the BERT-large configs (``configs/bert_large_64k-32k``) and ``--data`` at real data: the same
script runs the same comparison at scale.

Reported per (batch, optimizer): final held-out MLM loss (mean +- std over seeds), the
paired per-seed difference VR-LAMB - LAMB (mean +- std), the steps VR-LAMB needs to reach
LAMB's final held-out loss of the same seed (at evaluation granularity; None if it never
does) and the resulting step ratio, the held-out loss half-way through the run, and the
final train - held-out gap. JSON + two PNGs (held-out loss vs
steps per batch; final held-out loss vs batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTS = {"LAMB": "lamb", "VR-LAMB": "vrlamb"}


def run_config(template: Path, batch: int, ranks: int, micro: int, steps: int, lr: float, seed: int) -> dict:
    cfg = json.loads(template.read_text())
    gas = max(1, batch // (ranks * micro))
    if batch != ranks * micro * gas:
        raise ValueError(f"batch {batch} is not ranks {ranks} x micro {micro} x accumulation")
    cfg.update(train_batch_size=batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["pretraining"].update(max_steps=steps, eval_every=max(1, steps // 16), checkpoint_every=0, seed=seed,
                              warmup_proportion=0.1)
    return cfg


def finished(out: Path, cfg: dict, data: str) -> bool:
    """True if ``out`` holds a complete run of exactly this config on this data."""
    from pretrain_bert.plot import read_metrics

    try:
        same = (json.loads((out / "config.json").read_text()) == cfg
                and json.loads((out / "run.json").read_text())["data"] == str(data))
        train, evals = read_metrics(out) if same else ([], [])
    except (OSError, ValueError, KeyError):
        return False
    steps = cfg["pretraining"]["max_steps"]
    return bool(train and evals) and train[-1]["step"] == steps and evals[-1]["step"] == steps


def launch(cfg: dict, data: str, out: Path, ranks: int) -> None:
    import shutil

    from vrgd_ds.deepspeed.launching import launch_env, run_local

    if out.exists():  # an unfinished or different run: start it again from nothing
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    args = ["--config", out / "config.json", "--data", data, "--output-dir", out, "--no-progress"]
    proc = run_local(ROOT / "pretrain_bert" / "run_pretraining.py", args, ranks, launch_env(pythonpath=ROOT),
                     capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run {out} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def curves(run_dir: Path) -> dict:
    from pretrain_bert.plot import read_metrics

    train, evals = read_metrics(run_dir)
    return {"eval_steps": [e["step"] for e in evals], "eval_mlm_loss": [e["eval_mlm_loss"] for e in evals],
            "gap": evals[-1]["generalization_gap"], "final_eval_mlm_loss": evals[-1]["eval_mlm_loss"],
            "final_train_loss": train[-1]["loss"], "steps": train[-1]["step"]}


def steps_to_reach(run: dict, target: float):
    for step, loss in zip(run["eval_steps"], run["eval_mlm_loss"]):
        if loss <= target:
            return step
    return None


def halfway(run: dict) -> float:
    """Held-out loss at the evaluation closest to half the run's steps."""
    i = min(range(len(run["eval_steps"])), key=lambda j: abs(run["eval_steps"][j] - run["steps"] / 2))
    return run["eval_mlm_loss"][i]


def summarise(runs: dict, batches, seeds: dict) -> dict:
    def mean_std(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    table = {}
    for b in batches:
        n = seeds[b]
        row = {"seeds": n}
        for name in OPTS:
            final, std = mean_std([runs[(name, b, s)]["final_eval_mlm_loss"] for s in range(n)])
            gap, gap_std = mean_std([runs[(name, b, s)]["gap"] for s in range(n)])
            half, half_std = mean_std([halfway(runs[(name, b, s)]) for s in range(n)])
            row[name] = {"final_eval_mlm_loss": final, "std": std, "gap": gap, "gap_std": gap_std,
                         "halfway_eval_mlm_loss": half, "halfway_std": half_std, "steps": runs[(name, b, 0)]["steps"]}
        diff, diff_std = mean_std([runs[("VR-LAMB", b, s)]["final_eval_mlm_loss"]
                                   - runs[("LAMB", b, s)]["final_eval_mlm_loss"] for s in range(n)])
        row["vrlamb_minus_lamb"] = {"mean": diff, "std": diff_std}
        reach = [steps_to_reach(runs[("VR-LAMB", b, s)], runs[("LAMB", b, s)]["final_eval_mlm_loss"])
                 for s in range(n)]
        row["vrlamb_steps_to_lamb_final"] = reach
        # LAMB's steps / VR-LAMB's steps to the same loss, per seed; None where VR-LAMB never got there
        row["step_ratio"] = [None if r is None else row["LAMB"]["steps"] / r for r in reach]
        table[str(b)] = row
    return table


def plot(runs, batches, seeds, table, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for i, name in enumerate(OPTS):
            for s in range(seeds[b]):
                r = runs[(name, b, s)]
                ax.plot(r["eval_steps"], r["eval_mlm_loss"], "o-", ms=3, color=f"C{i}",
                        label=name if s == 0 else None, alpha=0.8)
        ax.set_title(f"global batch {b}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out MLM loss")
    fig.tight_layout()
    fig.savefig(out / "lb_sweep_curves.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, name in enumerate(OPTS):
        ax.errorbar(batches, [table[str(b)][name]["final_eval_mlm_loss"] for b in batches],
                    yerr=[table[str(b)][name]["std"] for b in batches], fmt="o-", color=f"C{i}", capsize=3,
                    label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (same epochs)")
    ax.set_ylabel("final held-out MLM loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lb_sweep_final.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 2048])
    ap.add_argument("--seeds", type=int, default=3, help="seeds at the --seed-batches key points")
    ap.add_argument("--seed-batches", type=int, nargs="+", default=None,
                    help="batches that get --seeds seeds (default: all of --batches); the others get one")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro", type=int, default=8, help="micro-batch per rank at the smallest batch")
    ap.add_argument("--lr-ref", type=float, default=4e-3, help="LR at the smallest batch")
    ap.add_argument("--data", default=str(ROOT / "runs" / "data" / "wikitext2-valid-128"))
    ap.add_argument("--config-prefix", default=str(ROOT / "configs" / "bert_tiny"),
                    help="phase-1 templates PREFIX_phase1_lamb.json and PREFIX_phase1_vrlamb.json (batch, "
                    "accumulation, LR, steps and seed are set per run)")
    ap.add_argument("--out", default=str(ROOT / "results" / "lb_sweep"), help="JSON and PNGs")
    ap.add_argument("--work-dir", default=None, help="run folders with checkpoints (default: runs/lb_sweep, "
                    "or OUT/runs with --quick)")
    ap.add_argument("--dry-run", action="store_true", help="print each run's batch, accumulation, steps and LR; "
                    "launch nothing")
    ap.add_argument("--fresh", action="store_true", help="run again even where a finished run is in --work-dir")
    ap.add_argument("--quick", action="store_true", help="smoke run: batches 16 and 32 (two seeds at 32), 4 steps")
    args = ap.parse_args(argv)
    for short in OPTS.values():
        if not Path(f"{args.config_prefix}_phase1_{short}.json").is_file():
            ap.error(f"--config-prefix {args.config_prefix!r}: no {args.config_prefix}_phase1_{short}.json")
    if args.quick:
        args.batches, args.epochs, args.micro, args.seeds, args.seed_batches = [16, 32], None, 2, 2, [32]
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.seed_batches and not set(args.seed_batches) <= set(args.batches):
        ap.error(f"--seed-batches {sorted(set(args.seed_batches) - set(args.batches))} are not in --batches "
                 f"{args.batches}")
    from pretrain_bert.pretraining_dataset import load_meta
    from pretrain_bert.schedule import sqrt_scaled_lr

    meta = load_meta(args.data)
    n = meta["instances"]["train"]
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else (out / "runs" if args.quick else ROOT / "runs" / "lb_sweep")
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    runs = {}
    b0 = min(args.batches)
    seeds = {b: args.seeds if not args.seed_batches or b in args.seed_batches else 1 for b in args.batches}
    for b in args.batches:
        micro = min(args.micro, b // (args.ranks * 4))  # k >= 8 groups with 2 ranks
        steps = 4 if args.quick else max(8, int(args.epochs * n / b))
        for name, short in OPTS.items():
            for seed in range(seeds[b]):
                cfg = run_config(Path(f"{args.config_prefix}_phase1_{short}.json"), b, args.ranks,
                                 micro, steps, sqrt_scaled_lr(args.lr_ref, b0, b), seed)
                run_dir = work / f"b{b}-{short}-s{seed}"
                if args.dry_run:
                    print(f"[lb_sweep] batch {b} {name} seed {seed}: {steps} steps, micro {micro} x accumulation "
                          f"{cfg['gradient_accumulation_steps']} x {args.ranks} ranks, lr "
                          f"{cfg['optimizer']['params']['lr']:.6g}, model {cfg['pretraining']['model']} -> {run_dir}")
                    continue
                if not args.fresh and finished(run_dir, cfg, args.data):
                    print(f"[lb_sweep] batch {b} {name} seed {seed}: reusing {run_dir}", flush=True)
                else:
                    print(f"[lb_sweep] batch {b} {name} seed {seed}: {steps} steps", flush=True)
                    launch(cfg, args.data, run_dir, args.ranks)
                runs[(name, b, seed)] = curves(run_dir)
    if args.dry_run:
        return None
    table = summarise(runs, args.batches, seeds)
    result = {"setup": {"data": args.data, "runs": str(work), "train_instances": n, "epochs": args.epochs, "ranks": args.ranks,
                        "batches": args.batches, "seeds": seeds, "lr_ref": args.lr_ref, "lr_ref_batch": b0},
              "table": table, "runs": {f"{k[0]} {k[1]} {k[2]}": v for k, v in runs.items()}}
    (out / "lb_sweep.json").write_text(json.dumps(result, indent=1))
    plot(runs, args.batches, seeds, table, out)
    print(json.dumps(table, indent=1))
    return result


if __name__ == "__main__":
    main()
