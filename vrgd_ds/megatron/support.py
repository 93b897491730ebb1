"""What the Megatron-core adapter supports, checked before anything is built.

Each refusal names the setting, its value, and what to set instead.

Supported:
- model chunks wrapped in Megatron's DistributedDataParallel: one, or several under virtual
  pipeline parallelism (all of the rank's chunks, over the same process groups, with the
  same DDP config);
- data, tensor and pipeline parallelism, pipeline parallelism with or without virtual stages
  but without parameters copied on several stages (such as word embeddings tied to the
  output layer); no context or expert parallelism;
- sequence parallelism and ``qk_layernorm``: their partial gradients are summed over the
  tensor-parallel group before they are squared (:mod:`.squares`); no
  ``average_gradients_across_tp_domain`` parameters (Megatron averages those gradients over
  the tensor-parallel group after the data-parallel reduction, and that is not followed);
- fp32, bf16, or fp16 with Megatron's loss scaler (fp32 main parameters; gradients reduced
  in fp32 or in the model's dtype);
- the distributed optimizer (one instance) or not; gradient-reduce overlap and parameter
  all-gather overlap, each on or off.

These are the settings the parity tests run (2 data-parallel ranks; 2 x 2 with tensor or
with pipeline parallelism, or both; 2 x 2 with 2 virtual stages per pipeline rank);
everything else is refused rather than run unchecked.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import seam

# (where, field, bad(value) -> bool, the supported alternative)
_REFUSED = (
    ("model config", "gradient_accumulation_fusion", bool,
     "the fused weight-gradient accumulation writes main_grad inside the GEMM, so the "
     "per-micro-batch gradient never reaches a tensor hook; set it to False"),
    ("model config", "fp8", lambda v: v is not None, "FP8 training is not supported; set fp8=None"),
    ("model config", "fp8_param", bool, "FP8 parameters are not supported; set fp8_param=False"),
    ("model config", "cuda_graph_impl", lambda v: v not in (None, "none"),
     "CUDA graphs would capture the backward without the squares hooks; set cuda_graph_impl='none'"),
    ("model config", "enable_cuda_graph", bool, "CUDA graphs are not supported; set it to False"),
    ("model config", "external_cuda_graph", bool, "CUDA graphs are not supported; set it to False"),
    ("model config", "calculate_per_token_loss", bool,
     "the gradient groups must be equally weighted means (loss / micro-batches); set it to False"),
    ("model config", "tp_comm_overlap", bool,
     "the overlapped tensor-parallel communication (Transformer Engine userbuffers) is not "
     "supported; set tp_comm_overlap=False"),
    ("model config", "defer_embedding_wgrad_compute", bool,
     "deferred weight-gradient computation bypasses the parameter hooks; set it to False"),
    ("DDP config", "num_distributed_optimizer_instances", lambda v: v != 1,
     "several distributed-optimizer instances are not supported; set it to 1"),
    ("DDP config", "use_megatron_fsdp", bool, "Megatron FSDP is not supported; set it to False"),
    ("DDP config", "use_custom_fsdp", bool, "custom FSDP is not supported; set it to False"),
    ("DDP config", "reduce_scatter_with_fp32_accumulation", bool, "not supported; set it to False"),
    ("DDP config", "delay_wgrad_compute", bool,
     "delayed weight-gradient computation bypasses the parameter hooks; set it to False"),
    ("DDP config", "average_in_collective", bool,
     "not covered by the tests (gloo has no averaging collective); set it to False"),
    ("DDP config", "fp8_param_gather", bool, "FP8 is not supported; set it to False"),
    ("DDP config", "reuse_grad_buf_for_mxfp8_param_ag", bool, "FP8 is not supported; set it to False"),
    ("optimizer config", "fp8_recipe", lambda v: v is not None, "FP8 is not supported; set fp8_recipe=None"),
    ("optimizer config", "use_precision_aware_optimizer", bool,
     "the VR optimizers keep fp32 main parameters and state; set it to False"),
    ("optimizer config", "optimizer_cpu_offload", bool, "optimizer offload is not supported; set it to False"),
    ("optimizer config", "overlap_param_gather_with_optimizer_step", bool,
     "not supported (it splits the optimizer in two); set it to False"),
)


def check_supported(config, model_chunks) -> None:
    """Raise ValueError naming the first unsupported setting (see the module docstring)."""
    if not model_chunks:
        raise ValueError("vrgd_ds.megatron: no model chunk given; pass [ddp_model]")
    for ddp in model_chunks:
        _check_chunk(config, ddp)
    virtual = getattr(model_chunks[0].config, "virtual_pipeline_model_parallel_size", None)
    if virtual is not None and virtual != len(model_chunks):
        raise ValueError(f"vrgd_ds.megatron: the model config has virtual_pipeline_model_parallel_size={virtual} but "
                         f"{len(model_chunks)} model chunk(s) were given; pass all of this rank's chunks, "
                         "get_megatron_optimizer(config, model_chunks), as Megatron-LM does (the squares of a chunk "
                         "left out would not be hooked)")
    if len(model_chunks) > 1:
        _check_chunks(model_chunks)


def _check_chunks(model_chunks) -> None:
    """Several chunks are virtual pipeline stages: one pipeline rank's share of the model,
    over the same process groups and with the same DDP config."""
    first = model_chunks[0]
    pp = seam.parallel_sizes(first)["pipeline_model_parallel_size"]
    if pp == 1:
        raise ValueError(f"vrgd_ds.megatron: {len(model_chunks)} model chunks with pipeline_model_parallel_size=1; "
                         "several chunks are virtual pipeline stages, which need pipeline_model_parallel_size > 1: "
                         "pass [ddp_model]")
    for i, ddp in enumerate(model_chunks[1:], 1):
        same = (seam.data_parallel_group(ddp) is seam.data_parallel_group(first)
                and seam.tensor_parallel_group(ddp) is seam.tensor_parallel_group(first)
                and seam.pipeline_group(ddp) is seam.pipeline_group(first))
        if not same:
            raise ValueError(f"vrgd_ds.megatron: model chunk {i} has other process groups than chunk 0; the chunks "
                             "of a virtual pipeline share this rank's data-, tensor- and pipeline-parallel groups")
        if ddp.ddp_config != first.ddp_config:
            raise ValueError(f"vrgd_ds.megatron: model chunk {i} has another DistributedDataParallelConfig than "
                             "chunk 0; wrap every chunk with the same one")


def _check_chunk(config, ddp) -> None:
    seam.check_internals(ddp)
    sources = {"model config": ddp.config, "DDP config": ddp.ddp_config, "optimizer config": config}
    for where, field, bad, fix in _REFUSED:
        value = getattr(sources[where], field, None)
        if value is not None and bad(value):
            raise ValueError(f"vrgd_ds.megatron: {where} {field}={value!r} is not supported: {fix}")
    if bool(config.use_distributed_optimizer) != bool(ddp.ddp_config.use_distributed_optimizer):
        raise ValueError(
            f"vrgd_ds.megatron: optimizer config use_distributed_optimizer={config.use_distributed_optimizer} "
            f"but DDP config use_distributed_optimizer={ddp.ddp_config.use_distributed_optimizer}; set both alike")
    sizes = seam.parallel_sizes(ddp)
    for name, size in sizes.items():
        if name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            continue
        if size != (0 if name == "expert_parallel_buffers" else 1):
            what = "expert-parallel gradient buffers" if name == "expert_parallel_buffers" else name
            raise ValueError(f"vrgd_ds.megatron: {what}={size} is not supported: only data, tensor and "
                             f"pipeline parallelism are; set {name} to {0 if name == 'expert_parallel_buffers' else 1}")
    if sizes["tensor_model_parallel_size"] > 1:
        _check_tensor_parallel(ddp, sizes["tensor_model_parallel_size"])
    if sizes["pipeline_model_parallel_size"] > 1:
        _check_pipeline_parallel(ddp, sizes["pipeline_model_parallel_size"])


def _check_pipeline_parallel(ddp, pp: int) -> None:
    """A parameter with a copy on several pipeline stages gets a partial gradient on each, which
    Megatron sums over those stages after the backward passes of all micro-batches; the
    squared gradients would be the squares of the parts, and summing each micro-batch's parts
    first would need the stages to meet in every backward pass, which the pipeline schedule
    runs at different times on each stage."""
    for name, p in seam.pipeline_summed(seam.module_of(ddp)):
        raise ValueError(f"vrgd_ds.megatron: parameter {name} has a copy on several pipeline stages "
                         f"(pipeline_model_parallel_size={pp}; such as word embeddings tied to the output layer), "
                         "whose gradients Megatron sums over the stages after the data-parallel reduction, which "
                         "the squared gradients cannot follow: set share_embeddings_and_output_weights=False "
                         "(and no multi-token prediction or conditional embedder on several stages), or "
                         "pipeline_model_parallel_size=1")


def _check_tensor_parallel(ddp, tp: int) -> None:
    """Under tensor parallelism every gradient must be whole on each rank when the
    data-parallel reduction (and the squares') runs, or be a partial one that Megatron sums
    over the tensor-parallel group (sequence parallelism, ``qk_layernorm``), which the
    squares hook sums there first (:mod:`.squares`)."""
    for name, p in seam.unmarked_split_weights(seam.module_of(ddp)):
        raise ValueError(f"vrgd_ds.megatron: parameter {name} is split by tensor parallelism "
                         f"(tensor_model_parallel_size={tp}) but has no tensor_model_parallel attribute, so "
                         "its layer statistics would be taken for a whole layer's: Megatron sets the "
                         "attribute only with perform_initialization=True; set it, or mark the weight with "
                         "megatron.core.tensor_parallel.set_tensor_model_parallel_attributes")
    _check_replicated(ddp, tp)
    for name, p in seam.module_of(ddp).named_parameters():
        if p.requires_grad and getattr(p, "average_gradients_across_tp_domain", False):
            raise ValueError(f"vrgd_ds.megatron: parameter {name} has average_gradients_across_tp_domain=True "
                             f"with tensor_model_parallel_size={tp}, which is not supported: Megatron averages "
                             "these gradients over the tensor-parallel group after the data-parallel reduction, "
                             "and the squared gradients do not follow that")


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_replicated(ddp, tp: int) -> None:
    """A parameter without ``tensor_model_parallel`` is taken to be the same whole tensor on
    every tensor-parallel rank (counted once in the layer statistics). One all-reduce checks
    it: an exact integer checksum of its bits (their sum as int64, which no summation order
    changes) must agree on all tensor-parallel ranks; a weight a custom layer splits without
    the attribute differs, and is refused by name."""
    params = [(n, p) for n, p in seam.module_of(ddp).named_parameters()
              if p.requires_grad and not seam.tensor_parallel(p)]
    if not params:
        return
    sums = torch.stack([p.detach().reshape(-1).view(_INT_VIEW[p.element_size()]).to(torch.int64).sum()
                        for _, p in params])
    both = torch.cat([sums, -sums])  # max of both halves: the largest and (negated) the smallest
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=seam.tensor_parallel_group(ddp))
    differ = (both[:len(params)] != -both[len(params):]).tolist()
    if any(differ):
        name = params[differ.index(True)][0]
        raise ValueError(f"vrgd_ds.megatron: parameter {name} differs between the tensor-parallel ranks "
                         f"(tensor_model_parallel_size={tp}) but has no tensor_model_parallel attribute, so "
                         "its layer statistics would be taken for one whole layer held by every rank: mark a "
                         "weight a layer splits with megatron.core.tensor_parallel."
                         "set_tensor_model_parallel_attributes, and give replicated parameters the same "
                         "values on every tensor-parallel rank")
