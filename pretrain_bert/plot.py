"""Loss curves, or the gradient noise scale, of one or more pretraining runs in one PNG.

    python -m pretrain_bert.plot runs/demo/phase1 runs/lamb/phase1 --out curves.png [--x samples]
    python -m pretrain_bert.plot runs/demo/phase1 runs/demo/phase2 --phases --out loss.png
    python -m pretrain_bert.plot runs/gns/phase1 --what gns --out gns.png

Each run folder holds the ``metrics.jsonl`` that ``run_pretraining.py`` writes; the plot
shows the training loss (thin) and the held-out loss (markers) per run, against steps
or samples. ``--what gns`` shows the measured critical batch size instead (``b_simple``
thin, ``b_simple_ema`` thick; a VR optimizer's telemetry or the ``vrgd_noise_scale`` key
records it) and the global batch each step used (dashed). Labels are the folder names
unless ``--labels`` is given. ``--phases``: the runs are phase 1, phase 2, ... of one
training, drawn on one step (or samples) axis, phase 2 starting where phase 1 ended.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r} has no metrics.jsonl: is it a run_pretraining output folder?")
    train, evals = [], []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        (evals if "eval_loss" in rec else train).append(rec)
    return train, evals


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2))


def _save(fig, ax, out, xlabel: str, ylabel: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot(runs, out, labels=None, x="step", phases=False):
    """Loss curves of ``runs``; ``phases=True``: the runs are consecutive phases of one training
    (phase 1, phase 2, ...), drawn on one axis, each starting where the one before ended, with a
    line at each boundary. Returns the x values drawn per label (train, held-out)."""
    if x not in ("step", "samples"):
        raise ValueError(f"--x must be 'step' or 'samples', got {x!r}")
    labels = labels or [Path(r).name if Path(r).name not in ("phase1", "phase2") else
                        f"{Path(r).parent.name}/{Path(r).name}" for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    fig, ax = _figure()
    offset, drawn = 0, {}
    for i, (run, label) in enumerate(zip(runs, labels)):
        train, evals = read_metrics(run)
        sample_of = {r["step"]: r["samples"] for r in train}
        xs = [offset + r[x] for r in train]
        ex = [offset + (e["step"] if x == "step" else sample_of.get(e["step"], 0)) for e in evals]
        drawn[label] = (xs, ex)
        ax.plot(xs, [r["loss"] for r in train], lw=0.8, color=f"C{i}", label=f"{label} train")
        if evals:
            ax.plot(ex, [e["eval_loss"] for e in evals], "o--", ms=4, color=f"C{i}", label=f"{label} held-out")
        if phases and train:
            offset += train[-1][x]
            if i < len(runs) - 1:
                ax.axvline(offset, color="0.5", lw=0.8, ls=":")
    _save(fig, ax, out, f"{x} (phases one after another)" if phases else x, "loss (MLM + NSP)")
    return drawn


def plot_noise_scale(runs, out, labels=None, x="samples"):
    labels = labels or [Path(r).name for r in runs]
    fig, ax = _figure()
    for i, (run, label) in enumerate(zip(runs, labels)):
        train, _ = read_metrics(run)
        measured = [r for r in train if r.get("gns_b_simple") is not None]
        if not measured:
            raise ValueError(f"{str(run)!r} has no noise-scale records: give the VR optimizer a telemetry_interval "
                             "or add \"vrgd_noise_scale\" to the DeepSpeed config")
        ax.plot([r[x] for r in measured], [r["gns_b_simple"] for r in measured], lw=0.6, alpha=0.5, color=f"C{i}")
        ema = [r for r in measured if r.get("gns_b_simple_ema") is not None]
        ax.plot([r[x] for r in ema], [r["gns_b_simple_ema"] for r in ema], lw=2, color=f"C{i}",
                label=f"{label} B_simple (EMA)")
        ax.plot([r[x] for r in train], [r.get("batch", 0) for r in train], "--", lw=1, color=f"C{i}",
                label=f"{label} global batch")
    ax.set_yscale("log")
    _save(fig, ax, out, x, "samples")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--labels", nargs="+")
    ap.add_argument("--x", default=None, help="step or samples (default: step for loss, samples for gns)")
    ap.add_argument("--what", choices=("loss", "gns"), default="loss")
    ap.add_argument("--phases", action="store_true",
                    help="the runs are consecutive phases of one training: one step axis across them")
    args = ap.parse_args(argv)
    if args.what == "gns":
        plot_noise_scale(args.runs, args.out, args.labels, args.x or "samples")
    else:
        plot(args.runs, args.out, args.labels, args.x or "step", phases=args.phases)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
