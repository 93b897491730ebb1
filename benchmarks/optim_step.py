"""Optimizer step time on a BERT-base-sized parameter set (about 110M parameters).

    python -m benchmarks.optim_step [--steps 10] [--out results/optim_step] [--device cuda [--passes]] [--model large]

Optimizers are stepped round-robin, so every timing sample of every optimizer sees the
same machine load; the JSON has the median per optimizer and the ratios the README quotes,
the PNG the medians. Parameters are fp32 in the real BERT-base shapes.

- Base optimizers (LAMB, torch's AdamW, torch-optimizer's Lamb) share one set of
  parameters and gradients; the gradients are separate tensors, as autograd makes them
  (vrgd_ds gathers them into its flat buffer every step).
- "VRLAMB" and "VRAdamW" are what a single-process user gets: each has its own copy of the
  parameters and a real ``MicroStepMoments``; before each timed step, 8 real backward passes
  (micro-step i's gradient is c + s_i d for fixed tensors c, d, so the GSNR varies per
  element) run through its hooks, which after the first step write the squares, and copy
  the gradient autograd creates, into the optimizer's flat buffers. "... gathered" rows time the same
  optimizer after backward passes with ``flat_grads=False``: the gradients are then separate
  tensors that the step gathers (what DDP and DeepSpeed stage 0 give). The backward passes
  are timed too ("backward placed" / "backward gathered", 8 micro-steps): the difference is
  what handing the gradient over moves into the backward pass.
- "LAMB backward" is plain LAMB as a training process gets it: its own parameters, the same
  8 backward passes (no moment source, no squares), and from its second step on the gradient
  handed over by the optimizer itself (``flat_grads``); "LAMB backward gathered" the same
  with ``opt.flat_grads = False``, and "backward LAMB placed" / "... gathered" their backward
  passes. Issue 14's targets against "default LAMB" (VRLAMB / LAMB, torch-optimizer Lamb /
  LAMB) are taken against this row (the "LAMB" row, on the shared gradients, gathers them
  every step, as on routes where something re-points ``p.grad``); "... incl. backward cost"
  charges any backward time the hand-over adds to LAMB's step. With ``--no-backward`` they
  are on the "LAMB" row.
- ``--host`` keeps every tensor (199 for BERT-base) but makes each a few hundred elements,
  with our kernels compiled as large buffers are by default: the memory traffic is gone, and
  what is timed is the host's work per step (Python, per-call dispatch, the compiled
  kernels' guards), which a GPU step waits for when it is host-bound (results/gpu/README.md).
  Its ratios carry no targets.
- "partition" rows step what a ZeRO-1/2 rank steps: one flat fp32 parameter and gradient
  holding pieces of every layer (one rank here, so the layer sums need no communication),
  with a fixed squared-gradient buffer (k = 8) laid out flat like the moment sources', which
  the step may overwrite once read, as DeepSpeed's ZeRO moment source lets it (LAMB keeps u
  there; the squares are put back before each step, untimed). "VRLAMB partition telemetry"
  records its telemetry (noise scale, clamped fractions) on every step: what a record costs.
- On the CPU every step of ours is also taken apart (:func:`vrgd_ds.optim.flat.record_passes`):
  the time of each flat pass and each gather into a flat buffer, the full-size arrays it
  streams (an array read and written back in place counts once), and its time per array
  (scaled to all of the model's elements), next to fused AdamW's (one pass over p, g, m, v: 4 arrays). A memory-bound pass
  costs about its number of arrays times a machine's cost per array, so an optimizer's
  ``arrays`` over fused AdamW's 4 is its step's ratio to fused AdamW where every pass streams
  an array as fast as fused AdamW does (results/README.md, session 12). The JSON records the
  CPU's model and cache sizes: the cost per array, and how it varies between passes, is the
  machine's. On CUDA, ``--passes`` does the same in ``--steps`` extra rounds after the timed
  ones, each pass timed between two waits for the device (``record_passes(sync=True)``): does
  a GPU pass also cost by arrays, or by values read and written (``reads``, ``writes``)?
- ``--keep-freed-memory`` tells glibc's malloc to keep freed memory in the process (no mmap,
  no trimming), as a long training process's heap effectively does. torch-optimizer's Lamb
  allocates layer-sized temporaries every step; with glibc's defaults each large one is a
  fresh mmap whose pages fault in on first touch, and in a process without backward passes
  that page-fault time, not the arithmetic, is most of its step (results/README.md). Our
  optimizers and torch's AdamW allocate nothing large per step. The JSON records the
  setting and any ``MALLOC_*`` variables in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vrgd_ds import LAMB, MicroStepMoments, VRAdamW, VRLAMB
from vrgd_ds.optim.flat import record_passes
from vrgd_ds.optim.layout import LayerLayout, Segment


def keep_freed_memory() -> str | None:
    """glibc malloc: never mmap, never give freed heap memory back (``mallopt``); None when
    set, else why not. Call before the tensors are made."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        return f"no glibc mallopt here ({e})"
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        return "mallopt refused M_MMAP_MAX/M_TRIM_THRESHOLD"
    return None


