"""The one module of vrgd_ds that names megatron-core internals.

Everything else in :mod:`vrgd_ds.megatron` works on the plain snapshots built here
(:class:`BufferLayout`, :class:`BucketSync`, :class:`MainParam`). Tested with
megatron-core |TESTED|; :func:`check_megatron_version` refuses other minor versions and
:func:`check_internals` checks, at construction, that every internal below exists.

Internals used (megatron-core 0.16):

- ``DistributedDataParallel``: ``buffers``, ``expert_parallel_buffers``, ``bucket_groups``,
  ``ddp_config``, ``config`` (the TransformerConfig), ``tp_group``, ``pp_group``,
  ``dp_group``, ``dp_cp_group``, ``module`` (the wrapped model, whose parameter names a
  checkpoint uses), and its methods ``zero_grad_buffer`` and ``start_param_sync``
  (``force_sync=True``: the distributed optimizer's all-gather of the parameters).
- ``_ParamAndGradBuffer``: ``params``, ``param_index_map`` (param -> (start, end,
  bucket id) in the buffer), ``numel``, ``grad_data``, ``buckets``.
- ``_ParamAndGradBucket``: ``offset``, ``grad_data``, ``gradient_scaling_factor``.
- ``_ParamAndGradBucketGroup``: ``buckets``, ``ddp_config``, the collective group
  (``intra_distributed_optimizer_instance_group`` with the distributed optimizer,
  ``data_parallel_group`` without), and its methods ``start_grad_sync`` and
  ``finish_grad_sync``, which this module wraps per instance.
- ``ChainedOptimizer.chained_optimizers``; ``MegatronOptimizer.optimizer`` (the inner
  torch optimizer), ``is_stub_optimizer``, ``prepare_grads`` (wrapped per instance) and
  ``get_loss_scale``, ``grad_scaler`` (None without fp16 loss scaling).
- ``DistributedOptimizer``: ``model_float16_groups``, ``model_fp32_groups``,
  ``shard_fp32_from_float16_groups``, ``shard_fp32_groups``, ``data_parallel_group`` and
  ``_get_model_param_range_map(param)["param"]`` (the element range of a model parameter
  that this rank's shard holds), ``_copy_main_params_to_model_params`` (this rank's main
  shards into the parameter buffer, what its step does before the all-gather).
- ``Float16OptimizerWithFloat16Params``: ``float16_groups``, ``fp32_from_float16_groups``,
  ``fp32_from_fp32_groups``, ``_copy_main_params_to_model_params``; ``FP32Optimizer``: its
  inner parameters are the model's.
- Model parameters: ``shared_embedding`` and ``pipeline_parallel`` (copies on several
  pipeline stages whose gradients Megatron sums over them, refused by :mod:`.support`),
  the ``tensor_model_parallel`` attribute (set by Megatron's
  tensor-parallel layers, ``megatron.core.tensor_parallel.ColumnParallelLinear``,
  ``RowParallelLinear`` and ``VocabParallelEmbedding``, on the parameters they split over the
  tensor-parallel group), ``average_gradients_across_tp_domain`` (gradients Megatron
  averages over that group after the data-parallel reduction) and ``sequence_parallel``
  (with the model config's ``sequence_parallel``: gradients Megatron sums over that group
  in ``finalize_model_grads``, ``_allreduce_non_tensor_model_parallel_grads``).
- ``parallel_state.get_tensor_and_data_parallel_group()`` (checkpoints under tensor
  parallelism; checked to hold tensor-parallel x data-parallel ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

TESTED = "0.16.1"
SUPPORTED_MINOR = (0, 16)
__doc__ = __doc__.replace("|TESTED|", TESTED)

_DDP_ATTRS = ("buffers", "expert_parallel_buffers", "bucket_groups", "ddp_config", "config",
              "tp_group", "pp_group", "dp_group", "dp_cp_group", "module", "zero_grad_buffer",
              "start_param_sync")
_BUFFER_ATTRS = ("params", "param_index_map", "numel", "grad_data", "buckets")
_BUCKET_ATTRS = ("offset", "grad_data", "gradient_scaling_factor")
_GROUP_ATTRS = ("buckets", "ddp_config", "start_grad_sync", "finish_grad_sync")
_DISTOPT_ATTRS = ("model_float16_groups", "model_fp32_groups", "shard_fp32_from_float16_groups",
                  "shard_fp32_groups", "data_parallel_group", "_get_model_param_range_map",
                  "_copy_main_params_to_model_params")
_FLOAT16_ATTRS = ("float16_groups", "fp32_from_float16_groups", "fp32_from_fp32_groups",
                  "_copy_main_params_to_model_params")


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_megatron_version(version: str | None = None) -> None:
    version = megatron_version() if version is None else version
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        raise RuntimeError(f"cannot parse the megatron-core version {version!r}") from None
    if major_minor != SUPPORTED_MINOR:
        raise RuntimeError(
            f"vrgd_ds.megatron supports megatron-core {SUPPORTED_MINOR[0]}.{SUPPORTED_MINOR[1]}.x "
            f"(tested: {TESTED}); found {version}. It hooks Megatron's gradient buffers by "
            f"version; install the extra: pip install 'vrgd-ds[megatron]'")


def _require(obj, names, what: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise RuntimeError(
            f"vrgd_ds.megatron: {what} of megatron-core {megatron_version()} lacks {', '.join(missing)}; "
            f"this adapter was written against megatron-core {TESTED}")


def check_internals(ddp, megatron_optimizer=None) -> None:
    """Fail early, naming the installed version, if an internal used here has moved."""
    from megatron.core.distributed import DistributedDataParallel

    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(f"vrgd_ds.megatron needs model chunks wrapped in megatron.core.distributed."
                        f"DistributedDataParallel, got {type(ddp).__name__}")
    _require(ddp, _DDP_ATTRS, "DistributedDataParallel")
    for buf in ddp.buffers:
        _require(buf, _BUFFER_ATTRS, "_ParamAndGradBuffer")
        for bucket in buf.buckets:
            _require(bucket, _BUCKET_ATTRS, "_ParamAndGradBucket")
    for group in ddp.bucket_groups:
        _require(group, _GROUP_ATTRS, "_ParamAndGradBucketGroup")
    for inner in inner_optimizers(megatron_optimizer) if megatron_optimizer is not None else ():
        _require(inner, ("optimizer", "is_stub_optimizer", "prepare_grads", "get_loss_scale"),
                 "MegatronOptimizer")
        kind = optimizer_kind(inner)
        if kind == "distributed":
            _require(inner, _DISTOPT_ATTRS, "DistributedOptimizer")
        elif kind == "float16":
            _require(inner, _FLOAT16_ATTRS, "Float16OptimizerWithFloat16Params")


# ---- the model side: gradient buffers and their bucket groups -------------------------


@dataclass(frozen=True)
class BufferLayout:
    """One dense gradient buffer: where each parameter's gradient lives in it."""

    numel: int
    device: torch.device
    params: tuple  # the buffer's parameters, in Megatron's order (the same on every rank)
    index: dict  # param -> (start, end) in the buffer


