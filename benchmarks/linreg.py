"""The paper's linear-regression experiment (sections 7.2-7.3; ALGORITHM.md section 6).

    python -m benchmarks.linreg [--out results/linreg] [--quick]

True weights W_i = i (i = 1..10), w initialised to 0, labels Y = W.X, MSE loss, 100 steps,
SGD vs VR-SGD (gamma 0.1) at the same learning rate. The paper leaves the input
distribution, batch size, k and lr open; we use:

- X ~ U(0, 1)^10 (uncentred, so features are correlated: the common direction converges
  fast and each w_i then approaches W_i at a speed set by |W_i - mean(W)|, which gives
  the paper's order "w5, w6 first, then w3, w8, finally w1, w10");
- a fresh training batch of 2048 each step, split into k = 32 groups (micro-batches);
  a fixed held-out test set of 8192 samples;
- lr 0.1 for both, and additionally the best lr of each optimizer from a small grid
  (the comparison a user would make);
- 5 seeds, curves averaged.

The main comparison runs the real micro-step path (``MicroStepMoments`` + ``VRSGD``, k
backward passes per step). The gamma/k sweep feeds ``VRSGD`` explicit per-group
gradients through a small moment source (same math, no autograd per group) to keep
thousands of runs fast.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from vrgd_ds import MicroStepMoments, VRSGD
from vrgd_ds import gsnr

D = 10
TRUE_W = torch.arange(1, D + 1, dtype=torch.float32)


def sample(n, gen):
    x = torch.rand(n, D, generator=gen)
    return x, x @ TRUE_W


def mse(w, x, y):
    return ((x @ w - y) ** 2).mean()


class GroupMoments:
    """Moment source from explicit per-group gradients [k, D] (the sweep's fast path)."""

    def __init__(self):
        self.group_count, self.sq_scale, self._sq = 0, 1.0, None

    def set(self, w, group_grads):
        self.group_count = group_grads.shape[0]
        self.sq_scale = 1.0 / self.group_count
        self._sq = (group_grads ** 2).sum(0)
        w.grad = group_grads.mean(0)

    def sum_sq(self, p):
        return self._sq

    def reset(self):
        pass


def group_gradients(w, x, y, k):
    resid = x @ w - y
    return (2.0 * resid[:, None] * x).view(k, -1, D).mean(1)


def run(opt_name, seed, steps, lr, batch, k, gamma=0.1, micro=True, track=False):
    """One training run; returns test-loss curve (and weights / GSNR per step if track)."""
    gen = torch.Generator().manual_seed(seed)
    x_test, y_test = sample(8192, torch.Generator().manual_seed(10_000 + seed))
    w = torch.zeros(D, requires_grad=True)
    vr = opt_name == "vrsgd"
    g_eff = gamma if vr else 1.0  # gamma = 1 is exactly SGD (tested in the optimizer matrix)
    moments = MicroStepMoments([w]) if micro else GroupMoments()
    opt = VRSGD([w], lr=lr, gamma=g_eff, moments=moments)
    curve, weights, ratios = [mse(w.detach(), x_test, y_test).item()], [], []
    for _ in range(steps):
        x, y = sample(batch, gen)
        if micro:
            for xb, yb in zip(x.chunk(k), y.chunk(k)):
                (mse(w, xb, yb) / k).backward()
        else:
            with torch.no_grad():
                moments.set(w, group_gradients(w, x, y, k))
        if track:
            ratios.append(normalised_gsnr(w, moments, gamma))
        opt.step()
        opt.zero_grad()
        curve.append(mse(w.detach(), x_test, y_test).item())
        if track:
            weights.append(w.detach().clone().tolist())
    return curve, weights, ratios


def normalised_gsnr(w, moments, gamma):
    """Per-weight raw GSNR and clamped, normalised r (before momentum), with the package's math."""
    raw = gsnr.raw_gsnr_foreach([w.grad], [moments.sum_sq(w)], moments.sq_scale)[0]
    r = [raw.clone()]
    gsnr.normalise_and_clamp_foreach(r, [raw.mean().item()], gamma)
    return {"raw": raw.tolist(), "r": r[0].tolist()}


def final_or_inf(name, seed, steps, lr, batch, k, gamma=0.1):
    """Final test loss, inf when the run diverged (VR-SGD raises on non-finite gradients)."""
    try:
        loss = run(name, seed, steps, lr, batch, k, gamma=gamma, micro=False)[0][-1]
        return loss if math.isfinite(loss) else math.inf
    except FloatingPointError:
        return math.inf


def steps_to_reach(curve, target):
    for i, v in enumerate(curve):
        if v <= target:
            return i
    return None


def mean_curve(curves):
    return [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]


def geo_mean(values):
    return math.exp(sum(math.log(max(v, 1e-300)) for v in values) / len(values))


def main_comparison(args, out):
    seeds = list(range(args.seeds))
    res = {"setup": dict(steps=args.steps, batch=args.batch, k=args.k, gamma=0.1, lr=args.lr,
                         seeds=seeds, inputs="U(0,1)^10", true_w=TRUE_W.tolist())}
    runs = {name: [run(name, s, args.steps, args.lr, args.batch, args.k, track=True) for s in seeds]
            for name in ("sgd", "vrsgd")}
    curves = {n: [r[0] for r in rs] for n, rs in runs.items()}
    sgd_final = [c[-1] for c in curves["sgd"]]
    per_seed = [steps_to_reach(v, s_final) for v, s_final in zip(curves["vrsgd"], sgd_final)]
    mean_sgd, mean_vr = mean_curve(curves["sgd"]), mean_curve(curves["vrsgd"])
    res.update(
        sgd_final_test_loss=geo_mean(sgd_final),
        vrsgd_final_test_loss=geo_mean([c[-1] for c in curves["vrsgd"]]),
        vrsgd_steps_to_sgd_final=steps_to_reach(mean_vr, mean_sgd[-1]),
        vrsgd_steps_to_sgd_final_per_seed=per_seed,
        sgd_final_test_loss_per_seed=sgd_final,
        vrsgd_final_test_loss_per_seed=[c[-1] for c in curves["vrsgd"]],
        curves={"sgd": mean_sgd, "vrsgd": mean_vr},
    )
    # Each optimizer at its own best lr from a grid (median final loss over seeds).
    grid = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]
    best = {}
    for name in ("sgd", "vrsgd"):
        finals = {lr: sorted(final_or_inf(name, s, args.steps, lr, args.batch, args.k)
                             for s in seeds)[len(seeds) // 2] for lr in grid}
        best[name] = min(finals, key=lambda lr: finals[lr] if math.isfinite(finals[lr]) else math.inf)
        res[f"{name}_lr_grid_final_loss"] = {lr: (v if math.isfinite(v) else "diverged")
                                              for lr, v in finals.items()}
    tuned = {n: mean_curve([run(n, s, args.steps, best[n], args.batch, args.k, micro=False)[0] for s in seeds])
             for n in ("sgd", "vrsgd")}
    res["tuned"] = dict(best_lr=best, sgd_final_test_loss=tuned["sgd"][-1],
                        vrsgd_final_test_loss=tuned["vrsgd"][-1],
                        vrsgd_steps_to_sgd_final=steps_to_reach(tuned["vrsgd"], tuned["sgd"][-1]),
                        curves=tuned)
    plot_main(runs, res, out)
    return res


def sensitivity(args, out, lr):
    seeds = list(range(args.seeds))
    gammas = [0.01, 0.02, 0.04, 0.1, 0.2, 0.4, 0.7, 1.0] if not args.quick else [0.1, 1.0]
    ks = [2, 4, 8, 16, 32, 64, 128, 256, 512] if not args.quick else [4, 16]

    def final(gamma, k):
        return geo_mean([final_or_inf("vrsgd", s, args.steps, lr, 2048, k, gamma)
                         for s in seeds])

    by_gamma = {g: final(g, args.k) for g in gammas}
    by_k = {k: final(0.1, k) for k in ks}
    by_gamma = {g: (v if math.isfinite(v) else "diverged") for g, v in by_gamma.items()}
    by_k = {k: (v if math.isfinite(v) else "diverged") for k, v in by_k.items()}
    res = {"batch": 2048, "lr": lr, "lr_is": "VR-SGD's best lr from the main comparison's grid", "steps": args.steps, "seeds": seeds,
           "k_for_gamma_sweep": args.k, "gamma_for_k_sweep": 0.1,
           "test_loss_by_gamma": by_gamma, "test_loss_by_k": by_k,
           "best_gamma": min(by_gamma, key=lambda g: _finite(by_gamma[g])),
           "best_k": min(by_k, key=lambda k: _finite(by_k[k]))}
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 7))
    a.semilogx(gammas, [_finite(v) for v in by_gamma.values()], "o-")
    a.set(xlabel="gamma", ylabel=f"test loss after {args.steps} steps", yscale="log",
          title=f"VR-SGD sensitivity (batch 2048, k={args.k}, lr={lr}; gaps: diverged)")
    b.semilogx(ks, [_finite(v) for v in by_k.values()], "o-", base=2)
    b.set(xlabel="k (groups)", ylabel="test loss", yscale="log", title="gamma = 0.1")
    fig.tight_layout()
    fig.savefig(out / "linreg_sensitivity.png", dpi=110)
    plt.close(fig)
    return res


