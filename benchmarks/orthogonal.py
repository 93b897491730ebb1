"""The paper's Table 5 at CPU scale: is VRGD orthogonal to the base optimizer?

    python -m benchmarks.orthogonal [--seeds 5] [--epochs 30] [--out results/orthogonal] [--quick]

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no
download), a fixed split of 1,437 training and 360 test images. Model: an MLP
64-256-10 with ReLU. Optimizers: Momentum, Adam, LAMB and LARS, and their VR versions
(gamma 0.1; beta3 0.9 for VR-Adam/VR-LAMB as in docs/algorithm.md, 0 for the others), at
global batches 64, 256, 1024 and the full training set. Every batch size trains for the
same number of epochs (so the full batch gets the fewest steps: the large-batch regime).
Each step splits its batch into k = 8 groups (micro-batches); the base optimizers see
the same mean gradient as the VR ones. LR: a reference value per optimizer at batch 64,
square-root scaled to larger batches (paper section 5), 5% linear warm-up, cosine decay
to 0. Reported: test accuracy after the last epoch, mean +- std over the seeds.

The reference LRs are the best of a small grid for each BASE optimizer at batch 64 on seed
0 (Momentum {0.05, 0.2}, Adam {1e-3, 3e-3}, LAMB {5e-3, 2e-2, 5e-2}, LARS {1, 5, 20}); they
are not tuned per batch size, nor for the VR versions, which use the base optimizer's
LR. The paper tunes more. So read the table as "same recipe, with and without VR", not
as each optimizer's best.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from vrgd_ds import LAMB, LARS, MicroStepMoments, VRAdam, VRLAMB, VRLARS, VRMomentum

ROOT = Path(__file__).resolve().parents[1]
K = 8
# name: (make(params, lr, moments), reference lr at batch 64)
OPTIMIZERS = {
    "Momentum": (lambda ps, lr, m: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=5e-4), 0.2),
    "VR-Momentum": (lambda ps, lr, m: VRMomentum(ps, lr=lr, momentum=0.9, weight_decay=5e-4, moments=m), 0.2),
    "Adam": (lambda ps, lr, m: torch.optim.Adam(ps, lr=lr), 3e-3),
    "VR-Adam": (lambda ps, lr, m: VRAdam(ps, lr=lr, moments=m), 3e-3),
    "LAMB": (lambda ps, lr, m: LAMB(ps, lr=lr, weight_decay=0.01), 2e-2),
    "VR-LAMB": (lambda ps, lr, m: VRLAMB(ps, lr=lr, weight_decay=0.01, moments=m), 2e-2),
    "LARS": (lambda ps, lr, m: LARS(ps, lr=lr, momentum=0.9, weight_decay=5e-4, eta=0.001), 5.0),
    "VR-LARS": (lambda ps, lr, m: VRLARS(ps, lr=lr, momentum=0.9, weight_decay=5e-4, eta=0.001, moments=m), 5.0),
}
PAIRS = [("Momentum", "VR-Momentum"), ("Adam", "VR-Adam"), ("LAMB", "VR-LAMB"), ("LARS", "VR-LARS")]


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1437], perm[1437:]
    return (x[train], y[train]), (x[test], y[test])


def run(name, batch, seed, epochs, data):
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    make, lr_ref = OPTIMIZERS[name]
    lr = lr_ref * math.sqrt(batch / 64)
    moments = MicroStepMoments(model.parameters()) if name.startswith("VR-") else None
    opt = make(list(model.parameters()), lr, moments)
    per_epoch = len(xtr) // batch
    total = per_epoch * epochs
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            for chunk in idx.chunk(K):
                loss = torch.nn.functional.cross_entropy(model(xtr[chunk]), ytr[chunk]) / K
                loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
        train_loss = torch.nn.functional.cross_entropy(model(xtr), ytr).item()
    return {"test_acc": 100 * acc, "train_loss": train_loss, "steps": total, "lr": lr}


def table(summary, batches) -> str:
    head = "| optimizer | " + " | ".join(f"batch {b}" for b in batches) + " |"
    lines = [head, "|---" * (len(batches) + 1) + "|"]
    for name in OPTIMIZERS:
        cells = [f"{summary[name][str(b)]['mean']:.2f} +- {summary[name][str(b)]['std']:.2f}" for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary, batches, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PAIRS), figsize=(13, 3.4), sharey=True)
    for ax, pair in zip(axes, PAIRS):
        for name, style in zip(pair, ("o--", "s-")):
            m = [summary[name][str(b)]["mean"] for b in batches]
            s = [summary[name][str(b)]["std"] for b in batches]
            ax.errorbar(batches, m, yerr=s, fmt=style, capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle("digits, MLP, same epochs per batch, k = 8 groups (mean +- std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 1437])
    ap.add_argument("--out", default=str(ROOT / "results" / "orthogonal"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2 epochs, 2 batch sizes")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.batches = 2, 2, [256, 1437]
    torch.set_num_threads(1)
    data = digits()
    t0 = time.time()
    runs, summary = {}, {}
    for name in OPTIMIZERS:
        summary[name] = {}
        for b in args.batches:
            res = [run(name, b, seed, args.epochs, data) for seed in range(args.seeds)]
            runs[f"{name} {b}"] = res
            accs = [r["test_acc"] for r in res]
            summary[name][str(b)] = {"mean": statistics.mean(accs),
                                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                                     "steps": res[0]["steps"], "lr": res[0]["lr"]}
            print(f"{name:12s} batch {b:5d}: {summary[name][str(b)]['mean']:6.2f} +- "
                  f"{summary[name][str(b)]['std']:.2f} ({res[0]['steps']} steps)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"setup": {"data": "sklearn digits, 1437 train / 360 test", "model": "MLP 64-256-10",
                        "k": K, "epochs": args.epochs, "seeds": args.seeds, "batches": args.batches,
                        "lr_ref_batch": 64, "lr_ref": {n: OPTIMIZERS[n][1] for n in OPTIMIZERS},
                        "torch": torch.__version__, "machine": platform.machine(),
                        "wall_s": round(time.time() - t0, 1)},
              "summary": summary, "runs": runs}
    (out / "orthogonal.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table(summary, args.batches))
    plot(summary, args.batches, out / "orthogonal.png")
    print(table(summary, args.batches))
    return result


if __name__ == "__main__":
    main()