@dataclass(frozen=True)
class BucketSync:
    """How Megatron reduces one bucket group: which slices, over which group, with what."""

    buckets: tuple  # (buffer index, offset, numel, gradient scaling factor) per bucket
    group: object
    size: int
    rank: int
    sharded: bool  # reduce-scatter into equal shards (distributed optimizer), else all-reduce
    async_op: bool
    op: object


def dense_buffers(ddp) -> list[BufferLayout]:
    return [BufferLayout(buf.numel, buf.grad_data.device, tuple(buf.params),
                         {p: (s, e) for p, (s, e, _) in buf.param_index_map.items()})
            for buf in ddp.buffers]


def _bucket_sync(group, ddp) -> BucketSync:
    cfg = group.ddp_config
    where = {id(b): i for i, buf in enumerate(ddp.buffers) for b in buf.buckets}
    pg = (group.intra_distributed_optimizer_instance_group if cfg.use_distributed_optimizer
          else group.data_parallel_group)
    op = dist.ReduceOp.AVG if cfg.average_in_collective else dist.ReduceOp.SUM
    buckets = tuple((where[id(b)], b.offset, b.grad_data.numel(), float(b.gradient_scaling_factor))
                    for b in group.buckets)
    return BucketSync(buckets, pg, pg.size(), pg.rank(), bool(cfg.use_distributed_optimizer),
                      bool(cfg.overlap_grad_reduce and cfg.num_distributed_optimizer_instances == 1), op)


