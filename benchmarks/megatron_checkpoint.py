"""Megatron optimizer checkpoints: one file, sharded and Megatron's distributed checkpointing,
time and memory per rank.

    python -m benchmarks.megatron_checkpoint [--hidden 1048576] [--repeats 3] [--out results/megatron_checkpoint]

Two gloo CPU ranks (megatron-core on CPU through the tests' CUDA redirection) build
``examples/megatron_vrlamb.py``'s model (an MLP of width ``--hidden``: 41 x hidden
parameters) with VR-LAMB and the distributed optimizer, train one step, then, ``--repeats``
times and in rotating order, save the optimizer as one file, as a sharded folder and through
Megatron's distributed checkpointing (``dist_checkpointing.save`` of the optimizer's
``sharded_state_dict``, torch_dist, into a new folder each time), and load each into a freshly
built model and optimizer. Per rank and call: the wall time and
the peak growth of the process's private resident memory (RSS minus file-backed pages,
so memory-mapped checkpoint pages do not count; sampled every millisecond, minus its value
at the call's start). The loaded state is checked against the saved one.
Output: ``megatron_checkpoint.json`` (every sample, medians) and ``.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).parents[1]
FORMATS = ("one file", "sharded", "dist")
WORLD = 2


def _private(proc) -> int:
    """Resident memory that is not file-backed (Linux: RSS minus shared pages): what a rank's
    memory limit counts. Memory-mapped checkpoint pages are page cache and stay out."""
    info = proc.memory_info()
    return info.rss - getattr(info, "shared", 0)


class PeakRSS:
    """The peak growth of this process's private resident memory (:func:`_private`) while
    the ``with`` block runs (sampled every ms)."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.base = self.peak = _private(self._proc)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _private(self._proc))
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _private(self._proc))
        self.growth_mb = (self.peak - self.base) / 2**20


def _state(opt) -> dict:
    from vrgd_ds.megatron import seam

    inner = seam.inner_optimizers(opt)[0]
    return {(m.start, m.end, i): {"fp32": m.tensor.detach().clone(),
                                  **{k: v.clone() for k, v in inner.optimizer.state[m.tensor].items()
                                     if torch.is_tensor(v) and v.dim() > 0}}
            for i, m in enumerate(m for g in seam.main_params(inner) for m in g if m.model_param is not None)}


def worker(rank, init_file, args):
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]
    from megatron_cpu import redirect_cuda_to_cpu

    redirect_cuda_to_cpu()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=600))
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import megatron_vrlamb as ex
    from megatron.core import dist_checkpointing

    from vrgd_ds.megatron import load_optimizer, save_optimizer

    def save(fmt, path, opt, model):
        if fmt != "dist":
            return save_optimizer(opt, model, path, sharded=fmt == "sharded")
        if rank == 0:
            path.mkdir()
        dist.barrier()
        dist_checkpointing.save({"optimizer": opt.sharded_state_dict(ex.model_sharded_state_dict(model.module))},
                                str(path))

    def load(fmt, path, opt, model):
        if fmt != "dist":
            return load_optimizer(opt, model, path)
        sd = opt.sharded_state_dict(ex.model_sharded_state_dict(model.module), is_loading=True)
        opt.load_state_dict(dist_checkpointing.load({"optimizer": sd}, str(path))["optimizer"])

    parallel_state.initialize_model_parallel(1, 1)
    ex_args = ex.parse_args(["--hidden", str(args.hidden), "--steps", "10", "--micro-batches", "2"])
    model, opt, _ = ex.build(ex_args, torch.device("cpu"))
    data = ex.batches(rank, ex_args.micro_batch_size, torch.device("cpu"), torch.float32)
    model.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=ex.forward_step, data_iterator=data, model=[model],
                                num_microbatches=2, seq_length=1, micro_batch_size=ex_args.micro_batch_size)
    opt.step()
    saved_state = _state(opt)
    folder = Path(args.tmp)
    samples = []
    for r in range(args.repeats):
        paths = {"one file": folder / "optimizer.pt", "sharded": folder / "optimizer", "dist": folder / f"dist{r}"}
        for fmt in FORMATS[r % 3:] + FORMATS[:r % 3]:
            dist.barrier()
            gc.collect()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                save(fmt, paths[fmt], opt, model)
                seconds = time.perf_counter() - t0
            samples.append({"repeat": r, "format": fmt, "call": "save", "seconds": seconds, "rss_mb": mem.growth_mb})
            fresh_model, fresh_opt, _ = ex.build(ex_args, torch.device("cpu"))
            dist.barrier()
            gc.collect()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                load(fmt, paths[fmt], fresh_opt, fresh_model)
                seconds = time.perf_counter() - t0
            samples.append({"repeat": r, "format": fmt, "call": "load", "seconds": seconds, "rss_mb": mem.growth_mb})
            for key, tensors in _state(fresh_opt).items():  # what was loaded is what was saved
                for k, t in tensors.items():
                    assert torch.equal(t, saved_state[key][k]), (fmt, key, k)
            del fresh_model, fresh_opt
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, samples)
    if rank == 0:
        params = sum(p.numel() for p in model.module.parameters())
        keys = sorted(next(iter(saved_state.values())))
        Path(args.tmp, "result.json").write_text(json.dumps({"params": params, "keys": keys, "ranks": gathered}))
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def summarize(raw: dict, args) -> dict:
    medians = {}
    for rank, samples in enumerate(raw["ranks"]):
        for fmt in FORMATS:
            for call in ("save", "load"):
                got = [s for s in samples if s["format"] == fmt and s["call"] == call]
                medians[f"rank {rank} {fmt} {call}"] = {
                    "seconds": statistics.median(s["seconds"] for s in got),
                    "rss_mb": statistics.median(s["rss_mb"] for s in got)}
    state_mb = raw["params"] * 4 * len(raw["keys"]) / 2**20
    return {"command": f"python -m benchmarks.megatron_checkpoint --hidden {args.hidden} --repeats {args.repeats}",
            "params": raw["params"], "state_keys": raw["keys"], "whole_state_mb": state_mb, "ranks": WORLD,
            "medians": medians, "samples": raw["ranks"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(result["medians"])
    for ax, what, unit in ((axes[0], "seconds", "s"), (axes[1], "rss_mb", "MiB")):
        ax.barh(labels, [result["medians"][k][what] for k in labels],
                color=["tab:blue" if "one file" in k else "tab:orange" if "sharded" in k else "tab:green"
                       for k in labels])
        ax.set_xlabel(f"median {'private memory growth' if what == 'rss_mb' else what} ({unit})")
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(f"Megatron optimizer checkpoint, {result['params'] / 1e6:.1f}M params, VR-LAMB "
                 f"({result['whole_state_mb']:.0f} MiB of fp32 state), {WORLD} gloo CPU ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/megatron_checkpoint")
    args = ap.parse_args(argv)
    if args.hidden < 1 or args.repeats < 1:
        ap.error(f"--hidden and --repeats must be positive, got {args.hidden} and {args.repeats}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        mp.spawn(worker, args=(str(Path(tmp) / "init"), args), nprocs=WORLD)
        raw = json.loads(Path(tmp, "result.json").read_text())
    result = summarize(raw, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "megatron_checkpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "megatron_checkpoint.png")
    for name, m in result["medians"].items():
        print(f"{name:26s} {m['seconds']:7.2f} s  {m['rss_mb']:8.0f} MiB")
    return result


if __name__ == "__main__":
    main()
