"""The skeleton every optimizer of this package shares.

``step()`` collects, per param group, the parameters that have a gradient as flat buckets
(:mod:`.flat_group`: under ZeRO the partition itself, outside ZeRO the group viewed as one
buffer); a gradient transform says where the gradient of the base update comes from
(:class:`GradSource`: the gradient itself for the base optimizers, the GSNR-scaled one for
the VR ones, see :mod:`vrgd_ds.optim.vr`), and the base update of the subclass runs its
flat passes (:mod:`.flat`) with that source fused into them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..moments.hand_over import GradHandOver, check_flat_grads
from .flat import Spec
from .flat_group import BucketStep, FlatBucket, GroupBatch
from .layout import LayerLayout

GSNR_COLS = ("inv_mean", "gamma", "bc3")  # per segment: 1 / layer mean of r_raw, clamp floor, 1/(1-beta3^t)
GSNR_CONSTS = ("sq_scale", "b3w")  # moment scale, 1 - beta3


@dataclass
class GradSource:
    """Where a base update's passes get the gradient (see :func:`vrgd_ds.gsnr.scaled_grad`).

    ``mode``: "off" (the gradient itself), "ratio" (r * g), "mom" (advance the GSNR momentum,
    g' = phat * g), "store" (beta3 = 0 with a kept ratio: momentum := r), "reuse" (g' from
    the momentum already advanced). ``cols``/``consts``: its per-segment scalars and
    constants; ``tensors``: its flat inputs per bucket; ``wide``: segments whose r_raw needs
    float64 (their fp32 layer sum overflowed, or 1 / m is not a normal fp32 number);
    ``consumable``: the moment source declares (``squares_consumable``) that its squares are
    rewritten before they are read again, so the step may overwrite them once read.
    """

    mode: str = "off"
    cols: dict[str, list[float]] = field(default_factory=dict)
    consts: dict[str, float] = field(default_factory=dict)
    tensors: Callable[[BucketStep], dict] = lambda bs: {}
    wide: list[bool] | None = None
    consumable: bool = False  # the moment source lets the step overwrite its squares once read

    @property
    def writes(self) -> tuple[str, ...]:
        return ("mom",) if self.mode in ("mom", "store") else ()

    def spec(self, cols: tuple[str, ...], consts: tuple[str, ...], *flags) -> Spec:
        own_cols = {"off": (), "reuse": ("bc3",)}.get(self.mode, GSNR_COLS)
        own_consts = GSNR_CONSTS if self.mode in ("ratio", "mom", "store") else ()
        return Spec(("ok", *cols, *own_cols), (*consts, *own_consts), (self.mode, *flags))

    def wide_spec(self, spec: Spec) -> Spec:
        return Spec(spec.cols, spec.consts, (*spec.flags, "wide"))

    def again(self) -> "GradSource":
        """The same gradient for a second pass of the step, without advancing state again."""
        if self.mode in ("mom", "store"):
            return GradSource("reuse", {"bc3": self.cols["bc3"]}, {}, self.tensors)
        return self


def check_lr(lr: float) -> None:
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")


def times_lr(values: Tensor, lr) -> Tensor:
    """``lr * values`` (per-layer float64 tensors) for a float lr or a tensor lr (an LR
    scheduler's), on the values' device."""
    return values * (lr.to(values) if isinstance(lr, Tensor) else float(lr))


def check_weight_decay(weight_decay: float) -> None:
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def check_eps(eps: float) -> None:
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def check_betas(betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of floats in [0, 1), got {betas!r}") from None
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    return b1, b2


def adam_defaults(lr: float, betas: Any, eps: float, weight_decay: float, **more) -> dict:
    """The checked hyperparameters of an Adam-style update (Adam, AdamW, LAMB) as
    param-group defaults, with ``more`` added."""
    check_lr(lr)
    check_eps(eps)
    check_weight_decay(weight_decay)
    return dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay, **more)


def adam_consts(betas: tuple[float, float], eps: float, **more: float) -> dict[str, float]:
    """The constants of an Adam-style flat pass (:func:`adam_moments`), with ``more`` added."""
    beta1, beta2 = betas
    return {"b1w": 1.0 - beta1, "b2": beta2, "b2w": 1.0 - beta2, "eps": eps, **more}


def adam_moments(spec: Spec, x: dict, c: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Inside a flat pass: Adam's m = lerp(m, g, 1 - beta1) and v = beta2 v + (1 - beta2) g^2
    from ``x["m"]``, ``x["v"]`` and the constants of :func:`adam_consts`."""
    m = x["m"] + spec.c(c, "b1w") * (g - x["m"])
    v = x["v"] * spec.c(c, "b2") + spec.c(c, "b2w") * g * g
    return m, v


def check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


def check_not_sharded(name: str, params: list) -> None:
    """Refuse parameters that are shards of a layer this optimizer cannot see whole: torch
    FSDP2 / DTensor parameters (``fully_shard``, DTensor tensor parallelism) and FSDP1's flat
    parameters (and their ``use_orig_params`` views). Each rank would compute LAMB/LARS trust
    ratios and GSNR layer means over its own shard, not over the layer."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        DTensor = ()
    for p in params:
        if isinstance(p, DTensor) or getattr(p, "_fsdp_flattened", False):
            what = "DTensor (FSDP2 fully_shard, or DTensor tensor parallelism)" if isinstance(p, DTensor) \
                else "an FSDP flat parameter (FullyShardedDataParallel)"
            raise NotImplementedError(
                f"{name}: a parameter of shape {tuple(p.shape)} is {what}: each rank holds a shard of the "
                "layer, and the layer statistics (LAMB/LARS trust ratios, GSNR layer means) would be computed "
                "per shard. vrgd_ds supports DeepSpeed ZeRO stages 0-2 (exact across partitions), "
                "megatron-core DDP and the distributed optimizer, torch DDP (vrgd_ds.moments.DDPMoments) "
                "and single-process training")


class BaseOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with flat, layout-aware parameter buckets and a gradient source.

    ``compile``: the flat kernels are compiled with ``torch.compile`` (None, the default:
    where it works, else eagerly after one warning; True: always, errors raise; False:
    eagerly). ``foreach`` only chooses torch's implementation for the torch-based updates
    (SGD, Adam, AdamW); the flat kernels have one implementation (a VR Adam/AdamW step with
    ``foreach=None`` runs as one of them, :mod:`.torch_bases`).
    """

    def __init__(self, params, defaults: dict, foreach: bool | None = None, compile: bool | None = None):
        defaults = dict(defaults, foreach=foreach, compile=compile, exclude_from_adaptation=False)
        super().__init__(params, defaults)
        self.layout = LayerLayout()
        self._buckets: dict[int, tuple] = {}
        self._batches: dict[int, tuple] = {}  # per group, what _collect keeps between steps
        self._flat_grads = True
        self._hand_over: GradHandOver | None = None

    # state keys this optimizer keeps in fp32 whatever the parameters' dtype (its flat buffers);
    # torch's own updates keep theirs in the parameters' dtype (:mod:`.torch_bases`)
    FP32_STATE: frozenset[str] = frozenset()

    def element_state_keys(self, group: dict) -> tuple[str, ...]:
        """The per-element state (tensors of each parameter's shape) this optimizer keeps for a
        parameter of ``group`` once it has stepped: what a checkpoint that must name its
        tensors before reading them (Megatron's distributed checkpointing) asks for."""
        return ()

    def load_state_dict(self, state_dict) -> None:
        """torch's ``load_state_dict``, except that the state in :attr:`FP32_STATE` is loaded as
        fp32: torch casts every floating-point state tensor to its parameter's dtype, which on a
        bf16 or fp16 model would round the fp32 moments (and the GSNR momentum) and make a
        resumed run differ from the one that was saved. Copied, never aliased."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in saved.get(i, {}).items():
                if key in self.FP32_STATE and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            check_not_sharded(type(self).__name__, [params])
        elif not isinstance(params, set):  # torch refuses a set (no order), let it say so
            param_group["params"] = params = list(params)  # as torch does: a generator is read once
            check_not_sharded(type(self).__name__, params)
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("layout", LayerLayout())
        self.__dict__.setdefault("_buckets", {})
        self.__dict__.setdefault("_batches", {})
        self.__dict__.setdefault("_flat_grads", True)
        self.__dict__.setdefault("_hand_over", None)

    @staticmethod
    def _weight_decay(group: dict) -> float:
        """Excluded groups (bias, LayerNorm) skip weight decay (docs/algorithm.md section 4)."""
        return 0.0 if group["exclude_from_adaptation"] else group["weight_decay"]

    def _advance_step(self, batch: GroupBatch, key: str = "step") -> list[int]:
        """Add 1 to ``state[p][key]`` of the batch's parameters; their new values."""
        steps = []
        for st in batch.states(self.state):
            st[key] = t = int(st.get(key, 0)) + 1
            steps.append(t)
        return steps

    def _group_buckets(self, index: int, group: dict) -> list[FlatBucket]:
        """The group's parameters by (device, dtype) as flat buckets, built once and rebuilt
        when the group changed or a parameter was moved."""
        key = tuple(id(p) for p in group["params"])
        cached = self._buckets.get(index)
        if cached is None or cached[0] != key or not all(b.valid() for b in cached[1]):
            by_kind: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                by_kind.setdefault((p.device, p.dtype), []).append(p)
            cached = self._buckets[index] = (key, [FlatBucket(ps) for ps in by_kind.values()])
        return cached[1]

    def _collect(self, index: int, group: dict) -> GroupBatch:
        """The group's parameters that have a gradient, bucket by bucket. What depends only on
        which parameters have one (their layout segments, the flat plans) is kept from the last
        step while that set, the buckets and the layout stay the same."""
        have = tuple(p.grad is not None for p in group["params"])
        for p, h in zip(group["params"], have):
            if h and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if not any(have):
            return GroupBatch([], [])
        buckets = self._group_buckets(index, group)
        key = (have, self.layout, buckets)
        cached = self._batches.get(index)
        if cached is None or any(a is not b for a, b in zip(cached[0][1:], key[1:])) or cached[0][0] != have:
            cached = self._batches[index] = (key, self._group_batch(group, have, buckets))
        skeleton, parts = cached[1]
        return GroupBatch(skeleton.params, skeleton.segments, skeleton.flat_segments,
                          [BucketStep(*part) for part in parts])

    def _group_batch(self, group: dict, have: tuple[bool, ...], buckets: list[FlatBucket]):
        """A GroupBatch without its per-step part, and the arguments of its BucketSteps."""
        with_grad = {id(p) for p, h in zip(group["params"], have) if h}
        batch, parts = GroupBatch([], []), []
        for bucket in buckets:
            js = [j for j, p in enumerate(bucket.params) if id(p) in with_grad]
            if not js:
                continue
            segs, flat_segs = [], []
            for j in js:
                p = bucket.params[j]
                mine = self.layout.segments(p)
                batch.params.append(p)
                batch.segments.append(mine)
                segs.extend(mine)
                flat_segs.extend((bucket.offsets[j] + s.offset, s.numel) for s in mine)
            batch.flat_segments.extend(segs)
            parts.append((bucket, js, segs, bucket.plan(flat_segs)))
        return batch, parts

    def _transform(self, batches: list[GroupBatch]) -> list[GradSource | None] | None:
        """Per group, the gradient source of the base update (None: the gradient itself);
        None as a whole skips the step."""
        return [None] * len(batches)

    def _update(self, group: dict, batch: GroupBatch, source: GradSource | None) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [self._collect(i, g) for i, g in enumerate(self.param_groups)]
        sources = self._transform(batches)
        if sources is not None:
            for group, batch, source in zip(self.param_groups, batches, sources):
                if batch.params:
                    self._update(group, batch, source)
                    for bs in batch.steps:
                        bs.finish()
                    # applied steps of the group (DeepSpeed's elastic checkpoints save and restore it)
                    group["step"] = group.get("step", 0) + 1
        self._finish_step()
        return loss

    @property
    def flat_grads(self) -> bool:
        """True (the default): gradients a step had to gather into a bucket's flat buffer are
        handed over there as later backward passes create them (:meth:`_hand_over_grads`);
        False (may be set at any time, takes effect at the next backward pass): ``p.grad``
        stays where autograd puts it and every step gathers it. A moment source that places
        the gradients itself (``MicroStepMoments``) has its own switch of that name."""
        return self._flat_grads

    @flat_grads.setter
    def flat_grads(self, on: bool) -> None:
        self._flat_grads = check_flat_grads(on)
        if self._hand_over is not None:
            self._hand_over.enabled = on

    def _finish_step(self) -> None:
        """After a step (applied or skipped), before the next backward pass."""
        self._hand_over_grads()

    def _hand_over_grads(self) -> None:
        """Where this step had to gather the gradients into a bucket's flat buffer, hand the
        next steps' gradients over there as autograd creates them (:mod:`vrgd_ds.moments.hand_over`),
        so the step reads them where they lie; buckets of one parameter (a ZeRO partition), of
        another dtype than fp32, of tensors that are no leaves of autograd (Megatron's shards of
        main parameters, whose p.grad it sets), or whose gradients a moment source places
        already are left out. A bucket where something re-pointed a handed-over ``p.grad`` before the step
        (DDP's ``gradient_as_bucket_view``, Megatron's ``main_grad``, the user) is dropped for
        good: it is gathered as before. Nothing here changes a value the step computes."""
        ho = self._hand_over
        if ho is not None:
            strays = {id(p) for p in ho.strays()}
            for _, buckets in self._buckets.values():
                for b in buckets:
                    if b.grads_home and any(id(p) in strays for p in b.params):
                        ho.drop(b.params)
                        b.grads_home = False
            ho.clear()
        if not self.flat_grads:
            return
        for _, buckets in self._buckets.values():
            for b in buckets:
                if (b.grads_home is not None or b.placed_for is not None or len(b.params) < 2
                        or b.params[0].dtype != torch.float32 or not b.moved.get("g")):
                    continue
                # autograd's own leaves only: a frozen parameter never gets a gradient, and
                # autograd never makes one for a tensor that is none (a framework sets its p.grad)
                js = [j for j, p in enumerate(b.params) if p.requires_grad and p.is_leaf and p._base is None]
                if not js:
                    continue
                if ho is None:
                    ho = self._hand_over = GradHandOver()
                    # an optimizer that is gone (a new one for the same model) leaves no hooks behind
                    weakref.finalize(self, ho.drop_all)
                mine = [b.params[j] for j in js]
                for p, home in zip(mine, b.views(b.buffer("g", torch.float32), js)):
                    ho.set_home(p, home)
                ho.hook(mine)
                b.grads_home = True
