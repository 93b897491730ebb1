"""Optimizer step time on a BERT-base-sized parameter set (about 110M parameters).

    python -m benchmarks.optim_step [--steps 10] [--out results/optim_step] [--device cuda] [--model large]

All optimizers share one set of fp32 parameters and gradients in the real BERT-base
shapes (each keeps its own state) and are stepped round-robin, so every timing sample
of every optimizer sees the same machine load; the JSON has the median per optimizer
and the ratios the README quotes, the PNG the medians. The gradients are separate
tensors, as autograd makes them (vrgd_ds gathers them into its flat buffer every step);
the parameters are ordinary ``nn.Parameter``s, which the first vrgd_ds optimizer views as
one flat buffer at its first step (the others find them flat). The "partition" rows step
what a ZeRO-1/2 rank steps: one flat fp32 parameter and gradient holding pieces of every
layer (one rank here, so the layer sums need no communication). VR optimizers read a fixed
squared-gradient buffer (k = 8) laid out flat like the moment sources', i.e. the cost
measured is the optimizer step alone, not the moment collection.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vrgd_ds import LAMB, VRAdamW, VRLAMB
from vrgd_ds.optim.layout import LayerLayout, Segment


def bert_base_shapes(vocab=30522, hidden=768, layers=12, inter=3072, positions=512, types=2):
    shapes = [(vocab, hidden), (positions, hidden), (types, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _qkvo in range(4):
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,), (inter, hidden), (inter,), (hidden, inter), (hidden,),
                   (hidden,), (hidden,)]
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


class FixedMoments:
    """A moment source with fixed squared gradients in one flat buffer: isolates the step."""

    def __init__(self, params, k=8):
        self.group_count = k
        self.sq_scale = 1.0 / k
        flat = torch.cat([p.grad.float().reshape(-1) for p in params]).square_().mul_(k * 1.5)
        sizes = [p.numel() for p in params]
        self._sq = {p: v.view_as(p) for p, v in zip(params, torch.split(flat, sizes))}

    def sum_sq(self, p):
        return self._sq[p]

    def reset(self):
        pass


class PartitionLayout(LayerLayout):
    """What a ZeRO-1/2 rank's optimizer sees: one flat partition holding every layer's piece."""

    def __init__(self, sizes):
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._segments = [Segment(o, n, i, n) for i, (o, n) in enumerate(zip(offsets, sizes))]

    def segments(self, param):
        return self._segments


def partition_of(params):
    """One flat fp32 parameter (and gradient) with the same values as ``params``."""
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.cat([p.grad.reshape(-1) for p in params])
    return flat, PartitionLayout([p.numel() for p in params])


def fused_lamb(params, lr):
    """DeepSpeed's FusedLamb (a CUDA op it builds at first use), or why not."""
    try:
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb(params, lr=lr), None
    except Exception as e:  # no nvcc, no ninja, a build error: report and go on
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def build_optimizers(params, lr=1e-4, eager=False, partition=True):
    moments = FixedMoments(params)
    opts = {
        "VRLAMB": VRLAMB(params, lr=lr, moments=moments),
        "LAMB": LAMB(params, lr=lr),
        "VRAdamW": VRAdamW(params, lr=lr, moments=moments),
        "AdamW foreach": torch.optim.AdamW(params, lr=lr, foreach=True),
        "AdamW fused": torch.optim.AdamW(params, lr=lr, fused=True),
    }
    if eager:
        opts["VRLAMB eager"] = VRLAMB(params, lr=lr, moments=moments, compile=False)
        opts["LAMB eager"] = LAMB(params, lr=lr, compile=False)
    if partition:
        flat, layout = partition_of(params)
        flat_moments = FixedMoments([flat])
        opts["VRLAMB partition"] = VRLAMB([flat], lr=lr, moments=flat_moments)
        opts["LAMB partition"] = LAMB([flat], lr=lr)
        opts["VRLAMB partition"].layout = opts["LAMB partition"].layout = layout
    try:
        import torch_optimizer

        opts["torch-optimizer Lamb"] = torch_optimizer.Lamb(params, lr=lr)
    except ImportError:
        print("torch-optimizer not installed: its Lamb is left out")
    return opts


PAIRS = {"VRLAMB/AdamW fused": ("VRLAMB", "AdamW fused"), "VRAdamW/AdamW fused": ("VRAdamW", "AdamW fused"),
         "VRLAMB/LAMB": ("VRLAMB", "LAMB"), "LAMB/AdamW fused": ("LAMB", "AdamW fused"),
         "torch-optimizer Lamb/LAMB": ("torch-optimizer Lamb", "LAMB"),
         "VRLAMB eager/LAMB eager": ("VRLAMB eager", "LAMB eager"),
         "VRLAMB partition/AdamW fused": ("VRLAMB partition", "AdamW fused"),
         "VRLAMB partition/LAMB partition": ("VRLAMB partition", "LAMB partition"),
         "VRLAMB/DeepSpeed FusedLamb": ("VRLAMB", "DeepSpeed FusedLamb"),
         "DeepSpeed FusedLamb/AdamW fused": ("DeepSpeed FusedLamb", "AdamW fused")}
