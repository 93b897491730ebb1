"""Gradient moments from micro-steps in one process ("virtual devices").

The global batch is split into k micro-batches; each micro-batch is one gradient group
(docs/algorithm.md section 1). A tensor hook on every parameter sees each backward pass's own
gradient h_i before autograd accumulates it into ``p.grad``; the hook adds h_i^2 into
an fp32 buffer. After k backward passes ``p.grad = sum_i h_i`` and the buffer holds
``sum_i h_i^2``, which is all the GSNR needs, so k >= 8 works on one CPU:

    model = ...
    moments = MicroStepMoments(model.parameters(), samples_per_group=len(batch) // k)
    opt = VRLAMB(model.parameters(), lr=1e-3, moments=moments)
    for batch in loader:
        for micro in batch.chunk(k):
            (loss_fn(model(micro)) / k).backward()   # p.grad becomes the mean gradient
        moments.clip_grad_norm_(1.0)                  # optional (clipping p.grad is followed too)
        opt.step()
        opt.zero_grad()                               # also resets the moments

Scale: with ``p.grad = sum_i h_i`` and h_i = c g_i for any common c (1/k above), the mean
of squared group gradients in p.grad's scale is ``k * sum_i h_i^2``; ``sq_scale`` says so.
A parameter that a micro-batch does not reach has h_i = 0 for that group, so k is the
number of backward passes, not a per-parameter count. Two counts are kept: P, the backward()
calls that reached a parameter (autograd graph tasks; the nested backward of a reentrant
activation checkpoint belongs to the call that runs it), and H, the most calls that reached
one parameter. They agree unless no parameter is reached by every call: micro-batches that
take disjoint parts of the model (k = P) look like micro-batches that each run several
backward() calls over different parts (k = H), so reading k raises until ``count_by``
("backward" or "parameter") says which. Where every trainable parameter sits inside reentrant
checkpoints, P is not seen and k = H.

Clipping: :meth:`clip_grad_norm_` clips the mean gradient and rescales the squares with it,
so the GSNR stays that of the unclipped moments (section 1). A gradient rescaled any other
way after the backward passes (``torch.nn.utils.clip_grad_norm_`` on ``p.grad``, as Hugging
Face's Trainer and Accelerate do, or ``p.grad.mul_(c)`` for every parameter) is followed too:
after each backward pass the source keeps the norm of the first
``PROBE_NUMEL`` gradient elements of a few parameters (the first ``PROBES`` whose gradient is
accumulated; a few small reductions, nothing read back to the host), and the step compares
them with the gradient it finds. An unexplained factor common to all of them is taken as a
clipping factor c (squares times c^2, and the telemetry's clip scale). Probes that disagree
(a change to some parameters' gradients only, e.g. zeroing a padding row) leave the factor
at the explained one. What it cannot follow: a change that is not one factor for all
parameters (``clip_grad_value_``, clipping per parameter); ``follow_rescaling = False`` turns
the probe off.

Memory traffic: the first backward pass of a step writes h_1^2 (no zeroing pass; a buffer a
step did not reach is zeroed when it is read). After its first step a vrgd_ds optimizer
calls :meth:`place`: from then on the squares are written straight into its flat buffer,
and right after autograd creates ``p.grad`` on the first micro-step, a post-accumulate hook
copies it, still in cache, into the optimizer's flat gradient buffer and makes ``p.grad``
that view (as with DDP's ``gradient_as_bucket_view``); the later micro-steps accumulate
into it in place. The optimizer step then reads both where they lie instead of gathering
them. ``p.grad`` stays an ordinary tensor the user may read, scale, or set to None; a view
handed out is overwritten at the next step, so keep a ``clone()`` of a gradient you want to
keep, or pass ``flat_grads=False`` (the squares are still placed). Left alone: a ``p.grad``
that existed before the backward pass, gradients made with ``create_graph=True`` (they keep
their graph), and ``torch.autograd.grad`` results (nothing is accumulated).

Mixed precision with ``torch.amp.GradScaler`` (``scaler.scale(loss).backward()`` for each
micro-batch, then ``scaler.step(opt)``, ``scaler.update()``): the VR optimizers take the
scale from the scaler's step, unscale the gradient and divide the squares by S^2, and skip a
step in which the scaler found an inf or NaN; the result equals an unscaled run bit for bit
(S is a power of 2). To clip, call ``scaler.unscale_(opt)`` and then :meth:`clip_grad_norm_`,
and pass ``grad_scaler=scaler`` here: the scaler unscales ``p.grad`` but not the squares,
and the step reads S from it (without it that step raises).
"""

