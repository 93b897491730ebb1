"""Gradient moments under torch DistributedDataParallel.

A DDP communication hook all-reduces each gradient bucket together with the squared
gradients of the same parameters, in one collective, so sum g and sum g^2 travel the
same way (docs/algorithm.md section 1):

    ddp = DistributedDataParallel(model)
    moments = DDPMoments(ddp)                  # mode="micro": one group per micro-batch per rank
    opt = VRLAMB(ddp.parameters(), lr=1e-3, moments=moments)
    for batch in loader:                       # this rank's share of the global batch
        micros = batch.chunk(a)
        for j, micro in enumerate(micros):
            ctx = ddp.no_sync() if j < a - 1 else contextlib.nullcontext()
            with ctx:
                (loss_fn(ddp(micro)) / a).backward()
        moments.clip_grad_norm_(1.0)           # optional (torch's, on p.grad, is followed too)
        opt.step()
        opt.zero_grad()                        # also resets the moments

Modes
-----
``mode="micro"`` (default): a group is one micro-batch on one rank, k = world size x
micro-steps per rank. The tensor hooks of a :class:`MicroStepMoments` square each backward
pass's local gradient h (also inside ``no_sync``, where DDP communicates nothing); on the
synced backward the bucket hook reduces those local sums. With p.grad = (sum of all h) / W
and every h = (W / k) g_i, the mean of squared group gradients in p.grad's scale is
``(k / W^2) * sum h^2``; that is ``sq_scale``.

``mode="rank"``: a group is one rank's accumulated gradient G_r, k = W. No tensor hooks: the
bucket hook squares the bucket's own gradient before the reduction. With p.grad = sum G_r / W
the mean of squares is ``(1 / W) * sum G_r^2``.

Details
-------
- One collective per bucket: ``[gradient | squares | local backward count]`` in one buffer
  of dtype ``promote(gradient dtype, float32)``, one ``all_reduce``; the gradient part is
  divided by W and copied back into the bucket (which keeps its dtype, bf16/fp16 included:
  it is reduced in fp32, so more accurately than DDP's default hook), the squares stay fp32.
  The extra count lets ``group_count`` be the true number of groups; if the ranks ran
  different numbers of micro-steps the groups have different scales and reading
  ``group_count``/``sq_scale`` raises.
- ``no_sync`` is optional: syncing every micro-step gives the same moments (each hook
  reduces the running local sums, the last one wins), only with more traffic.
- Unused parameters (``find_unused_parameters=True``): a parameter a rank did not reach
  has group gradient 0 on that rank, which DDP puts in the bucket and the hooks add as 0
  squares, so both moments are exact. A parameter no rank reached keeps ``p.grad`` as DDP
  leaves it (None after ``zero_grad(set_to_none=True)``) and the optimizer skips it.
- Parameters DDP ignores (``_ddp_params_and_buffers_to_ignore``) get no moments; keep them
  out of the VR optimizer.
- ``static_graph=True`` and ``gradient_as_bucket_view=True`` are exact too (tested). With a
  static graph torch itself refuses ``no_sync`` in the first iteration, so sync every
  micro-step there. With bucket views DDP re-points ``p.grad`` at its bucket after each
  step, so the optimizer gathers the gradient instead of having it handed over.
- ``torch.compile``: a compiled DDP model (``torch.compile(ddp)``: Dynamo's DDPOptimizer
  splits the graph at the buckets, and DDP's reducer calls the hook as usual) and a compiled
  module inside DDP are supported. Refused at construction, naming the setting: DDP built
  with ``torch._dynamo.config.optimize_ddp = "python_reducer"`` (the compiled-autograd
  route: it calls the communication hook once per parameter from traced code, without
  buckets), and ``delay_all_reduce_named_params`` (those gradients are all-reduced outside
  the hook, so their squares would never be).
- DDPMoments owns the model's communication hook (DDP allows one); it is registered at
  construction, before the first backward.
- Clipping: :meth:`clip_grad_norm_` (p.grad is identical on all ranks after the sync, so
  the norm needs no extra collective) scales the squares with the mean gradient. Clipping
  ``p.grad`` directly (``torch.nn.utils.clip_grad_norm_``) is followed as in
  :mod:`.microstep`: the bucket hook keeps probes of the reduced gradient of a few
  parameters, and the step measures the common factor applied since.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .microstep import FollowsRescaling, MicroStepMoments, check_count_by, clip_mean_gradient_

MODES = ("micro", "rank")


def refuse_unsupported_ddp(ddp_model) -> None:
    """Raise ``ValueError`` where DDP would reduce gradients without calling the bucket hook
    (see the module docstring)."""
    if getattr(ddp_model, "_use_python_reducer", False):
        raise ValueError(
            "DDPMoments: this DDP model was built with torch._dynamo.config.optimize_ddp = "
            "'python_reducer' (the compiled-autograd route), which calls the communication hook "
            "once per parameter from traced code instead of once per gradient bucket, so the "
            "squared gradients cannot travel with the gradients. Build the DDP model with "
            "optimize_ddp left at its default (True); torch.compile(ddp) is supported then")
    delayed = getattr(ddp_model, "_delay_all_reduce_params", ())
    if len(delayed):
        raise ValueError(
            f"DDPMoments: this DDP model delays the all-reduce of {len(delayed)} parameter(s) "
            "(delay_all_reduce_named_params / param_to_hook_all_reduce); DDP reduces those "
            "gradients outside the communication hook, so their squared gradients would never "
            "be reduced. Build the DDP model without delay_all_reduce_named_params")


class DDPMoments(FollowsRescaling):
    def __init__(self, ddp_model, process_group=None, mode: str = "micro", samples_per_group: int | None = None,
                 count_by: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        refuse_unsupported_ddp(ddp_model)
        ignored = getattr(ddp_model, "parameters_to_ignore", set())
        self.params = [p for n, p in ddp_model.module.named_parameters()
                       if p.requires_grad and n not in ignored]
        self.local = MicroStepMoments(self.params, count_by=check_count_by(count_by)) if mode == "micro" else None
        if self.local is not None:  # its p.grad is the all-reduced one: nothing to follow
            self.local.follow_rescaling = False
            self.local.per_rank = True  # this rank's local squares, reduced by the bucket hook
        self._reduced: dict[Tensor, Tensor] = {}
        # per reduced bucket: the sum over ranks of the local backward passes counted when the
        # bucket's hook ran (appended from the collective's callbacks, read lazily)
        self._counts: list[Tensor] = []
        self._clip_scale = 1.0
        self._init_probes()
        self.samples_per_group = samples_per_group  # b: the noise scale in samples needs it
        ddp_model.register_comm_hook(process_group, self._hook)

    def remove(self) -> None:
        """Detach the tensor hooks (mode "micro"); the DDP model keeps the communication hook,
        which DDP cannot unregister: build a new DDP model to drop it."""
        if self.local is not None:
            self.local.remove()

    # -- the communication hook -------------------------------------------------------------

    def _hook(self, _state, bucket):
        buf = bucket.buffer()
        params = bucket.parameters()
        dtype = torch.promote_types(buf.dtype, torch.float32)
        if self.local is not None:
            sq = [self._local_sq(p).view(-1) for p in params]
            count, unknown = self.local.pass_count()  # never raises: every rank must reduce
        else:
            sq = [g.reshape(-1).to(dtype).square() for g in bucket.gradients()]
            count, unknown = 1, False
        n = buf.numel()
        combined = torch.cat([buf.view(-1).to(dtype), *(s.to(dtype) for s in sq),
                              torch.tensor([float(count), float(unknown)], dtype=dtype, device=buf.device)])
        fut = dist.all_reduce(combined, group=self.group, async_op=True).get_future()
        views = bucket.gradients()  # the parameters' views of buf

        def finish(f):
            total = f.value()[0]
            buf.view(-1).copy_(total[:n].div_(self.world))
            offset = n
            for p, g in zip(params, views):
                self._reduced[p] = total[offset:offset + p.numel()].view_as(p).float()
                self._probe(p, g)  # the reduced gradient DDP puts into p.grad
                offset += p.numel()
            # read lazily (no device sync in the hook); a copy, not a view that would keep the
            # reduced buffer of every synced micro-step alive
            self._counts.append(total[offset:offset + 2].clone())  # [count, ranks where k is unknown]
            return buf

        return fut.then(finish)

    def _local_sq(self, p: Tensor) -> Tensor:
        try:
            return self.local.sum_sq(p)
        except KeyError:  # no gradient reached this parameter on this rank since creation
            return torch.zeros_like(p, dtype=torch.float32)

    # -- the moment source --------------------------------------------------------------------

    @property
    def group_count(self) -> int:
        """k: W x micro-steps per rank (``"micro"``) or W (``"rank"``)."""
        if self.local is None:
            return self.world
        if not self._counts:  # nothing synced yet: what this rank alone can say
            return self.world * self.local.local_passes
        local = self.local.pass_count()[0]
        # The largest: the last bucket of a synced pass is reduced after every hook of the pass
        # has counted it. An earlier one may not be: DDP (find_unused_parameters) marks a bucket
        # of parameters this pass did not reach ready at the pass's first gradient, when only
        # that gradient's parameter has counted the pass; that bucket's count then misses it.
        counts = torch.stack(self._counts)
        count = int(round(counts[:, 0].max().item()))
        # An unknown k (MicroStepMoments.pass_count) can only clear as a pass's hooks run, so the
        # final state is the least among the buckets reduced after the whole pass; summed over
        # the ranks, so that every rank raises, or none
        unknown = int(round(counts[counts[:, 0] == counts[:, 0].max(), 1].min().item()))
        if unknown:
            raise RuntimeError(f"DDPMoments: k is not known this step on {unknown} of {self.world} ranks; this "
                               f"rank: {self.local.count_problem() or 'known'} (set DDPMoments(..., count_by=...))")
        if count != self.world * local:
            raise RuntimeError(
                f"ranks ran different numbers of backward passes ({count} in all, "
                f"{local} here, world size {self.world}); DDPMoments needs the same number "
                "of micro-steps on every rank")
        return count

    @property
    def sq_scale(self) -> float | Tensor:  # a device tensor after clip_grad_norm_ (see MicroStepMoments)
        # p.grad = (sum of all local contributions h) / W; mean of squares in that scale:
        # micro: k * sum h^2 / W^2 (h = per micro-step grads); rank: sum G_r^2 / W.
        base = 1.0 / self.world if self.local is None else self.group_count / self.world**2
        return base * self._factor()

    def sum_sq(self, param: Tensor) -> Tensor:
        sq = self._reduced.get(param)
        if sq is None:
            raise KeyError(f"no reduced squared gradient for a parameter of shape "
                           f"{tuple(param.shape)}: was a synced backward() run through the "
                           "DDP model (not only no_sync ones), and does DDP manage it?")
        return sq

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the mean gradient like ``torch.nn.utils.clip_grad_norm_``; keep the GSNR exact."""
        total, coef = clip_mean_gradient_(self.params, max_norm, norm_type)
        self._clip_scale *= coef
        return total

    def reset(self) -> None:
        self._reduced.clear()
        self._counts = []
        self._clip_scale = 1.0
        self._reset_probes()
        if self.local is not None:
            self.local.reset()
