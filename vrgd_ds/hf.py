"""Hugging Face ``Trainer`` and Accelerate without DeepSpeed: the squared-gradient source,
bound once the model is wrapped.

Trainer (through Accelerate) wraps the model in ``DistributedDataParallel`` inside
``train()``, after the optimizer exists, so the source a VR optimizer needs under DDP
(:class:`~vrgd_ds.moments.DDPMoments`, which owns the DDP model's communication hook) cannot
be built with the optimizer. :func:`attach_moments` adds a callback that builds it at
``on_train_begin``: after the wrapping, before the first backward pass::

    opt = VRLAMB(model.parameters(), lr=1e-3, weight_decay=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    vrgd_ds.hf.attach_moments(trainer)         # mode="micro": k = processes x accumulation steps
    trainer.train()                            # torchrun --nproc_per_node N train.py, or python train.py

What it attaches, by what Trainer built (read on every rank, at every ``train()`` call):

- ``DistributedDataParallel`` (a ``torchrun`` launch; also compiled with ``torch_compile``):
  ``DDPMoments(ddp, mode=mode)``, with ``samples_per_group`` from the batch size per device
  (times the accumulation steps in mode ``"rank"``). Trainer's ``no_sync`` on the
  accumulation steps, its ``max_grad_norm`` clipping of ``p.grad``, ``find_unused_parameters``
  and ``gradient_as_bucket_view`` are followed as :mod:`vrgd_ds.moments.ddp` describes.
- one process: ``MicroStepMoments`` on the model's trainable parameters (k = accumulation
  steps), unless the optimizer has a source already.
- DeepSpeed (``TrainingArguments(deepspeed=...)``): nothing; the DeepSpeed adapter reduces
  the squares (:mod:`vrgd_ds.deepspeed`).
- an optimizer without GSNR (our ``LAMB``, torch's): nothing.

Refused with a ``ValueError`` naming the setting: torch ``DataParallel`` (several GPUs in one
process: the replicas' gradients are summed inside autograd, so no hook sees a group's
gradient), FSDP (each rank holds shards of layers), and an optimizer that already has a
source of its own where DDP needs ``DDPMoments`` (build it without ``moments=``).

A plain Accelerate loop calls :func:`attach_to_model` itself, on what ``accelerator.prepare``
returned, before the first backward pass.

The groups must be equally weighted, as everywhere (``docs/algorithm.md`` section 1):
Trainer divides each micro-batch's loss by the accumulation steps, or, for models that take
``num_items_in_batch``, normalises by the tokens of the whole batch; see the README on
per-token losses.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .moments import DDPMoments, MicroStepMoments
from .moments.ddp import MODES
from .moments.microstep import check_count_by


def vr_optimizer(optimizer):
    """Our optimizer inside Trainer's wrappers (Accelerate's ``AcceleratedOptimizer``), or None
    where it is not one that takes a moment source."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if hasattr(optimizer, "attach_moments"):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _is_fsdp2(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (older torch)
        return False
    return isinstance(model, FSDPModule)