def hook_bucket_groups(ddp, on_start: Callable[[int, bool], None],
                       on_finish: Callable[[int], None]) -> list[BucketSync]:
    """Run ``on_start(i, force_all_reduce)`` right after Megatron starts bucket group i's
    gradient collective, ``on_finish(i)`` right after it finishes it.

    Megatron's ``finish_grad_sync`` calls ``self.start_grad_sync`` (overlap off, or the first
    batch), which then reaches the wrapper too, so every start is seen exactly once."""
    syncs = []
    for i, group in enumerate(ddp.bucket_groups):
        syncs.append(_bucket_sync(group, ddp))
        start, finish = group.start_grad_sync, group.finish_grad_sync

        def start_grad_sync(force_all_reduce=False, _i=i, _start=start):
            _start(force_all_reduce=force_all_reduce)
            on_start(_i, bool(force_all_reduce))

        def finish_grad_sync(force_all_reduce=False, _i=i, _finish=finish):
            _finish(force_all_reduce=force_all_reduce)
            on_finish(_i)

        group.start_grad_sync = start_grad_sync
        group.finish_grad_sync = finish_grad_sync
    return syncs


def hook_zero_grad_buffer(ddp, after: Callable[[], None]) -> None:
    original = ddp.zero_grad_buffer

    def zero_grad_buffer(*args, **kwargs):
        result = original(*args, **kwargs)
        after()
        return result

    ddp.zero_grad_buffer = zero_grad_buffer


def pipeline_group(ddp):
    """The pipeline-parallel process group of a DDP chunk (its ranks in stage order)."""
    return ddp.pp_group[0] if isinstance(ddp.pp_group, list) else ddp.pp_group


def parallel_sizes(ddp) -> dict[str, int]:
    """Tensor-, pipeline-, context-parallel sizes and expert buffers of a DDP chunk."""
    return {"tensor_model_parallel_size": ddp.tp_group.size(),
            "pipeline_model_parallel_size": pipeline_group(ddp).size(),
            "context_parallel_size": ddp.dp_cp_group.size() // ddp.dp_group.size(),
            "expert_parallel_buffers": len(ddp.expert_parallel_buffers)}


def tensor_parallel(param) -> bool:
    """Whether a model parameter is this rank's part of a layer split over the
    tensor-parallel group (Megatron's ``tensor_model_parallel`` attribute); else every
    tensor-parallel rank holds the whole parameter."""
    return bool(getattr(param, "tensor_model_parallel", False))