def cpu_info() -> dict:
    """The CPU's model and cache sizes (Linux): ratios of memory-bound steps move with them."""
    info = {"logical_cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
        caches = Path("/sys/devices/system/cpu/cpu0/cache")
        for d in sorted(caches.glob("index*")):
            level, kind = (d / "level").read_text().strip(), (d / "type").read_text().strip()
            info[f"L{level} {kind.lower()}"] = (d / "size").read_text().strip()
    except OSError:
        pass
    return info


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
    """A moment source with fixed squared gradients in one flat buffer: isolates the step.

    ``consumable``: like DeepSpeed's ZeRO moment source, it lets the step overwrite the squares
    once read (LAMB keeps u there); :meth:`refill` puts them back before the next timed step."""

    def __init__(self, params, k=8, consumable=False):
        self.group_count = k
        self.sq_scale = 1.0 / k
        flat = torch.cat([p.grad.float().reshape(-1) for p in params]).square_().mul_(k * 1.5)
        sizes = [p.numel() for p in params]
        self._sq = {p: v.view_as(p) for p, v in zip(params, torch.split(flat, sizes))}
        self.squares_consumable = consumable
        self._flat, self._kept = flat, flat.clone() if consumable else None

    def refill(self) -> None:
        if self._kept is not None:
            self._flat.copy_(self._kept)

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


class MicroBackward:
    """Its own copy of ``params`` with a real MicroStepMoments (``moments=False``: none, for a
    base optimizer), and k real backward passes whose micro-step i has the gradient
    (c + s_i d) / k (c, d: fixed tensors, shared)."""

    def __init__(self, params, c, d, k=8, moments=True):
        self.params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        self.moments = MicroStepMoments(self.params) if moments else None
        self.c, self.d, self.k = c, d, k
        self.scales = [1.0 + (i - (k - 1) / 2) / k for i in range(k)]

    def backward(self) -> None:
        for s in self.scales:
            loss = sum((p * (c + s * d)).sum() for p, c, d in zip(self.params, self.c, self.d)) / self.k
            loss.backward()


def build_optimizers(params, lr=1e-4, eager=False, partition=True, compile=None):
    moments = FixedMoments(params)
    ours = {} if compile is None else {"compile": compile}
    opts = {
        "LAMB": LAMB(params, lr=lr, **ours),
        "AdamW foreach": torch.optim.AdamW(params, lr=lr, foreach=True),
        "AdamW fused": torch.optim.AdamW(params, lr=lr, fused=True),
    }
    if eager:
        opts["VRLAMB eager"] = VRLAMB(params, lr=lr, moments=moments, compile=False)
        opts["LAMB eager"] = LAMB(params, lr=lr, compile=False)
    if partition:
        flat, layout = partition_of(params)
        flat_moments = FixedMoments([flat], consumable=True)  # as ZeroMoments
        opts["VRLAMB partition"] = VRLAMB([flat], lr=lr, moments=flat_moments, **ours)
        opts["LAMB partition"] = LAMB([flat], lr=lr, **ours)
        opts["VRLAMB partition"].layout = opts["LAMB partition"].layout = layout
        # the same with a telemetry record every step (noise scale and clamped fractions)
        opts["VRLAMB partition telemetry"] = VRLAMB([flat], lr=lr, moments=FixedMoments([flat], consumable=True),
                                                    telemetry_interval=1, **ours)
        opts["VRLAMB partition telemetry"].layout = layout
    try:
        import torch_optimizer

        opts["torch-optimizer Lamb"] = torch_optimizer.Lamb(params, lr=lr)
    except ImportError:
        print("torch-optimizer not installed: its Lamb is left out")
    return opts


def build_backward_cases(params, lr=1e-4, k=8, compile=None):
    """VRLAMB, VRAdamW and plain LAMB ("LAMB backward"), each on its own parameters fed by
    real backward passes."""
    ours = {} if compile is None else {"compile": compile}
    c = [p.grad.detach().clone() for p in params]
    d = [torch.randn_like(p) * 1e-3 for p in params]
    cases = {}
    for name, cls in (("VRLAMB", VRLAMB), ("VRAdamW", VRAdamW)):
        case = MicroBackward(params, c, d, k)
        cases[name] = (case, cls(case.params, lr=lr, moments=case.moments, **ours))
    case = MicroBackward(params, c, d, k, moments=False)
    cases["LAMB backward"] = (case, LAMB(case.params, lr=lr, **ours))
    return cases


class PassTimes:
    """Per optimizer and timed step, the flat passes and gathers of its step
    (:func:`vrgd_ds.optim.flat.record_passes`): where the step's time goes, and what each
    array a pass streams costs. On CUDA (``sync``) each pass is timed between two waits for
    the device, in steps of their own: such a step loses its overlap of host and device work,
    so its total is not the timed step's, and no "rest" is derived."""

    def __init__(self, enabled: bool, sync: bool = False):
        self.enabled, self.sync = enabled, sync
        self.steps: dict[str, list[list[dict]]] = {}

    def step(self, name: str, opt, timed: bool) -> None:
        if not self.enabled:
            opt.step()
            return
        with record_passes(sync=self.sync) as log:
            opt.step()
        if timed:
            self.steps.setdefault(name, []).append(log)

    def summary(self, med: dict, params: int) -> dict:
        """Per optimizer: each pass (medians over steps of its per-step total), the time in
        passes, gathers and the rest, and the full-size arrays its passes stream (fused AdamW: 4)."""
        out, bulk = {}, {}  # bulk: per optimizer, its rows over every element (no edges)
        for name, steps in self.steps.items():
            per_key: dict[tuple, list[tuple[float, int]]] = {}  # per pass: (seconds, elements) of each step
            first: dict[tuple, dict] = {}
            for log in steps:
                totals: dict[tuple, list] = {}
                for e in log:
                    key = (e["kind"], e["fn"], tuple(e["flags"]))
                    first.setdefault(key, e)
                    t = totals.setdefault(key, [0.0, 0])
                    t[0] += e["seconds"]
                    t[1] += e["elements"]
                for key, (sec, el) in totals.items():
                    per_key.setdefault(key, []).append((sec, el))
            if not per_key:  # not one of ours (torch's, torch-optimizer's)
                continue
            rows, in_passes, in_gathers, arrays = [], 0.0, 0.0, 0
            for key, vals in per_key.items():
                kind, fn, flags = key
                e, t = first[key], statistics.median(sec for sec, _ in vals)
                elements = max(el for _, el in vals)
                rows.append({"kind": kind, "fn": fn, "flags": list(flags), "elements": elements,
                             "reads": e["reads"], "writes": e["writes"], "arrays": e["arrays"], "ms": t * 1e3,
                             "ms_per_array": t * 1e3 * params / max(1, elements * e["arrays"])})
                if kind == "gather":
                    in_gathers += t
                else:
                    in_passes += t
                if kind != "edge" and elements * 2 > params:  # the bulk: each array once per element
                    arrays += e["arrays"]
                    bulk.setdefault(name, []).append(rows[-1])
            out[name] = {"passes": rows, "passes_ms": in_passes * 1e3, "gathers_ms": in_gathers * 1e3,
                         "rest_ms": (med[name] - in_passes - in_gathers) * 1e3
                         if name in med and not self.sync else None,
                         "arrays": arrays, "arrays_vs_fused_adamw": arrays / 4}
        if "AdamW fused" in med:  # one pass over p, g, m, v
            fused = med["AdamW fused"] * 1e3 / 4
            for name, p in out.items():  # each bulk pass (and gather) against fused AdamW, per array
                for r in bulk.get(name, []):
                    r["per_array_vs_fused_adamw"] = r["ms_per_array"] / fused
                p["worst_per_array_vs_fused_adamw"] = max((r["per_array_vs_fused_adamw"] for r in bulk.get(name, [])),
                                                          default=None)
            out["AdamW fused"] = {"arrays": 4, "ms_per_array": fused}
        return out


def report_passes(passes: dict) -> None:
    if not passes:
        return
    print(f"{'flat passes (median ms per step; ms per array of all elements)':<62}{'arrays':>7}{'ms':>8}"
          f"{'ms/array':>10}")
    fused = passes.get("AdamW fused")
    if fused:
        print(f"{'AdamW fused (its whole step)':<62}{4:>7}{fused['ms_per_array'] * 4:>8.1f}{fused['ms_per_array']:>10.1f}")
    for name, p in passes.items():
        if name == "AdamW fused":
            continue
        for r in p["passes"]:
            label = f"{name}: {r['kind']} {r['fn']}" + (f" {','.join(map(str, r['flags']))}" if r["flags"] else "")
            per_array = "-" if r["kind"] == "edge" else f"{r['ms_per_array']:.1f}"  # a few gathered elements
            print(f"{label[:61]:<62}{r['arrays']:>7}{r['ms']:>8.1f}{per_array:>10}")
        rest = "-" if p["rest_ms"] is None else f"{p['rest_ms']:.1f}"
        worst = p.get("worst_per_array_vs_fused_adamw")
        worst = "" if worst is None else f"; its slowest bulk pass per array: {worst:.2f}x fused AdamW's"
        print(f"  {name}: passes {p['passes_ms']:.1f} ms, gathers {p['gathers_ms']:.1f} ms, rest {rest} ms; "
              f"{p['arrays']} arrays streamed, {p['arrays_vs_fused_adamw']:.2f}x fused AdamW's 4{worst}")


def time_backward_cases(cases, samples, timed, sync, passes: PassTimes | None = None) -> None:
    """One round of the backward rows: placed, then gathered (``flat_grads=False``)."""
    passes = passes or PassTimes(False)
    for name, (case, opt) in cases.items():
        # the VR rows' backward passes also square the gradients: timed apart from plain LAMB's
        kind = "backward LAMB" if case.moments is None else "backward"
        for placed, suffix in ((True, ""), (False, " gathered")):
            if case.moments is not None:
                case.moments.flat_grads = placed
            opt.flat_grads = placed
            sync()
            t0 = time.perf_counter()
            case.backward()
            sync()
            t1 = time.perf_counter()
            passes.step(name + suffix, opt, timed)
            sync()
            t2 = time.perf_counter()
            opt.zero_grad()
            if timed:
                samples.setdefault(f"{kind} {'placed' if placed else 'gathered'}", []).append(t1 - t0)
                samples.setdefault(name + suffix, []).append(t2 - t1)


def refill(opt) -> None:
    """Put a partition row's squares back before its next step (:meth:`FixedMoments.refill`)."""
    getattr(getattr(opt, "moments", None), "refill", lambda: None)()


PAIRS = {"VRLAMB/AdamW fused": ("VRLAMB", "AdamW fused"), "VRAdamW/AdamW fused": ("VRAdamW", "AdamW fused"),
         "VRLAMB/LAMB": ("VRLAMB", "LAMB"), "VRLAMB/LAMB backward": ("VRLAMB", "LAMB backward"),
         "LAMB/AdamW fused": ("LAMB", "AdamW fused"), "LAMB backward/AdamW fused": ("LAMB backward", "AdamW fused"),
         "VRLAMB gathered/AdamW fused": ("VRLAMB gathered", "AdamW fused"),
         "VRAdamW gathered/AdamW fused": ("VRAdamW gathered", "AdamW fused"),
         "VRLAMB gathered/LAMB": ("VRLAMB gathered", "LAMB"),
         "backward placed/backward gathered": ("backward placed", "backward gathered"),
         "torch-optimizer Lamb/LAMB": ("torch-optimizer Lamb", "LAMB"),
         "torch-optimizer Lamb/LAMB backward": ("torch-optimizer Lamb", "LAMB backward"),
         "LAMB backward/LAMB backward gathered": ("LAMB backward", "LAMB backward gathered"),
         "backward LAMB placed/backward LAMB gathered": ("backward LAMB placed", "backward LAMB gathered"),
         "VRLAMB eager/LAMB eager": ("VRLAMB eager", "LAMB eager"),
         "VRLAMB partition/AdamW fused": ("VRLAMB partition", "AdamW fused"),
         "VRLAMB partition/LAMB partition": ("VRLAMB partition", "LAMB partition"),
         "VRLAMB partition telemetry/VRLAMB partition": ("VRLAMB partition telemetry", "VRLAMB partition"),
         "VRLAMB/DeepSpeed FusedLamb": ("VRLAMB", "DeepSpeed FusedLamb"),
         "DeepSpeed FusedLamb/AdamW fused": ("DeepSpeed FusedLamb", "AdamW fused")}
# issue 14; "default LAMB" is the row a training process gets ("LAMB backward": the gradient handed
# over), or without backward passes in the process (--no-backward) the "LAMB" row, which gathers it
TARGETS = {"VRLAMB/AdamW fused": ("max", 2.5), "VRAdamW/AdamW fused": ("max", 2.5),
           "VRLAMB/LAMB backward": ("max", 1.3), "torch-optimizer Lamb/LAMB backward": ("min", 2.5)}
WITHOUT_BACKWARD = {"VRLAMB/LAMB backward": "VRLAMB/LAMB",
                    "torch-optimizer Lamb/LAMB backward": "torch-optimizer Lamb/LAMB"}


def summarise(samples: dict, targets: dict = TARGETS):
    """Medians, minima (the least disturbed sample on a shared machine), their ratios, targets."""
    med = {name: statistics.median(v) for name, v in samples.items()}
    best = {name: min(v) for name, v in samples.items()}
    pairs = {k: v for k, v in PAIRS.items() if v[0] in med and v[1] in med}
    ratios = {k: med[a] / med[b] for k, (a, b) in pairs.items()}
    ratios_of_min = {k: best[a] / best[b] for k, (a, b) in pairs.items()}
    # each round times every row once: the median over rounds of the ratio within a round
    # follows the pair through the machine's changes of pace better than a ratio of medians
    per_round = {k: statistics.median(x / y for x, y in zip(samples[a], samples[b])) for k, (a, b) in pairs.items()}

    def charged(stats, name, kind):
        """The step of ``name`` plus what handing p.grad over added to its backward passes
        (rows "{kind} placed" / "{kind} gathered"): charged, never credited."""
        return stats[name] + max(0.0, stats[f"{kind} placed"] - stats[f"{kind} gathered"])

    if "backward placed" in med and "backward gathered" in med and "AdamW fused" in med:
        for name in ("VRLAMB", "VRAdamW"):
            if name in med:
                key = f"{name} incl. backward cost/AdamW fused"
                ratios[key] = charged(med, name, "backward") / med["AdamW fused"]
                ratios_of_min[key] = charged(best, name, "backward") / best["AdamW fused"]
    if "backward LAMB placed" in med and "torch-optimizer Lamb" in med:  # the same for plain LAMB
        key = "torch-optimizer Lamb/LAMB backward incl. backward cost"
        ratios[key] = med["torch-optimizer Lamb"] / charged(med, "LAMB backward", "backward LAMB")
        ratios_of_min[key] = best["torch-optimizer Lamb"] / charged(best, "LAMB backward", "backward LAMB")
    # no backward passes in the process (--no-backward): the default LAMB gathers p.grad
    targets = {WITHOUT_BACKWARD[k] if k in WITHOUT_BACKWARD and k not in ratios else k: v for k, v in targets.items()}
    targets = {k: v for k, v in targets.items() if k in ratios}
    met = {k: (ratios[k] <= v if kind == "max" else ratios[k] >= v) for k, (kind, v) in targets.items()}
    return med, best, ratios, ratios_of_min, per_round, targets, met


def report(result: dict) -> None:
    med, best, ratios, targets, met = (result[k] for k in ("median_s", "min_s", "ratios", "targets", "target_met"))
    print(f"{'optimizer':<24}{'median ms':>12}{'min ms':>10}")
    for name, t in sorted(med.items(), key=lambda kv: kv[1]):
        print(f"{name:<24}{t * 1e3:>12.1f}{best[name] * 1e3:>10.1f}")
    print(f"{'ratio':<40}{'median':>8}{'min':>8}{'rounds':>8}")
    for name, r in ratios.items():
        goal = f"  target {'<=' if targets[name][0] == 'max' else '>='} {targets[name][1]}: " \
            f"{'met' if met[name] else 'NOT met'}" if name in targets else ""
        rounds = result["ratios_per_round"].get(name)
        print(f"{name:<40}{r:>8.2f}{result['ratios_of_min'][name]:>8.2f}"
              f"{'-' if rounds is None else f'{rounds:.2f}':>8}{goal}")


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
    ap.add_argument("--host", action="store_true",
                    help="host overhead: the same tensors (199 for base) at a few hundred elements each, "
                         "our kernels compiled as large buffers are by default; writes optim_step_host.json")
    ap.add_argument("--no-backward", action="store_true",
                    help="leave out the rows fed by real backward passes (VRLAMB, VRAdamW and their gathered twins)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc malloc keeps freed memory (no mmap, no trim): no page faults when a step "
                         "allocates temporaries, as in a long training process")
    ap.add_argument("--passes", action="store_true",
                    help="CUDA: after the timed steps, --steps more rounds that time each flat pass between two "
                         "waits for the device (on the CPU every timed step is taken apart anyway)")
    args = ap.parse_args(argv)
    if args.passes and not args.device.startswith("cuda"):
        ap.error(f"--passes is for --device cuda (got --device {args.device}): on the CPU the passes of every "
                 "timed step are recorded anyway")

    allocator = {"keep_freed_memory": False,
                 "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}}
    if args.keep_freed_memory:
        why = keep_freed_memory()
        allocator["keep_freed_memory"] = why is None
        if why:
            allocator["not_set"] = why
            print(f"--keep-freed-memory not applied: {why}")
    torch.manual_seed(0)
    layers = max(1, round(12 * args.scale))
    size = {"base": {}, "large": {"hidden": 1024, "inter": 4096}}[args.model]
    layers = layers * (2 if args.model == "large" else 1)
    if args.host:  # every tensor of the model, each tiny: what is left is Python and per-call dispatch
        size = dict(hidden=8, inter=32, positions=16)
    shapes = bert_base_shapes(vocab=max(64, int(30522 * args.scale)) if not args.host else 64, layers=layers, **size)
    params = [torch.nn.Parameter(torch.randn(s, device=args.device) * 0.02) for s in shapes]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {n:,} parameters on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    compile = True if args.host else None  # tiny buffers would run eagerly (flat.COMPILE_MIN)
    opts = build_optimizers(params, eager=args.eager, partition=not args.no_partition, compile=compile)
    cases = {} if args.no_backward else build_backward_cases(params, compile=compile)
    skipped = {}
    if args.fused_lamb:
        opt, why = fused_lamb(params, 1e-4)
        if opt is not None:
            opts["DeepSpeed FusedLamb"] = opt
        else:
            skipped["DeepSpeed FusedLamb"] = why
            print(f"DeepSpeed FusedLamb left out: {why}")
    samples = {name: [] for name in opts}
    passes = PassTimes(args.device == "cpu")
    for i in range(args.warmup + args.steps):
        time_backward_cases(cases, samples, i >= args.warmup, sync, passes)
        for name, opt in opts.items():
            refill(opt)  # untimed
            sync()
            t0 = time.perf_counter()
            passes.step(name, opt, i >= args.warmup)
            sync()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                samples[name].append(dt)
    if args.passes:  # rounds of their own: a synchronised pass would slow the timed step
        passes = PassTimes(True, sync=True)
        for _ in range(args.steps):
            time_backward_cases(cases, {}, True, sync, passes)
            for name, opt in opts.items():
                refill(opt)
                passes.step(name, opt, True)
    med, best, ratios, ratios_of_min, per_round, targets, met = summarise(samples, {} if args.host else TARGETS)
    result = {
        "params": n, "tensors": len(params), "steps": args.steps, "warmup": args.warmup,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "model": args.model, "host_overhead": args.host,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "median_s": med, "min_s": best, "samples_s": samples, "ratios": ratios, "ratios_of_min": ratios_of_min,
        "ratios_per_round": per_round,
        "targets": targets, "target_met": met, "skipped": skipped, "allocator": allocator,
        "cpu": cpu_info(), "passes": passes.summary(med, n), "passes_synchronised": passes.sync,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("optim_step_host" if args.host else "optim_step") + ("_keep_freed" if allocator["keep_freed_memory"] else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")
    report(result)
    report_passes(result["passes"])
    print(f"wrote {out / f'{stem}.json'}")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = sorted(((k, v) for k, v in result["median_s"].items() if not k.startswith("backward")), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(med) + 1.2))
    ax.barh([k for k, _ in med], [v * 1e3 for _, v in med], color="C0")
    ax.invert_yaxis()
    ax.set_xlabel("median step time (ms)")
    what = f"host overhead, {result['tensors']} tiny tensors" if result.get("host_overhead") \
        else f"{result['params'] / 1e6:.1f}M params"
    kept = ", freed memory kept" if result.get("allocator", {}).get("keep_freed_memory") else ""
    ax.set_title(f"optimizer step, {what} ({result['model']}), {result['device']}, {result['threads']} threads{kept}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
