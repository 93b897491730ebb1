"""What compiling the flat kernels costs a user: the first steps of a fresh process.

    python -m benchmarks.first_step [--optimizer VRLAMB] [--steps 3] [--device cuda] [--out results/first_step]

Runs the same short job twice in fresh processes that share one new, empty Inductor cache
(``TORCHINDUCTOR_CACHE_DIR``): "cold" is a first run on a new machine, "warm" every later
run (the cache is on disk). Each process builds the BERT-base parameter set (about 110M
fp32 parameters; ``--scale`` shrinks it), runs k real backward passes through a
``MicroStepMoments`` per step, and times each ``step()``. The first step compiles the
passes of a step that gathers its gradient; the second those of a step whose gradient and
squares the hooks placed in the optimizer's buffers (``benchmarks/optim_step``); later steps
compile nothing. Output: JSON (seconds per step) and PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OPTIMIZERS = ("VRLAMB", "VRAdamW", "LAMB")


def child(args) -> list[float]:
    """One process's job: the step times, in seconds."""
    import vrgd_ds
    from benchmarks.optim_step import MicroBackward, bert_base_shapes

    torch.manual_seed(0)
    layers = max(1, round(12 * args.scale))
    shapes = bert_base_shapes(vocab=max(64, int(30522 * args.scale)), layers=layers)
    params = [torch.nn.Parameter(torch.randn(s, device=args.device) * 0.02) for s in shapes]
    c = [torch.randn_like(p) * 1e-3 for p in params]
    d = [torch.randn_like(p) * 1e-3 for p in params]
    case = MicroBackward(params, c, d, args.k)
    extra = {} if args.optimizer == "LAMB" else {"moments": case.moments}
    opt = getattr(vrgd_ds, args.optimizer)(case.params, lr=1e-4, compile=args.compile, **extra)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(args.steps):
        case.backward()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
        opt.zero_grad()
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="VRLAMB")
    ap.add_argument("--steps", type=int, default=3, help="steps per process (>= 3: the third compiles nothing)")
    ap.add_argument("--k", type=int, default=4, help="micro-batches (backward passes) per step")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the model, e.g. 0.05 for a smoke run")
    ap.add_argument("--compile", choices=("auto", "always"), default="auto",
                    help="auto: the default (compiled for buffers of 256K elements and more); always: compile=True")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with synchronisation)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds each of the two processes may take")
    ap.add_argument("--out", default="results/first_step")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.k < 2:
        ap.error(f"--steps must be >= 1 and --k >= 2, got --steps {args.steps} --k {args.k}")
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        ap.error(f"--device must be cpu, or cuda where a CUDA device is available, got {args.device!r}"
                 f" (CUDA available: {torch.cuda.is_available()})")
    args.compile = None if args.compile == "auto" else True
    if args.child:
        print(json.dumps(child(args)))
        return None

    forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--child"]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="vrgd_inductor_cache_") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for name in ("cold", "warm"):
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.first_step", *forward, "--child"],
                                      env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired as e:
                err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
                raise SystemExit(f"the {name} run took more than --timeout {args.timeout:g} s and was stopped; "
                                 f"a silent compile may be waiting on a lock in the Inductor cache:\n{err[-4000:]}")
            if proc.returncode != 0:
                raise SystemExit(f"the {name} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            runs[name] = {"steps_s": json.loads(proc.stdout.strip().splitlines()[-1]),
                          "process_s": time.perf_counter() - t0}
            print(f"{name}: steps " + ", ".join(f"{t:.2f}" for t in runs[name]["steps_s"])
                  + f" s; whole process {runs[name]['process_s']:.1f} s")
    result = {"optimizer": args.optimizer, "k": args.k, "scale": args.scale,
              "compile": "always" if args.compile else "auto", "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_step.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "first_step.png")
    print(f"wrote {out / 'first_step.json'}")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(result["runs"])
    steps = max(len(r["steps_s"]) for r in result["runs"].values())
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ts = result["runs"][name]["steps_s"]
        ax.bar([s + i * width for s in range(len(ts))], ts, width, label=f"{name} Inductor cache")
    ax.set_xticks([s + width * (len(names) - 1) / 2 for s in range(steps)], [f"step {s + 1}" for s in range(steps)])
    ax.set_ylabel("seconds")
    ax.set_title(f"{result['optimizer']} step time in a fresh process (scale {result['scale']}, "
                 f"{result.get('device', 'cpu')}, {result['threads']} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
