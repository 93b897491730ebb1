"""The CUDA-to-CPU redirection megatron-core 0.16 needs to run on CPU with gloo. Tests only.

megatron-core assumes a CUDA device in a few places on the DDP / optimizer path:

- ``torch.cuda.current_device()`` as the device of the gradient buffers;
- tensors created with ``device="cuda"`` (found-inf flag, unit loss scale, grad-norm and
  clipping scratch tensors);
- ``Tensor.type()`` compared with ``"torch.cuda.FloatTensor"`` (and the Half/BFloat16
  names) to sort parameters by dtype in the (distributed) optimizer and in clipping;
- ``Tensor.cuda(torch.cuda.current_device())`` in the loss scaler's ``load_state_dict``, and
  ``Tensor.cuda()`` in a GPT's set-up of word embeddings tied across pipeline stages;
- ``torch.cuda.synchronize()`` before distributed checkpointing writes its files.

:func:`redirect_cuda_to_cpu` patches exactly these in the calling process: the device
becomes "cpu", ``torch.cuda.synchronize`` does nothing (there is nothing to wait for), ``device="cuda"`` becomes ``device="cpu"`` in ``torch.tensor`` and
``torch.zeros``, ``Tensor.type()`` without arguments names a CPU tensor as its CUDA
twin, and ``Tensor.cuda()`` and ``Tensor.cuda("cpu")`` (the redirected current device) stay on
the CPU.
Nothing of Megatron or torch.distributed is mocked; vrgd_ds itself never needs this.
"""

from __future__ import annotations

import functools

import torch

_done = False


def _cpu_device(device):
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return "cpu"
    return device


def _redirect_factory(fn):
    @functools.wraps(fn)
    def factory(*args, device=None, **kwargs):
        return fn(*args, device=_cpu_device(device), **kwargs)
    return factory


def _cuda_type_name(original):
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
    return type_


def _cuda_to_cpu(original):
    @functools.wraps(original)
    def cuda(self, device=None, *args, **kwargs):
        if device is None or device == "cpu":  # the current device, redirected above
            return self.to("cpu")
        return original(self, device, *args, **kwargs)
    return cuda


def redirect_cuda_to_cpu() -> None:
    """Patch this process so megatron-core's DDP and optimizers run on CPU (idempotent)."""
    global _done
    if _done:
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.tensor = _redirect_factory(torch.tensor)
    torch.zeros = _redirect_factory(torch.zeros)
    torch.Tensor.type = _cuda_type_name(torch.Tensor.type)
    torch.Tensor.cuda = _cuda_to_cpu(torch.Tensor.cuda)
    _done = True


def start_gloo_worker(rank: int, init_file, out_dir, world: int) -> None:
    """A spawned test rank's start-up: the redirection above, the gloo process group (120 s
    timeout), the started mark (tests/spawn_ranks.py: a later abort is not retried), and one
    thread."""
    from datetime import timedelta

    import torch.distributed as dist

    from spawn_ranks import started

    redirect_cuda_to_cpu()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    started(out_dir, rank)
    torch.set_num_threads(1)
