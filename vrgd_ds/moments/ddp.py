"""Gradient moments under torch DistributedDataParallel.

A DDP communication hook all-reduces each gradient bucket together with the squared
gradients of the same parameters, in one collective, so sum g and sum g^2 travel the
same way (ALGORITHM.md section 1):

    ddp = DistributedDataParallel(model)
    moments = DDPMoments(ddp)                  # mode="micro": one group per micro-batch per rank
    opt = VRLAMB(ddp.parameters(), lr=1e-3, moments=moments)
    for batch in loader:
        micros = batch.chunk(a)
        for j, micro in enumerate(micros):
            ctx = ddp.no_sync() if j < a - 1 else contextlib.nullcontext()
            with ctx:
                (loss_fn(ddp(micro)) / a).backward()
        opt.step()
        opt.zero_grad()

``mode="micro"`` (default): k = world size x micro-steps per rank; tensor hooks square each
micro-step's local gradient (as in :class:`MicroStepMoments`) and the bucket hook reduces
those sums. ``mode="rank"``: k = world size, each rank's accumulated gradient is one group,
squared inside the hook. Every rank must run the same number of micro-steps. Squares are
fp32 whatever the gradient dtype. A parameter that gets no gradient on a step (with
``find_unused_parameters``) contributes zero to both moments, as its group gradient is 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .microstep import MicroStepMoments

MODES = ("micro", "rank")


class DDPMoments:
    def __init__(self, ddp_model, process_group=None, mode: str = "micro"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        params = [p for p in ddp_model.module.parameters() if p.requires_grad]
        self.local = MicroStepMoments(params) if mode == "micro" else None
        self._reduced: dict[Tensor, Tensor] = {}
        ddp_model.register_comm_hook(None, self._hook)

    def _hook(self, _state, bucket):
        buf = bucket.buffer()
        params = bucket.parameters()
        if self.local is not None:
            sq = torch.cat([self._local_sq(p).view(-1) for p in params])
        else:
            sq = buf.float().square()
        n = buf.numel()
        combined = torch.cat([buf.float(), sq])
        fut = dist.all_reduce(combined, group=self.group, async_op=True).get_future()

        def finish(f):
            total = f.value()[0]
            buf.copy_(total[:n].div_(self.world))
            offset = n
            for p in params:
                self._reduced[p] = total[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            return buf

        return fut.then(finish)

    def _local_sq(self, p: Tensor) -> Tensor:
        try:
            return self.local.sum_sq(p)
        except KeyError:  # no gradient reached this parameter on this rank
            return torch.zeros_like(p, dtype=torch.float32)

    @property
    def group_count(self) -> int:
        local = self.local.group_count if self.local is not None else 1
        return self.world * local

    @property
    def sq_scale(self) -> float:
        # p.grad = (sum of all local contributions h) / W; mean of squares in that scale:
        # micro: k * sum h^2 / W^2 (h = per micro-step grads); rank: sum G_r^2 / W.
        if self.local is None:
            return 1.0 / self.world
        return self.group_count / self.world**2

    def sum_sq(self, param: Tensor) -> Tensor:
        sq = self._reduced.get(param)
        if sq is None:
            raise KeyError(f"no reduced squared gradient for a parameter of shape "
                           f"{tuple(param.shape)}: was backward() run through the DDP model?")
        return sq

    def reset(self) -> None:
        self._reduced.clear()
        if self.local is not None:
            self.local.reset()
