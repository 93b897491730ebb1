"""Batch-size schedules at equal samples: fixed small batch, fixed large batch, linear
batch warm-up and the noise-scale-driven ``gns`` schedule, in BERT phase-1 pretraining.

    python -m benchmarks.batch_schedule [--seeds 2] [--epochs 2] [--out results/batch_schedule] [--quick]

Every run is the real pipeline (``deepspeed --num_gpus 2 pretrain_bert/run_pretraining.py``,
VR-LAMB, tiny BERT, the shipped WikiText-2 text) with ``max_samples`` = epochs x training
instances, so all runs see the same samples and the LR schedule runs over samples
(square-root LR scaling from the start batch, docs/algorithm.md section 5). All runs record the
gradient noise scale (``telemetry_interval``), so the curve of the measured critical batch
size over training comes with every run; the ``gns`` run also writes it per layer through
DeepSpeed's CSV monitor.

Reported per schedule (mean over seeds): final held-out MLM loss, optimizer steps, and the
steps and samples at which the run first reaches the small fixed batch's final held-out
loss of the same seed (at evaluation granularity; None if never). JSON + PNGs (held-out
loss vs samples and vs steps; the noise scale and the batch over training; per layer).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.lb_sweep import ROOT, launch

TEMPLATE = ROOT / "configs" / "bert_tiny_phase1_vrlamb.json"


def schedules(small: int, large: int, samples: int) -> dict:
    """name -> (start batch, batch_schedule block)."""
    return {
        f"fixed {small}": (small, None),
        f"fixed {large}": (large, None),
        "linear warm-up": (small, {"type": "linear_warmup", "max": large, "warmup_samples": samples // 2}),
        "gns": (small, {"type": "gns", "max": large, "factor": 1.0, "growth": 2}),
    }


def run_config(start: int, schedule, samples: int, seed: int, ranks: int, micro: int, lr_ref: float,
               small: int, evals: int, csv: Path | None) -> dict:
    cfg = json.loads(TEMPLATE.read_text())
    cfg.update(train_batch_size=start, train_micro_batch_size_per_gpu=micro,
               gradient_accumulation_steps=start // (ranks * micro))
    cfg["optimizer"]["params"].update(lr=lr_ref * (start / small) ** 0.5, telemetry_interval=2)
    cfg["pretraining"].update(max_steps=10**6, max_samples=samples, eval_every=max(1, samples // (small * evals)),
                              checkpoint_every=0, seed=seed, warmup_proportion=0.1, batch_schedule=schedule)
    if csv is not None:
        cfg["csv_monitor"] = {"enabled": True, "output_path": str(csv), "job_name": "gns"}
    return cfg


def summary(run_dir: Path) -> dict:
    from pretrain_bert.plot import read_metrics

    train, evals = read_metrics(run_dir)
    samples_at = {r["step"]: r["samples"] for r in train}
    return {"steps": train[-1]["step"], "samples": train[-1]["samples"],
            "eval_steps": [e["step"] for e in evals], "eval_samples": [samples_at[e["step"]] for e in evals],
            "eval_mlm_loss": [e["eval_mlm_loss"] for e in evals], "final_eval_mlm_loss": evals[-1]["eval_mlm_loss"],
            "batch": [[r["samples"], r["batch"]] for r in train],
            "b_simple_ema": [[r["samples"], r["gns_b_simple_ema"]] for r in train
                             if r.get("gns_b_simple_ema") is not None]}


def reach(run: dict, target: float):
    for step, samples, loss in zip(run["eval_steps"], run["eval_samples"], run["eval_mlm_loss"]):
        if loss <= target:
            return step, samples
    return None, None


def tabulate(runs: dict, names, seeds: int, small_name: str) -> dict:
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return statistics.mean(xs) if xs else None

    table = {}
    for name in names:
        hits = [reach(runs[(name, s)], runs[(small_name, s)]["final_eval_mlm_loss"]) for s in range(seeds)]
        finals = [runs[(name, s)]["final_eval_mlm_loss"] for s in range(seeds)]
        table[name] = {"final_eval_mlm_loss": mean(finals),
                       "std": statistics.stdev(finals) if seeds > 1 else 0.0,
                       "steps": mean([runs[(name, s)]["steps"] for s in range(seeds)]),
                       "steps_to_small_batch_final": [h[0] for h in hits],
                       "samples_to_small_batch_final": [h[1] for h in hits]}
    return table


def plot(runs: dict, names, seeds: int, out: Path, csv_dir: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(names):
        for s in range(seeds):
            r = runs[(name, s)]
            label = name if s == 0 else None
            axes[0].plot(r["eval_samples"], r["eval_mlm_loss"], "o-", ms=3, color=f"C{i}", label=label, alpha=0.8)
            axes[1].plot(r["eval_steps"], r["eval_mlm_loss"], "o-", ms=3, color=f"C{i}", label=label, alpha=0.8)
            if r["b_simple_ema"]:
                axes[2].plot(*zip(*r["b_simple_ema"]), color=f"C{i}", label=f"{name}: B_simple (EMA)" if s == 0
                             else None)
            axes[2].plot(*zip(*r["batch"]), "--", lw=1, color=f"C{i}", label=f"{name}: batch" if s == 0 else None)
    for ax, x in zip(axes, ("samples", "steps", "samples")):
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out MLM loss")
    axes[2].set_ylabel("samples")
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "batch_schedule.png", dpi=110)
    plt.close(fig)
    if csv_dir is not None:
        plot_layers(csv_dir, out)


def plot_layers(csv_dir: Path, out: Path) -> None:
    """The gns run's per-layer B_simple (EMA) from DeepSpeed's CSV monitor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(csv_dir.rglob("VRGD_gns_b_simple_ema_*.csv"))
    if not files:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for f in files:
        rows = [line.split(",") for line in f.read_text().split()[1:]]
        name = f.stem.replace("VRGD_gns_b_simple_ema_", "")
        ax.plot([int(r[0]) for r in rows], [float(r[1]) for r in rows], lw=0.8, label=name)
    ax.set_yscale("symlog")
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple (EMA), per layer")
    ax.legend(fontsize=5, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "batch_schedule_layers.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=64, help="the small fixed batch and the schedules' start")
    ap.add_argument("--large", type=int, default=256, help="the large fixed batch and the schedules' max")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--lr-ref", type=float, default=4e-3, help="LR at the small batch")
    ap.add_argument("--evals", type=int, default=16, help="held-out evaluations per small-batch run")
    ap.add_argument("--data", default=str(ROOT / "runs" / "data" / "wikitext2-valid-128"))
    ap.add_argument("--out", default=str(ROOT / "results" / "batch_schedule"))
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "batch_schedule"))
    ap.add_argument("--quick", action="store_true", help="smoke run: batches 8 and 16, 64 samples, one seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.small, args.large, args.micro, args.seeds, args.evals = 8, 16, 2, 1, 2
    from pretrain_bert.pretraining_dataset import load_meta

    n = load_meta(args.data)["instances"]["train"]
    samples = 64 if args.quick else int(args.epochs * n)
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = schedules(args.small, args.large, samples)
    runs, csv_dir = {}, None
    for name, (start, block) in plan.items():
        for seed in range(args.seeds):
            run_dir = work / f"{name.replace(' ', '_')}-s{seed}"
            csv = work / "csv" if name == "gns" and seed == 0 else None
            csv_dir = csv or csv_dir
            cfg = run_config(start, block, samples, seed, args.ranks, args.micro, args.lr_ref, args.small,
                             args.evals, csv)
            print(f"[batch_schedule] {name} seed {seed}: {samples} samples -> {run_dir}", flush=True)
            launch(cfg, args.data, run_dir, args.ranks)
            runs[(name, seed)] = summary(run_dir)
    small_name = f"fixed {args.small}"
    table = tabulate(runs, list(plan), args.seeds, small_name)
    result = {"setup": {"data": args.data, "samples": samples, "train_instances": n, "seeds": args.seeds,
                        "small": args.small, "large": args.large, "ranks": args.ranks, "lr_ref": args.lr_ref},
              "table": table, "runs": {f"{k[0]} {k[1]}": v for k, v in runs.items()}}
    (out / "batch_schedule.json").write_text(json.dumps(result, indent=1))
    plot(runs, list(plan), args.seeds, out, csv_dir)
    print(json.dumps(table, indent=1))
    return result


if __name__ == "__main__":
    main()
