"""What BERT pretraining (:mod:`pretrain_bert.run_pretraining`) and SQuAD fine-tuning
(:mod:`pretrain_bert.squad.run`) share, once:

- durable files: :func:`fsync_dir`, :func:`fsync_tree`, :func:`atomic_write` (text) and
  :func:`write_json_atomic` (temporary file in the same folder, fsync, ``os.replace``, fsync of
  the folder: a reader sees the old file or the new one, never a torn one);
- the seed formulas: the data permutation of an epoch (:func:`epoch_permutation`, seeded by
  ``seed * 100_003 + epoch``) and the dropout RNG of a step (:func:`dropout_seed`,
  ``seed * 1_000_003 + step * world + rank``), so a resumed run draws the same numbers;
- :class:`Batches`: global step -> this rank's micro-batches, a pure function of (seed, step);
- :func:`param_groups`: the weight-decay / no-decay split of NVIDIA's recipe;
- :func:`progress_bar`: the tqdm bar of the scripts (rank 0);
- :func:`deepspeed_run`: ``deepspeed.init_distributed`` under the shm-op lock guard, and the
  barrier, /dev/shm clean-up and ``destroy_process_group`` at the end of a run.

torch and DeepSpeed are imported where they are used, so the SQuAD metric's command line and
the data preparation do not pay for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

PERMUTATION_SEED_STRIDE = 100_003   # epoch permutations: seed * stride + epoch
DROPOUT_SEED_STRIDE = 1_000_003     # dropout RNG: seed * stride + step * world + rank


# ----------------------------------------------------------------------------- durable files

def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file below ``folder`` and every folder, ``folder`` last."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temporary file in the same folder, fsync, rename over
    ``path``, fsync the folder. A failure leaves ``path`` as it was and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj, *, indent: int = 2) -> None:
    """``obj`` as indented JSON (non-ASCII kept as is) plus a newline, by :func:`atomic_write`."""
    atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- seeds and data order

def epoch_permutation(size: int, seed: int, epoch: int):
    """The permutation of ``size`` items for ``epoch``: a torch tensor, the same on every rank."""
    import torch

    gen = torch.Generator().manual_seed(seed * PERMUTATION_SEED_STRIDE + epoch)
    return torch.randperm(size, generator=gen)


def dropout_seed(seed: int, step: int, world: int, rank: int) -> int:
    """The RNG seed of optimizer step ``step`` on ``rank``: dropout is resumable and per rank."""
    return seed * DROPOUT_SEED_STRIDE + step * world + rank


class Batches:
    """Global step -> this rank's micro-batches, a pure function of (seed, step).

    One permutation of the ``size`` training items per epoch (:func:`epoch_permutation`); global
    step s takes the next ``global_batch`` of them, the remainder of each epoch is dropped, and
    the batch is split into ranks x micro-steps: micro-batch j of rank r is chunk j * world + r.
    ``take(indices)`` turns a tensor of item indices into one micro-batch (collate, or indexing
    tensors). ``unit`` and ``remedy`` word the error for data smaller than one global batch."""

    def __init__(self, size: int, global_batch: int, world: int, rank: int, accumulation: int, seed: int,
                 take: Callable, *, unit: str = "items", remedy: str = "use more data or a smaller batch"):
        if size < global_batch:
            raise ValueError(f"the training data has {size} {unit}, fewer than one global "
                             f"batch of {global_batch}; {remedy}")
        self.size, self.g, self.w, self.r, self.a, self.seed = size, global_batch, world, rank, accumulation, seed
        self.take = take
        self.per_epoch = size // global_batch
        self._perm_epoch, self._perm = None, None

    def epoch(self, step: int) -> int:
        return step // self.per_epoch

    def __call__(self, step: int) -> list:
        epoch = self.epoch(step)
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.size, self.seed, epoch), epoch
        start = (step % self.per_epoch) * self.g
        chunks = self._perm[start:start + self.g].chunk(self.w * self.a)
        return [self.take(chunks[j * self.w + self.r]) for j in range(self.a)]


# ----------------------------------------------------------------------------- model and training

def on_device(batch: dict, device) -> dict:
    """A collated batch's tensors on the engine's device (the data loaders make CPU tensors)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def sum_over_ranks(t, device):
    """All-reduce (sum) of a small tensor on the engine's device, returned on the CPU: NCCL only
    reduces CUDA tensors (a CPU tensor fails with "No backend type associated with device type
    cpu"), gloo both."""
    import torch.distributed as dist

    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def param_groups(model) -> list[dict]:
    """No weight decay and no trust ratio for biases and LayerNorm (NVIDIA's recipe)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay}, {"params": plain, "weight_decay": 0.0, "exclude_from_adaptation": True}]


def progress_bar(total: int, desc: str, unit: str, on: bool = True, initial: int = 0):
    """A tqdm bar on stdout, or None when ``on`` is false (other ranks, ``--no-progress``)."""
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stdout)


@contextlib.contextmanager
def deepspeed_run():
    """The process group of one launched run; yields ``(rank, world_size)``.

    ``deepspeed.init_distributed`` (gloo with ``DS_ACCELERATOR=cpu``) runs under
    :func:`vrgd_ds.deepspeed.launching.guard_shm_op_lock`, so a lock left by a killed launch does
    not stall this one. When the block ends normally: a barrier, this rank's /dev/shm buffer of
    DeepSpeed's CPU all-reduce removed, ``destroy_process_group``. An exception passes through
    with no barrier (the other ranks may be anywhere; the launcher stops them)."""
    import deepspeed
    import torch.distributed as dist

    from vrgd_ds.deepspeed.launching import guard_shm_op_lock, remove_own_shm_buffer

    with guard_shm_op_lock():
        deepspeed.init_distributed(dist_backend="gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else None)
    yield dist.get_rank(), dist.get_world_size()
    dist.barrier()
    remove_own_shm_buffer()  # DeepSpeed's CPU all-reduce leaves a /dev/shm file per rank
    dist.destroy_process_group()