def unmarked_split_weights(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """Weights of Megatron's tensor-parallel layers (``ColumnParallelLinear``,
    ``RowParallelLinear``, ``VocabParallelEmbedding``, Transformer Engine's column/row
    linear layers) that lack the ``tensor_model_parallel`` attribute: Megatron's own layers
    set it only when ``perform_initialization`` is on."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    out = []
    for prefix, module in model.named_modules():
        split = (isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
                 or getattr(module, "parallel_mode", None) in ("column", "row"))
        weight = getattr(module, "weight", None) if split else None
        if isinstance(weight, torch.nn.Parameter) and weight.requires_grad and not tensor_parallel(weight):
            out.append((f"{prefix}.weight" if prefix else "weight", weight))
    return out


def pipeline_summed(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters of which several pipeline stages hold a copy, whose gradients Megatron sums
    over those stages in ``finalize_model_grads`` after the data-parallel reduction: the word
    embeddings tied to the output layer (``shared_embedding``, set by Megatron's
    ``LanguageModule`` when first and last stage differ), and those marked
    ``pipeline_parallel`` (``_allreduce_conditional_embedding_grads``)."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and (getattr(p, "shared_embedding", False) or getattr(p, "pipeline_parallel", False))]


def tensor_parallel_summed(ddp) -> list[Tensor]:
    """Parameters whose gradients are partial on each tensor-parallel rank and that Megatron
    sums over the tensor-parallel group after the data-parallel reduction
    (``_allreduce_non_tensor_model_parallel_grads``, in ``finalize_model_grads``), by
    Megatron's own test: with sequence parallelism, those it marks ``sequence_parallel``
    (the norms, the row-parallel biases: they see only this rank's part of the sequence);
    with ``qk_layernorm``, those whose name holds ``q_layernorm`` or ``k_layernorm`` (a norm
    over each head's features, shared by the heads that tensor parallelism splits).
    ``average_gradients_across_tp_domain`` parameters, which Megatron averages instead, are
    not among them (refused by :mod:`.support`)."""
    if ddp.tp_group.size() <= 1:
        return []
    sp = bool(getattr(ddp.config, "sequence_parallel", False))
    qk = bool(getattr(ddp.config, "qk_layernorm", False))
    return [p for name, p in ddp.module.named_parameters()
            if p.requires_grad and not getattr(p, "average_gradients_across_tp_domain", False)
            and ((sp and getattr(p, "sequence_parallel", False))
                 or (qk and ("q_layernorm" in name or "k_layernorm" in name)))]


# ---- the optimizer side ---------------------------------------------------------------


@dataclass(frozen=True)
class MainParam:
    """An inner-optimizer tensor and the model parameter elements [start, end) it holds
    (``model_param`` None: a zero-element placeholder of :mod:`vrgd_ds.megatron.optimizer`)."""

    tensor: Tensor
    model_param: Tensor | None
    start: int
    end: int


PLACEHOLDER = "_vrgd_ds_placeholder"  # the attribute that marks a placeholder tensor


def placeholder(device) -> Tensor:
    """A zero-element fp32 tensor with a zero-element gradient, for a param group of which
    this rank holds nothing. Its ``main_grad`` gives it the gradient again where Megatron's
    FP32Optimizer sets ``grad = main_grad`` after zeroing the gradients."""
    t = torch.zeros(0, dtype=torch.float32, device=device)
    t.grad = torch.zeros(0, dtype=torch.float32, device=device)
    t.main_grad = t.grad
    setattr(t, PLACEHOLDER, True)
    return t


def inner_optimizers(megatron_optimizer) -> list:
    from megatron.core.optimizer import ChainedOptimizer

    if isinstance(megatron_optimizer, ChainedOptimizer):
        return list(megatron_optimizer.chained_optimizers)
    return [megatron_optimizer]


def optimizer_kind(inner) -> str:
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer

    for cls, kind in ((DistributedOptimizer, "distributed"), (Float16OptimizerWithFloat16Params, "float16"),
                      (FP32Optimizer, "fp32")):
        if isinstance(inner, cls):
            return kind
    raise TypeError(f"vrgd_ds.megatron: unknown Megatron optimizer wrapper {type(inner).__name__}")


def main_params(inner) -> list[list[MainParam]]:
    """Per param group of the inner torch optimizer, in its order: each tensor and the
    elements of the model parameter it holds."""
    kind = optimizer_kind(inner)
    model_of: dict[int, Tensor] = {}
    if kind == "float16":
        for models, mains in zip(inner.float16_groups, inner.fp32_from_float16_groups):
            model_of.update((id(main), model) for model, main in zip(models, mains))
    elif kind == "distributed":
        for models, mains in (*zip(inner.model_float16_groups, inner.shard_fp32_from_float16_groups),
                              *zip(inner.model_fp32_groups, inner.shard_fp32_groups)):
            model_of.update((id(main), model) for model, main in zip(models, mains))
    out = []
    for group in inner.optimizer.param_groups:
        row = []
        for t in group["params"]:
            model = model_of.get(id(t), t)  # fp32 parameters outside the distributed optimizer
            if getattr(t, PLACEHOLDER, False):  # a zero-element placeholder (vrgd_ds.megatron.optimizer)
                row.append(MainParam(t, None, 0, 0))
            elif kind == "distributed":
                r = inner._get_model_param_range_map(model)["param"]
                row.append(MainParam(t, model, r.start, r.end))
            else:
                row.append(MainParam(t, model, 0, model.numel()))
        out.append(row)
    return out


def main_to_model_params(inner, chunks: list) -> None:
    """The model's weights from the main parameters, as Megatron's step sets them: each
    rank's main tensors (cast to the model's dtype) into the model parameters, then, with the
    distributed optimizer, the all-gather of each chunk's parameter buffers (a collective over
    the data-parallel group, synchronous). FP32Optimizer's main parameters are the model's."""
    kind = optimizer_kind(inner)
    if kind == "fp32":
        return
    inner._copy_main_params_to_model_params()
    if kind == "distributed":
        for ddp in chunks:
            ddp.start_param_sync(force_sync=True)


def module_of(ddp) -> torch.nn.Module:
    """The model inside Megatron's DDP wrapper."""
    return ddp.module


def chunk_list(model) -> list:
    """The model chunks this rank holds, as a list: ``model`` is one DDP chunk, or the list
    of them (several under virtual pipeline parallelism, in Megatron's chunk order)."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks:
        raise ValueError("vrgd_ds.megatron: no model chunk given; pass the DDP-wrapped model, or the list of its chunks")
    return chunks


def named_parameters(chunks: list) -> list[tuple[str, Tensor]]:
    """Every parameter of the chunks with its name: its name in the chunk's model, under
    ``model<i>.`` when there are several chunks (Megatron-LM's names for them in a checkpoint)."""
    if len(chunks) == 1:
        return list(module_of(chunks[0]).named_parameters())
    return [(f"model{i}.{n}", p) for i, ddp in enumerate(chunks) for n, p in module_of(ddp).named_parameters()]


def data_parallel_group(ddp):
    """The data-parallel process group of a DDP chunk."""
    return ddp.dp_group


def tensor_parallel_group(ddp):
    """The tensor-parallel process group of a DDP chunk."""
    return ddp.tp_group


def tensor_and_data_parallel_group(ddp):
    """Megatron's tensor- and data-parallel group (checked to be exactly the ranks of this
    chunk's tensor-parallel x data-parallel groups)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_and_data_parallel_group()
    if dist.get_world_size(group) != ddp.tp_group.size() * ddp.dp_group.size():
        raise RuntimeError(f"vrgd_ds.megatron: Megatron's tensor- and data-parallel group has "
                           f"{dist.get_world_size(group)} ranks, not tensor-parallel {ddp.tp_group.size()} x "
                           f"data-parallel {ddp.dp_group.size()}")
    return group


def grad_scaler(inner):
    """The inner Megatron optimizer's loss scaler, or None."""
    return getattr(inner, "grad_scaler", None)


def shard_group(inner):
    """The process group over which the distributed optimizer's shards are spread."""
    return inner.data_parallel_group


def replace_inner(inner, torch_optimizer) -> None:
    inner.optimizer = torch_optimizer


def is_stub(inner) -> bool:
    return bool(inner.is_stub_optimizer)


def hook_prepare_grads(inner, before: Callable[[], None], after: Callable[[], None]) -> None:
    """``before()`` / ``after()`` around Megatron's gradient preparation (copy to main
    gradients, fp16 unscale and overflow check), which precedes clipping and the step."""
    original = inner.prepare_grads

    def prepare_grads(*args, **kwargs):
        before()
        found_inf = original(*args, **kwargs)
        after()
        return found_inf

    inner.prepare_grads = prepare_grads


def loss_scale(inner) -> float:
    return float(inner.get_loss_scale())