def _finite(v):
    return v if isinstance(v, float) and math.isfinite(v) else math.inf


def plot_main(runs, res, out):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("sgd", "-"), ("vrsgd", "--")):
        ax.plot(res["curves"][name], style, label=f"{name.upper()} lr={res['setup']['lr']}")
    for name, style in (("sgd", ":"), ("vrsgd", "-.")):
        ax.plot(res["tuned"]["curves"][name], style,
                label=f"{name.upper()} best lr={res['tuned']['best_lr'][name]}")
    ax.set(yscale="log", xlabel="step", ylabel="test MSE", title="Linear regression: SGD vs VR-SGD")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "linreg_test_loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.tab10.colors
    for name, style in (("sgd", "-"), ("vrsgd", "--")):
        traj = torch.tensor(runs[name][0][1])
        for i in range(D):
            ax.plot(traj[:, i], style, color=colors[i], label=f"w{i + 1}" if name == "sgd" else None)
    ax.set(xlabel="step", ylabel="weight", title="Weights: SGD solid, VR-SGD dashed (seed 0)")
    ax.legend(ncol=5, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "linreg_weights.png", dpi=110)
    plt.close(fig)

    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    ratios = runs["vrsgd"][0][2]
    raw = torch.tensor([r["raw"] for r in ratios])
    norm = torch.tensor([r["r"] for r in ratios])
    for i in range(D):
        a.plot(raw[:, i], color=colors[i], label=f"w{i + 1}")
        b.plot(norm[:, i], color=colors[i])
    a.set(yscale="log", ylabel="raw GSNR", title="VR-SGD per-weight GSNR (seed 0)")
    b.set(xlabel="step", ylabel="normalised, clamped r")
    a.legend(ncol=5, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "linreg_gsnr.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="SGD vs VR-SGD linear regression (paper sec. 7.2-7.3)")
    ap.add_argument("--out", default="results/linreg")
    ap.add_argument("--quick", action="store_true", help="a few steps and seeds (smoke test)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.batch = 10, 1, 256
    for name in ("steps", "batch", "seeds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.k < 2 or args.batch % args.k:
        ap.error(f"--k must be >= 2 and divide --batch ({args.batch}), got {args.k}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = main_comparison(args, out)
    (out / "linreg.json").write_text(json.dumps(res, indent=1))
    sens = sensitivity(args, out, res["tuned"]["best_lr"]["vrsgd"])
    (out / "linreg_sensitivity.json").write_text(json.dumps(sens, indent=1))
    print(f"SGD final test loss {res['sgd_final_test_loss']:.4g}, VR-SGD {res['vrsgd_final_test_loss']:.4g}; "
          f"VR-SGD reaches SGD's final loss at step {res['vrsgd_steps_to_sgd_final']} "
          f"(per seed {res['vrsgd_steps_to_sgd_final_per_seed']})")
    t = res["tuned"]
    print(f"best lr: SGD {t['best_lr']['sgd']} -> {t['sgd_final_test_loss']:.4g}, VR-SGD {t['best_lr']['vrsgd']} "
          f"-> {t['vrsgd_final_test_loss']:.4g}; VR-SGD reaches it at step {t['vrsgd_steps_to_sgd_final']}")
    print(f"sensitivity: best gamma {sens['best_gamma']}, best k {sens['best_k']}; wrote {out}")
    return res, sens


if __name__ == "__main__":
    main()