TARGETS = {"VRLAMB/AdamW fused": ("max", 2.5), "VRAdamW/AdamW fused": ("max", 2.5),
           "VRLAMB/LAMB": ("max", 1.3), "torch-optimizer Lamb/LAMB": ("min", 2.5)}  # issue 14


def summarise(samples: dict):
    """Medians, minima (the least disturbed sample on a shared machine), their ratios, targets."""
    med = {name: statistics.median(v) for name, v in samples.items()}
    best = {name: min(v) for name, v in samples.items()}
    pairs = {k: v for k, v in PAIRS.items() if v[0] in med and v[1] in med}
    ratios = {k: med[a] / med[b] for k, (a, b) in pairs.items()}
    ratios_of_min = {k: best[a] / best[b] for k, (a, b) in pairs.items()}
    targets = {k: v for k, v in TARGETS.items() if k in ratios}
    met = {k: (ratios[k] <= v if kind == "max" else ratios[k] >= v) for k, (kind, v) in targets.items()}
    return med, best, ratios, ratios_of_min, targets, met


def report(result: dict) -> None:
    med, best, ratios, targets, met = (result[k] for k in ("median_s", "min_s", "ratios", "targets", "target_met"))
    print(f"{'optimizer':<24}{'median ms':>12}{'min ms':>10}")
    for name, t in sorted(med.items(), key=lambda kv: kv[1]):
        print(f"{name:<24}{t * 1e3:>12.1f}{best[name] * 1e3:>10.1f}")
    print(f"{'ratio':<32}{'median':>8}{'min':>8}")
    for name, r in ratios.items():
        goal = f"  target {'<=' if targets[name][0] == 'max' else '>='} {targets[name][1]}: " \
            f"{'met' if met[name] else 'NOT met'}" if name in targets else ""
        print(f"{name:<32}{r:>8.2f}{result['ratios_of_min'][name]:>8.2f}{goal}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shrink the model (vocab and layers) for a smoke run, e.g. 0.05")
    ap.add_argument("--out", default="results/optim_step")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with synchronisation)")
    ap.add_argument("--model", choices=("base", "large"), default="base",
                    help="BERT-base (110M) or BERT-large (340M) shapes")
    ap.add_argument("--eager", action="store_true", help="also time compile=False (the fallback)")
    ap.add_argument("--no-partition", action="store_true", help="leave out the flat-partition rows (memory)")
    ap.add_argument("--fused-lamb", action="store_true", help="also DeepSpeed's FusedLamb (CUDA; builds an op)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    layers = max(1, round(12 * args.scale))
    size = {"base": {}, "large": {"hidden": 1024, "inter": 4096}}[args.model]
    layers = layers * (2 if args.model == "large" else 1)
    shapes = bert_base_shapes(vocab=max(64, int(30522 * args.scale)), layers=layers, **size)
    params = [torch.nn.Parameter(torch.randn(s, device=args.device) * 0.02) for s in shapes]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {n / 1e6:.1f}M parameters on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    opts = build_optimizers(params, eager=args.eager, partition=not args.no_partition)
    skipped = {}
    if args.fused_lamb:
        opt, why = fused_lamb(params, 1e-4)
        if opt is not None:
            opts["DeepSpeed FusedLamb"] = opt
        else:
            skipped["DeepSpeed FusedLamb"] = why
            print(f"DeepSpeed FusedLamb left out: {why}")
    samples = {name: [] for name in opts}
    for i in range(args.warmup + args.steps):
        for name, opt in opts.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                samples[name].append(dt)
    med, best, ratios, ratios_of_min, targets, met = summarise(samples)
    result = {
        "params": n, "tensors": len(params), "steps": args.steps, "warmup": args.warmup,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "model": args.model,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "median_s": med, "min_s": best, "samples_s": samples, "ratios": ratios, "ratios_of_min": ratios_of_min,
        "targets": targets, "target_met": met, "skipped": skipped,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optim_step.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "optim_step.png")
    report(result)
    print(f"wrote {out / 'optim_step.json'}")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = sorted(result["median_s"].items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(med) + 1.2))
    ax.barh([k for k, _ in med], [v * 1e3 for _, v in med], color="C0")
    ax.invert_yaxis()
    ax.set_xlabel("median step time (ms)")
    ax.set_title(f"optimizer step, {result['params'] / 1e6:.1f}M params ({result['model']}), {result['device']}, "
                 f"{result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