from __future__ import annotations

import math
import sys
from typing import Iterable

import torch
from torch import Tensor

from .hand_over import GradHandOver, check_flat_grads, eager_hook

PROBES = 4  # parameters whose gradient is probed for rescaling after the backward passes
PROBE_NUMEL = 4096  # elements probed per parameter
RESCALE_TOL = 1e-6  # a probed factor this close to the explained one is the explained one
AGREE_TOL = 1e-5  # probes whose factors differ by more measured no common rescaling


def _probe_sum(grad: Tensor) -> Tensor:
    """The norm (float64) of the first PROBE_NUMEL elements of a gradient."""
    return torch.linalg.vector_norm(grad.detach().reshape(-1)[:PROBE_NUMEL], dtype=torch.float64)


class FollowsRescaling:
    """Mixin of a moment source whose ``p.grad`` is the mean gradient: it follows a common
    factor applied to ``p.grad`` after the gradients were made (see the module docstring).
    The source keeps ``_clip_scale`` (its own :meth:`clip_grad_norm_`'s factor) and calls
    :meth:`_probe` with each parameter's finished gradient."""

    def _init_probes(self) -> None:
        self.follow_rescaling = True  # False: only the source's own clipping is followed
        self._probes: dict[Tensor, Tensor] = {}  # param -> _probe_sum of its gradient when it was made
        self._loss_scale: Tensor | None = None  # S, noted by the optimizer's GradScaler step
        # a torch.amp.GradScaler whose unscale_ may run before the step (see the module docstring)
        self.grad_scaler = getattr(self, "grad_scaler", None)

    def _reset_probes(self) -> None:
        self._probes.clear()
        self._loss_scale = None

    def _probe(self, p: Tensor, grad: Tensor | None) -> None:
        """Keep the probe of ``grad``, the gradient ``p.grad`` has now (the last call wins)."""
        if not self.follow_rescaling or (p not in self._probes and len(self._probes) >= PROBES):
            return
        if grad is not None and not grad.requires_grad and grad.layout == torch.strided:
            self._probes[p] = _probe_sum(grad)

    def note_loss_scale(self, scale: Tensor) -> None:
        """The optimizer's ``torch.amp.GradScaler`` step: ``p.grad`` is (or is being) divided
        by the loss scale S that the backward passes' gradients, and so the squares, carry."""
        self._loss_scale = scale.double()

    def _factor(self) -> Tensor | float:
        """What the squares must be multiplied by for the gradient the step reads: c^2 / S^2
        (c: :meth:`clip_grad_norm_`'s factor, S: a noted loss scale), or, where the probes
        measured another common factor of p.grad, that one (a float64 tensor, on the device)."""
        explained = self._clip_scale**2
        if self._loss_scale is not None:
            explained = explained / self._loss_scale.square()
        then = [(t, p.grad) for p, t in self._probes.items() if p.grad is not None]
        if not then:
            return explained
        device = then[0][0].device  # probed parameters may lie on several devices
        before = torch.stack([t.to(device) for t, _ in then])
        now = torch.stack([_probe_sum(g).to(device) for _, g in then])
        seen = before > 0.0
        ratio = torch.where(seen, now / torch.where(seen, before, 1.0), 1.0)
        i = torch.argmax(before)
        measured = ratio[i].square()
        # one factor for all probed parameters, or it is not a rescaling of the mean gradient
        # (a change to some parameters' gradients only): then only the explained factor
        common = torch.where(seen, (ratio / ratio[i] - 1.0).abs() <= AGREE_TOL, True).all() & seen[i]
        e = torch.as_tensor(explained, dtype=torch.float64).to(measured.device)
        return torch.where(common & ((measured / e - 1.0).abs() > RESCALE_TOL), measured, e)

    @property
    def clip_scale(self) -> float:
        """The factor clipping multiplied the mean gradient by (1: unclipped): that of
        :meth:`clip_grad_norm_`, or one measured by the probes (see the module docstring)."""
        factor = self._factor()
        if self._loss_scale is not None:
            factor = factor * self._loss_scale.square()
        return math.sqrt(float(factor))


