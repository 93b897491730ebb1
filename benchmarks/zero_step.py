"""End-to-end ZeRO-2 training step on a small BERT, 2 CPU ranks: what VR costs in a real step.

    python -m benchmarks.zero_step [--size mini] [--steps 12] [--out results/zero_step] [--stage 2]

One DeepSpeed launch builds seven engines on the same model and data: our plain LAMB
(``NVLAMB``), ``VRLAMB``, ``VRLAMB`` with ``gsnr_interval`` 4, DeepSpeed's own AdamW,
plain LAMB measuring the gradient noise scale (``vrgd_noise_scale``, every step and every
4th step), and a second plain LAMB, identical to the first: its ratio to the first is what
noise alone does to a ratio in that run.
They are stepped round-robin (one full step each, gradient accumulation 2, so k = 4
groups; each round starts one engine later than the last), so every engine's samples see
the same machine load and every position in a round; the JSON keeps the median
step time per engine, the ratios of the medians and the median of the per-round ratios
(engine i-th step over the other's i-th step, which ran next to it), and each engine's
median time in the forward, the backward (DeepSpeed's bucket reductions and the VR squares
run there) and ``engine.step``, and within them in the VR adapter's squares (formed, sent
and added; the measure-only layer sums) and in the inner optimizer's ``step``: the parts
that VR adds to, timed where they run rather than read off the noisy step (their mean per
step: with ``gsnr_interval`` most steps have no squares; the ranks meet in a barrier before
the squares' collectives, so waiting for the slower rank is not counted), and what those
parts add to LAMB's median step. Bytes: every torch.distributed collective is
counted (payload handed in per rank; point-to-point sends too), split into the gradient reduction DeepSpeed does
anyway and the VR adapter's own traffic; plus the bytes the VR adapter keeps per rank.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3
ENGINES = {
    "LAMB": {"type": "NVLAMB", "params": {"lr": LR, "weight_decay": 0.01}},
    "VRLAMB": {"type": "VRLAMB", "params": {"lr": LR, "weight_decay": 0.01, "gamma": 0.1}},
    "VRLAMB interval 4": {"type": "VRLAMB", "params": {"lr": LR, "weight_decay": 0.01, "gamma": 0.1,
                                                       "gsnr_interval": 4}},
    "DeepSpeed AdamW": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
    "LAMB again": {"type": "NVLAMB", "params": {"lr": LR, "weight_decay": 0.01}},
    # measure-only gradient noise scale on plain LAMB (one top-level config key)
    "LAMB + noise scale": {"type": "NVLAMB", "params": {"lr": LR, "weight_decay": 0.01},
                           "vrgd_noise_scale": {"interval": 1}},
    "LAMB + noise scale interval 4": {"type": "NVLAMB", "params": {"lr": LR, "weight_decay": 0.01},
                                      "vrgd_noise_scale": {"interval": 4}},
}

# (name, numerator, denominator); "LAMB again / LAMB" compares two identical engines: how far
# apart noise alone puts two medians in this run
RATIOS = (("VRLAMB / LAMB", "VRLAMB", "LAMB"), ("VRLAMB interval 4 / LAMB", "VRLAMB interval 4", "LAMB"),
          ("LAMB / DeepSpeed AdamW", "LAMB", "DeepSpeed AdamW"),
          ("VRLAMB / DeepSpeed AdamW", "VRLAMB", "DeepSpeed AdamW"),
          ("LAMB + noise scale / LAMB", "LAMB + noise scale", "LAMB"),
          ("LAMB + noise scale interval 4 / LAMB", "LAMB + noise scale interval 4", "LAMB"),
          ("LAMB again / LAMB", "LAMB again", "LAMB"))

# where a step's time goes: the forward, the backward (DeepSpeed's bucket reductions and the
# VR squares run inside it) and engine.step (the optimizer at the boundary); and, inside
# those, the time in the VR adapter's squares (formed, sent and added up; the measure-only
# layer sums) and in the inner optimizer's step
PHASES = ("forward", "backward", "step")
PARTS = ("squares", "optimizer")


class Counter:
    """Payload bytes per rank handed to torch.distributed collectives, by label."""

    def __init__(self):
        self.label, self.bytes = None, {}

    def wrap(self, module, name, which):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            t = args[which] if len(args) > which else next(iter(kwargs.values()))
            if self.label is not None and torch.is_tensor(t):
                self.bytes[self.label] = self.bytes.get(self.label, 0) + t.numel() * t.element_size()
            return fn(*args, **kwargs)

        setattr(module, name, counted)


class Clock:
    """Seconds spent in wrapped calls by part, while the benchmark runs an engine's step."""

    def __init__(self):
        self.on, self.spent = False, dict.fromkeys(PARTS, 0.0)

    def wrap(self, owner, name, part, sync=False):
        """``sync``: a collective every rank calls alike; the ranks meet in a barrier first, so
        the time is the call's own, not the wait for the slower rank (which DeepSpeed's
        reduction, next, would have waited for anyway)."""
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            if sync and self.on:
                torch.distributed.barrier()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.spent[part] += time.perf_counter() - t0

        setattr(owner, name, timed)