def _unwrap_compiled(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


class MomentsCallback(TrainerCallback):
    """Built by :func:`attach_moments`; see the module docstring."""

    def __init__(self, trainer, mode: str = "micro", count_by: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.trainer = trainer
        self.mode = mode
        self.count_by = check_count_by(count_by)
        self.moments = None  # what this callback attached (None: nothing yet, or nothing needed)
        self._bound_to = None  # the wrapped model it was built for

    def on_train_begin(self, args, state, control, **kwargs):
        self.bind()

    def bind(self):
        """Attach the source the wrapped model needs (a no-op when already attached for it)."""
        trainer = self.trainer
        if getattr(trainer, "is_deepspeed_enabled", False):
            return None
        opt = vr_optimizer(trainer.optimizer)
        if opt is None:
            return None
        wrapped = _unwrap_compiled(trainer.model_wrapped)
        if self.moments is not None and wrapped is self._bound_to and opt.moments is self.moments:
            return self.moments
        moments = attach_to_model(wrapped, opt, mode=self.mode, count_by=self.count_by,
                                  batch_size=trainer.args.per_device_train_batch_size,
                                  accumulation=trainer.args.gradient_accumulation_steps, previous=self.moments,
                                  params=trainer.model.parameters())
        self.moments, self._bound_to = moments, wrapped
        return moments


def attach_to_model(model, optimizer, mode: str = "micro", count_by: str | None = None,
                    batch_size: int | None = None, accumulation: int = 1, previous=None, params=None):
    """Attach to ``optimizer`` (ours, or Accelerate's wrapper of it) the moment source that
    ``model`` needs, and return it (None for an optimizer without GSNR): ``DDPMoments`` for a
    ``DistributedDataParallel`` model (compiled or not), else ``MicroStepMoments`` on the
    trainable parameters (``params``, default the model's), unless the optimizer has a
    source already. For Accelerate: call it with what ``accelerator.prepare`` returned, before
    the first backward pass. ``batch_size`` (per device and micro-step) and ``accumulation``
    give ``samples_per_group``; ``previous``: a source built for an earlier wrapping, whose
    hooks are removed. Refuses torch ``DataParallel`` and FSDP, naming them."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    opt = vr_optimizer(optimizer)
    if opt is None:
        return None
    model = _unwrap_compiled(model)
    name = type(model).__name__
    if isinstance(model, torch.nn.DataParallel):
        raise ValueError(
            "vrgd_ds.hf: the model is wrapped in torch.nn.DataParallel (several GPUs in one "
            "process), which sums the replicas' gradients inside autograd, so no hook sees a "
            "group's gradient and the squared gradients cannot be formed. Launch one process "
            "per GPU instead (torchrun --nproc_per_node N ...), which gives DistributedDataParallel")
    if "FullyShardedDataParallel" in name or _is_fsdp2(model):
        raise ValueError(f"vrgd_ds.hf: the model is wrapped in FSDP ({name}); each rank would hold shards of "
                         "layers, whose layer statistics the VR optimizers cannot take. Use DDP (no FSDP "
                         "setting or plugin) or DeepSpeed ZeRO")
    if isinstance(model, DistributedDataParallel):
        if opt.moments is not None and opt.moments is not previous:
            raise ValueError(
                f"vrgd_ds.hf: {type(opt).__name__} already has a moment source "
                f"({type(opt.moments).__name__}), but under DistributedDataParallel the squared "
                "gradients must travel in DDP's gradient buckets (DDPMoments, which vrgd_ds.hf "
                "builds): build the optimizer without moments=")
        if previous is not None:  # built for an earlier wrapping (an earlier train())
            previous.remove()
        group = None if batch_size is None else batch_size * (accumulation if mode == "rank" else 1)
        moments = DDPMoments(model, mode=mode, samples_per_group=group, count_by=count_by)
    else:
        if opt.moments is not None:
            return opt.moments  # the user's own source, for one process
        params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        moments = MicroStepMoments(params, samples_per_group=batch_size, count_by=count_by)
    opt.attach_moments(moments)
    return moments


def attach_moments(trainer, mode: str = "micro", count_by: str | None = None) -> MomentsCallback:
    """Add the callback that attaches the squared-gradient source when ``trainer.train()``
    starts (module docstring); returns it (its ``moments`` is the source once attached).
    ``mode``: ``"micro"`` (a group per micro-batch per process) or ``"rank"`` (a group per
    process's accumulated batch), as in :class:`~vrgd_ds.moments.DDPMoments`; ``count_by``: see
    :meth:`~vrgd_ds.moments.MicroStepMoments.pass_count`."""
    callback = MomentsCallback(trainer, mode, count_by)
    trainer.add_callback(callback)
    return callback