_FUNCTION_BACKWARD = torch.autograd.function.BackwardCFunction.apply.__code__


COUNT_BY = ("backward", "parameter")


def check_count_by(count_by):
    if count_by is not None and count_by not in COUNT_BY:
        raise ValueError(f"count_by must be one of {COUNT_BY} or None, got {count_by!r}")
    return count_by


def ambiguous_count_message(passes: int, hits: int, where: str = "") -> str:
    return (f"the number of gradient groups k is ambiguous this step{where}: {passes} backward() calls "
            f"reached the parameters, but no parameter was reached by more than {hits} of them. Either "
            f"the micro-batches took disjoint parts of the model (no parameter is used by all of them: "
            f"then k counts the backward() calls; set count_by='backward' on the moment source), or each "
            f"micro-batch ran several backward() calls over different parts of the model (then k counts "
            f"the most calls that reached one parameter; set count_by='parameter')")


def _inside_function_backward() -> bool:
    """Whether this thread is inside an autograd Function's backward (its Python frames: the
    engine runs a nested backward on the thread that called it, also on CUDA's device thread)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _FUNCTION_BACKWARD:
            return True
        frame = frame.f_back
    return False


class MicroStepMoments(FollowsRescaling):
    squares_consumable = True  # rewritten by the next step's first backward pass (or zeroed when read)

    def __init__(self, params: Iterable[Tensor], samples_per_group: int | None = None, flat_grads: bool = True,
                 grad_scaler=None, count_by: str | None = None):
        if samples_per_group is not None and (isinstance(samples_per_group, bool)
                                              or not isinstance(samples_per_group, int) or samples_per_group < 1):
            raise ValueError(f"samples_per_group must be an integer >= 1 or None, got {samples_per_group!r}")
        self.samples_per_group = samples_per_group  # b: the noise scale in samples needs it
        self.count_by = check_count_by(count_by)  # how k is counted where the two counts disagree
        self._hand = GradHandOver()  # p.grad into the optimizer's flat buffer (see place)
        self.flat_grads = flat_grads  # False (may be set at any time): p.grad stays where autograd puts it
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        self.grad_scaler = grad_scaler  # its scale S is in the squares (see the module docstring)
        self._init_probes()
        # True: this process's gradients are its own (one process, or ranks that train apart);
        # under torch.distributed with several ranks the first read of group_count refuses
        # otherwise, since DDP (or any all-reduce) would average p.grad but not these squares
        self.per_rank = False
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("MicroStepMoments needs at least one parameter with requires_grad=True")
        self._sum_sq: dict[Tensor, Tensor] = {}
        self._fresh: set[Tensor] = set()  # buffers that hold this step's squares (else stale)
        self._hits: dict[Tensor, int] = {}
        self._clip_scale = 1.0
        self._backward_passes = 0  # the most backward passes that reached one parameter
        self._passes = 0  # top-level autograd graph tasks that reached any (see _count_pass)
        self._tasks: set[int] = set()
        self._handles = [p.register_hook(eager_hook(self._hook_for(p))) for p in self.params]
        self._handles += [p.register_post_accumulate_grad_hook(eager_hook(self._hand_over)) for p in self.params]

    def _hook_for(self, p: Tensor):
        def hook(grad: Tensor) -> Tensor | None:
            self._square(p, grad.detach())  # statistics: no graph, also under create_graph=True
            self._hits[p] = self._hits.get(p, 0) + 1
            self._backward_passes = max(self._backward_passes, self._hits[p])
            self._count_pass()
            self._hand.before(p)
            return None
        return hook

    def _count_pass(self) -> None:
        """Count the backward pass this hook runs in, once per autograd graph task. A task
        started inside an autograd Function's backward (reentrant activation checkpointing:
        torch's, DeepSpeed's, Megatron's) is part of the pass that called it, not a pass of its
        own. The per-parameter count alone would miss a pass when no parameter is reached by
        every pass (micro-batches that take disjoint branches, e.g. per-task adapters)."""
        task = torch._C._current_graph_task_id()
        if task >= 0 and task not in self._tasks:  # -1: autograd reports no task
            self._tasks.add(task)
            if not _inside_function_backward():
                self._passes += 1

    def _square(self, p: Tensor, grad: Tensor) -> None:
        """Add this micro-step's squared gradient of ``p`` to its buffer."""
        buf = self._sum_sq.get(p)
        if buf is None:
            buf = self._sum_sq[p] = torch.empty_like(p, dtype=torch.float32)
        g = grad.float()
        if p in self._fresh:
            buf.addcmul_(g, g)
        else:  # the step's first h for p: write, no zeroing pass
            torch.mul(g, g, out=buf)
            self._fresh.add(p)

    def _hand_over(self, p: Tensor) -> None:
        """After autograd created p.grad on the step's first backward pass (never for
        ``torch.autograd.grad``, which accumulates nothing): copy it, still in cache, into the
        optimizer's flat buffer and make p.grad that view; later passes accumulate into it."""
        self._hand.after(p)
        self._probe(p, p.grad)

    @property
    def flat_grads(self) -> bool:
        return self._hand.enabled

    @flat_grads.setter
    def flat_grads(self, on: bool) -> None:
        self._hand.enabled = check_flat_grads(on)

    def place(self, params: list[Tensor], squares: list[Tensor], grads: list[Tensor | None]) -> None:
        """Keep the squares of ``params`` in the given fp32 views (e.g. an optimizer's flat
        buffer), and each step's gradient in the views in ``grads`` (None: leave it where
        autograd puts it): when a backward pass creates a parameter's ``p.grad``, it is
        copied there and ``p.grad`` becomes that view (a ``p.grad`` that already existed is
        accumulated into as usual). Takes effect now for the squares (their values are copied
        over) and at the next step for the gradients. As with every buffer of this source
        (``squares_consumable``), the step may overwrite the squares once it has read them:
        they are rewritten before they are read again."""
        hooked = set(self.params)
        for p, sq, g in zip(params, squares, grads):
            if p not in hooked or sq.shape != p.shape or sq.dtype != torch.float32:
                continue
            old = self._sum_sq.get(p)
            if old is not None and p in self._fresh and old.data_ptr() != sq.data_ptr():
                sq.copy_(old)
            self._sum_sq[p] = sq
            self._hand.set_home(p, g)

    def local_squares(self, p: Tensor) -> Tensor:
        """This step's sum of local squares of ``p`` (zeros if no backward pass reached it)."""
        buf = self._sum_sq.get(p)
        if buf is None:
            raise KeyError(
                f"no squared gradient for a parameter of shape {tuple(p.shape)}: it was not "
                "among the parameters given to MicroStepMoments, or its gradient did not come "
                "from backward()"
            )
        if p not in self._fresh:
            buf.zero_()
            self._fresh.add(p)
        return buf

    @property
    def group_count(self) -> int:
        """k: backward passes since the last reset (one per micro-batch); see :meth:`pass_count`."""
        if not self.per_rank:
            self._check_one_process()
        return self.local_passes

    @property
    def local_passes(self) -> int:
        """This process's backward passes since the last reset; raises where k is not known."""
        count, unknown = self.pass_count()
        if unknown:
            raise RuntimeError(self.count_problem())
        return count

    def pass_count(self) -> tuple[int, bool]:
        """``(k, unknown)`` from two counts: P, the backward() calls (top-level autograd graph
        tasks) that reached a parameter, and H, the most passes that reached one parameter.
        They agree unless no parameter is reached by every pass; then P > H, and ``count_by``
        says which is meant: "backward" (one backward() per micro-batch, e.g. micro-batches
        that take disjoint branches) or "parameter" (several backward() calls per micro-batch
        over different parts of the model). Without it that case is unknown (H, flagged).
        P < H is H: a parameter reached only inside reentrant activation checkpoints, whose
        nested backward belongs to the call that ran it, on micro-batches where no parameter
        outside one was reached. Where every parameter is inside reentrant checkpoints P = 0:
        H, unflagged (disjoint micro-batches are not seen there), but with "backward" unknown.
        Never raises (DDPMoments calls it inside its bucket hook); :meth:`count_problem` says
        what is wrong."""
        hits, passes = self._backward_passes, self._passes
        if self.count_by == "backward":
            return (passes, False) if passes or not hits else (hits, True)
        return hits, self.count_by is None and passes > hits

    def count_problem(self) -> str | None:
        """Why :meth:`pass_count` flags k as unknown this step, or None."""
        if not self.pass_count()[1]:
            return None
        if self.count_by == "backward":
            return ("count_by='backward': no backward() call reached a parameter outside a reentrant "
                    "activation checkpoint this step (every gradient came from a checkpoint's own nested "
                    "backward), so the calls cannot be counted; use torch.utils.checkpoint(..., "
                    "use_reentrant=False)")
        return ambiguous_count_message(self._passes, self._backward_passes)

    def _check_one_process(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"MicroStepMoments under torch.distributed with {dist.get_world_size()} ranks: its squares "
                "are this rank's alone, while DistributedDataParallel (HF Trainer, Accelerate) averages p.grad "
                "over the ranks, so the GSNR would mix the two. Use vrgd_ds.moments.DDPMoments(ddp_model) "
                "(the squares travel with the gradients), or DeepSpeed; if every rank really trains on its "
                "own, set moments.per_rank = True")

    @property
    def sq_scale(self) -> float | Tensor:
        """After :meth:`clip_grad_norm_` a float64 tensor on the gradients' device (the
        optimizer uses it there; reading it back would wait for the device)."""
        return self.local_passes * self._factor()

    def sum_sq(self, param: Tensor) -> Tensor:
        return self.local_squares(param)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the mean gradient like ``torch.nn.utils.clip_grad_norm_``; keep the GSNR exact."""
        total, coef = clip_mean_gradient_(self.params, max_norm, norm_type)
        self._clip_scale *= coef
        return total

    def reset(self) -> None:
        self._fresh.clear()  # each buffer is written by its next first hit, or zeroed when read
        self._hand.clear()
        self._hits.clear()
        self._backward_passes = 0
        self._passes = 0
        self._tasks.clear()
        self._clip_scale = 1.0
        self._reset_probes()

    def remove(self) -> None:
        """Detach the hooks (the moments stop updating)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def clip_mean_gradient_(params, max_norm: float, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
    """``torch.nn.utils.clip_grad_norm_`` on the ``p.grad`` of ``params`` (the mean gradient);
    returns the total norm and the factor applied (float64, on the gradients' device: nothing
    is read back), which a moment source keeps so that the squares are scaled by its square and
    the GSNR stays exact (docs/algorithm.md section 1)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)
    return total, coef.double()