def worker(args):
    import deepspeed
    import torch.distributed as dist

    import vrgd_ds  # noqa: F401
    from pretrain_bert.modeling import BertForPreTrainingMasked, bert_config
    from vrgd_ds.deepspeed import seam
    from vrgd_ds.deepspeed.telemetry import vr_optimizer

    from vrgd_ds.deepspeed.stage0_moments import Stage0Moments
    from vrgd_ds.deepspeed.zero_moments import ZeroMoments

    counter, clock = Counter(), Clock()
    for owner, name, sync in ((ZeroMoments, "add_buckets", True), (Stage0Moments, "_square", False),
                              (Stage0Moments, "allreduce_squares", True)):
        clock.wrap(owner, name, "squares", sync)
    for name, which in (("all_reduce", 0), ("reduce", 0), ("broadcast", 0), ("all_gather_into_tensor", 1),
                        ("reduce_scatter_tensor", 1), ("all_gather", 1), ("isend", 0), ("send", 0)):
        counter.wrap(dist, name, which)
    torch.manual_seed(0)
    cfg = bert_config(args.size, vocab_size=args.vocab)
    engines = {}
    for label, spec in ENGINES.items():
        torch.manual_seed(0)
        model = BertForPreTrainingMasked(cfg)
        opt = {k: v for k, v in spec.items() if k != "vrgd_noise_scale"}
        ds = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 2,
              "gradient_clipping": 1.0, "optimizer": opt, "bf16": {"enabled": args.bf16},
              "zero_optimization": {"stage": args.stage, "reduce_bucket_size": args.bucket, "overlap_comm": False}}
        if "vrgd_noise_scale" in spec:
            ds["vrgd_noise_scale"] = spec["vrgd_noise_scale"]
        engines[label], _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        clock.wrap(seam.inner_optimizer(engines[label]), "step", "optimizer")  # this engine's, by instance
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1 + rank)
    B, S, P = args.micro_batch, args.seq, args.seq * 20 // 128

    def micro_batch():
        ids = torch.randint(5, args.vocab, (B, S), generator=gen)
        pos = torch.sort(torch.randint(1, S, (B, P), generator=gen), dim=1).values
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
                "masked_lm_positions": pos, "masked_lm_ids": torch.gather(ids, 1, pos),
                "next_sentence_label": torch.randint(0, 2, (B,), generator=gen)}

    times = {label: [] for label in engines}
    phases = {label: {k: [] for k in PHASES + PARTS} for label in engines}
    step_bytes = {label: [] for label in engines}
    labels = list(engines)
    for step in range(args.warmup + args.steps):
        # each round starts one engine later: no engine always runs first (with a fixed order,
        # LAMB, first in every round, was slower than its identical twin in 5 runs of 6)
        for label in labels[step % len(labels):] + labels[:step % len(labels)]:
            engine = engines[label]
            batches = [micro_batch() for _ in range(2)]
            dist.barrier()
            counter.label, before = label, counter.bytes.get(label, 0)
            t0 = time.perf_counter()
            spent = dict.fromkeys(PHASES, 0.0)
            clock.spent, clock.on = dict.fromkeys(PARTS, 0.0), True
            for b in batches:
                t_a = time.perf_counter()
                loss = engine(**b).loss
                t_b = time.perf_counter()
                engine.backward(loss)
                t_c = time.perf_counter()
                engine.step()
                t_d = time.perf_counter()
                spent["forward"] += t_b - t_a
                spent["backward"] += t_c - t_b
                spent["step"] += t_d - t_c
            elapsed = time.perf_counter() - t0
            counter.label, clock.on = None, False
            spent.update(clock.spent)
            if step >= args.warmup:
                times[label].append(elapsed)
                for k, v in spent.items():
                    phases[label][k].append(v)
                step_bytes[label].append(counter.bytes.get(label, 0) - before)
    result = {}
    for label, engine in engines.items():
        opt = vr_optimizer(engine)
        adapter = seam.adapter_of(engine)
        meter = adapter.meter if adapter is not None else None
        source = opt.moments if opt is not None else meter.moments if meter is not None else None
        vr_sent = 0
        vr_kept = source.extra_bytes() if hasattr(source, "extra_bytes") else 0
        if opt is not None:
            vr_kept += sum(st["gsnr_momentum"].numel() * 4 for st in opt.state.values() if "gsnr_momentum" in st)
        partition = (sum(g.flat.numel() for g in seam.zero_snapshot(seam.zero_optimizer(engine)).groups)
                     if engine.zero_optimization_stage() > 0 else sum(p.numel() for p in engine.module.parameters()))
        result[label] = {"times_s": times[label], "phases_s": phases[label], "bytes_per_step": step_bytes[label],
                         "vr_kept_bytes": vr_kept, "vr_sent_bytes_total": vr_sent, "partition_numel": partition}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def summarise(per_rank, args):
    labels = list(per_rank[0])
    # a step is as slow as its slowest rank
    steps = {l: [max(r[l]["times_s"][i] for r in per_rank) for i in range(len(per_rank[0][l]["times_s"]))]
             for l in labels}
    median = {l: statistics.median(v) for l, v in steps.items()}
    def per_step(l, k):  # the slowest rank's time in phase or part k, step by step
        return [max(r[l]["phases_s"][k][i] for r in per_rank) for i in range(len(steps[l]))]

    phases = {l: {k: statistics.median(per_step(l, k)) for k in PHASES} for l in labels}
    # parts by their mean: with gsnr_interval most steps have none, and the median would hide it
    parts = {l: {k: statistics.mean(per_step(l, k)) for k in PARTS} for l in labels}
    pairs = {name: (a, b) for name, a, b in RATIOS}
    # round-robin: the engines' i-th steps ran back to back, so a ratio of those sees one load
    per_round = {name: statistics.median(x / y for x, y in zip(steps[a], steps[b])) for name, (a, b) in pairs.items()}
    out = {
        "setup": {"model": f"BERT {args.size} (BertForPreTrainingMasked)", "vocab": args.vocab,
                  "micro_batch": args.micro_batch, "seq": args.seq, "gradient_accumulation_steps": 2,
                  "ranks": 2, "zero_stage": args.stage, "bf16": args.bf16, "reduce_bucket_size": args.bucket,
                  "steps": args.steps, "warmup": args.warmup, "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__},
        "median_step_s": median,
        "ratios": {name: median[a] / median[b] for name, (a, b) in pairs.items()},
        "ratios_per_round": per_round,
        "median_phase_s": phases,
        "mean_part_s": parts,
        # what the timed parts add to plain LAMB's step (its squares, and its optimizer step over
        # LAMB's), over LAMB's median step: a lower bound of the added cost that noise in the
        # whole step does not hide
        "parts_added_over_lamb": {l: (parts[l]["squares"] + parts[l]["optimizer"] - parts["LAMB"]["optimizer"])
                                  / median["LAMB"] for l in labels if l not in ("LAMB", "DeepSpeed AdamW")},
        "bytes_per_step_rank0": {l: statistics.mean(per_rank[0][l]["bytes_per_step"]) for l in labels},
        "vr_kept_bytes_per_rank": [r["VRLAMB"]["vr_kept_bytes"] for r in per_rank],
        "partition_numel_per_rank": [r["VRLAMB"]["partition_numel"] for r in per_rank],
        "step_times_s": steps,
    }
    return out


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary["median_step_s"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = [f"C{i}" for i in range(len(labels))]
    a.bar(labels, [summary["median_step_s"][l] for l in labels], color=colors)
    a.set_ylabel("median step time (s)")
    a.set_title("ZeRO-2, 2 CPU ranks, step = 2 micro-batches")
    b.bar(labels, [summary["bytes_per_step_rank0"][l] / 2**20 for l in labels], color=colors)
    b.set_ylabel("MiB handed to collectives per step (rank 0)")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="mini")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--bucket", type=int, default=int(5e6))
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=2, help="zero_optimization.stage")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "zero_step"))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 steps")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.vocab, args.micro_batch, args.seq, args.steps, args.warmup = "tiny", 1000, 2, 32, 2, 1
    if args.worker_out:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "per_rank.json"
    from vrgd_ds.deepspeed.launching import launch_env, run_local

    args_ = ["--worker-out", raw, "--size", args.size, "--vocab", args.vocab, "--micro-batch", args.micro_batch,
             "--seq", args.seq, "--bucket", args.bucket, "--steps", args.steps, "--warmup", args.warmup,
             "--stage", args.stage, *(["--bf16"] if args.bf16 else [])]
    env = launch_env(dict(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"), pythonpath=ROOT)
    proc = run_local(Path(__file__).resolve(), args_, 2, env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = summarise(json.loads(raw.read_text()), args)
    raw.unlink()
    (out / "zero_step.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "zero_step.png")
    for label, t in summary["median_step_s"].items():
        print(f"{label:18s} {t * 1e3:8.1f} ms  {summary['bytes_per_step_rank0'][label] / 2**20:8.2f} MiB/step")
    print(f"{'ms: median phase, mean part':30s} " + " ".join(f"{k:>9s}" for k in PHASES + PARTS))
    for label, ph in summary["median_phase_s"].items():
        ph = {**ph, **summary["mean_part_s"][label]}
        print(f"{label:30s} " + " ".join(f"{ph[k] * 1e3:9.1f}" for k in PHASES + PARTS))
    print("added by the timed parts, over LAMB's step: "
          + ", ".join(f"{k} {v:+.3f}" for k, v in summary["parts_added_over_lamb"].items()))
    print(f"{'ratio':38s} medians  per round")
    for k, v in summary["ratios"].items():
        print(f"{k:38s} {v:7.3f}  {summary['ratios_per_round'][k]:7.3f}")
    return summary


if __name__ == "__main__":
    main()
