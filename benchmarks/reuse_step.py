"""What ``gsnr_interval`` saves in the optimizer step of one ZeRO-1/2 rank.

    python -m benchmarks.reuse_step [--steps 20] [--scale 1.0] [--out results/reuse_step]

One flat fp32 partition holding a piece of every BERT-base layer (``--scale`` shrinks the
model), stepped as a ZeRO-1/2 rank steps it (:mod:`benchmarks.optim_step`'s "partition"
rows: fixed squares, which the step may overwrite and which are put back untimed). Timed
side by side, round-robin, one step each per round:

- "LAMB": plain LAMB on the partition;
- "VRLAMB GSNR step": VRLAMB, a step that computes the GSNR (every step with interval 1);
- "VRLAMB reuse step, own check": with ``gsnr_interval`` 2, the step between two GSNR
  steps (it reuses the kept ratio and reads no squares), where it makes its own non-finite
  check (a layer sum of |gbar|), as at stage 0, in one process, under DDP and Megatron;
- "VRLAMB reuse step, DeepSpeed checked": the same step under ZeRO-1/2, where DeepSpeed's
  forced overflow check has already found any inf/NaN gradient (``grads_checked_finite``).

The interval-2 optimizers take their GSNR step untimed before each timed reuse step. The
JSON has the medians, the ratios and every step's flat passes (their names and times, CPU
only); the PNG the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.optim_step import FixedMoments, bert_base_shapes, partition_of
from vrgd_ds import LAMB, VRLAMB
from vrgd_ds.optim.flat import record_passes

ROWS = ("LAMB", "VRLAMB GSNR step", "VRLAMB reuse step, own check", "VRLAMB reuse step, DeepSpeed checked")


def build(scale: float, device: str, lr: float = 1e-4):
    shapes = bert_base_shapes(vocab=max(64, int(30522 * scale)), layers=max(1, round(12 * scale)))
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    flat, layout = partition_of(params)
    opts = {"LAMB": LAMB([flat], lr=lr)}
    for name, interval, checked in (("VRLAMB GSNR step", 1, False), ("VRLAMB reuse step, own check", 2, False),
                                    ("VRLAMB reuse step, DeepSpeed checked", 2, True)):
        opt = VRLAMB([flat], lr=lr, moments=FixedMoments([flat], consumable=True), gsnr_interval=interval)
        opt.grads_checked_finite = checked
        opts[name] = opt
    for opt in opts.values():
        opt.layout = layout
    return flat, opts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds (compilation happens here)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the model (vocab and layers), e.g. 0.05")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with synchronisation)")
    ap.add_argument("--out", default="results/reuse_step")
    args = ap.parse_args(argv)
    for flag, v in (("--steps", args.steps), ("--warmup", args.warmup)):
        if v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    if not 0.0 < args.scale <= 1.0:
        ap.error(f"--scale must be in (0, 1], got {args.scale}")
    if not (args.device == "cpu" or (args.device.startswith("cuda") and torch.cuda.is_available())):
        ap.error(f"--device must be cpu, or cuda where a CUDA device is present, got {args.device!r}")
    torch.manual_seed(0)
    flat, opts = build(args.scale, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    samples = {name: [] for name in opts}
    passes = {name: [] for name in opts}
    for i in range(args.warmup + args.steps):
        for name, opt in opts.items():
            vr = isinstance(opt, VRLAMB)
            if vr and opt.gsnr_interval > 1:
                opt.moments.refill()
                opt.step()  # the GSNR step, untimed: the timed one below reuses its ratio
            if vr:
                opt.moments.refill()  # the squares a GSNR step overwrote (untimed)
            sync()
            with record_passes() as log:
                t0 = time.perf_counter()
                opt.step()
                sync()
                dt = time.perf_counter() - t0
            if i >= args.warmup:
                samples[name].append(dt)
                passes[name].append([{"fn": e["fn"], "kind": e["kind"], "ms": e["seconds"] * 1e3} for e in log])
    med = {name: statistics.median(v) for name, v in samples.items()}
    ratios = {
        "VRLAMB GSNR step / LAMB": med["VRLAMB GSNR step"] / med["LAMB"],
        "reuse step, own check / LAMB": med["VRLAMB reuse step, own check"] / med["LAMB"],
        "reuse step, DeepSpeed checked / LAMB": med["VRLAMB reuse step, DeepSpeed checked"] / med["LAMB"],
        "reuse step, DeepSpeed checked / own check":
            med["VRLAMB reuse step, DeepSpeed checked"] / med["VRLAMB reuse step, own check"],
    }
    result = {"numel": flat.numel(), "scale": args.scale, "steps": args.steps, "warmup": args.warmup,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "median_s": med, "samples_s": samples, "ratios": ratios,
              "passes_last_step": {name: p[-1] for name, p in passes.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reuse_step.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "reuse_step.png")
    print(f"one flat partition of {flat.numel():,} elements on {result['device']}, {result['threads']} threads")
    for name in ROWS:
        print(f"{name:<40}{med[name] * 1e3:>10.2f} ms")
    for name, r in ratios.items():
        print(f"{name:<44}{r:>8.3f}")
    print(f"wrote {out / 'reuse_step.json'}")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = result["median_s"]
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.barh(list(ROWS), [med[k] * 1e3 for k in ROWS], color=["C7", "C0", "C1", "C2"])
    ax.invert_yaxis()
    ax.set_xlabel("median optimizer step (ms)")
    ax.set_title(f"one ZeRO-1/2 partition, {result['numel'] / 1e6:.1f}M elements, {result['device']}, "
                 f"{result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
