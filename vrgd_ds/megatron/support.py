"""What the Megatron-core adapter supports, checked before anything is built.

Each refusal names the setting, its value, and what to set instead. Supported: one model
chunk wrapped in Megatron's DistributedDataParallel, data parallelism only (no tensor,
pipeline, context or expert parallelism), fp32, bf16, or fp16 with Megatron's loss scaler
(fp32 main parameters; gradients reduced in fp32 or in the model's dtype), with or without
the distributed optimizer (one instance), gradient-reduce overlap on or off, parameter
all-gather overlap on or off. These are the settings the 2-rank parity tests
run; everything else is refused rather than run unchecked.
"""

from __future__ import annotations

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
    if len(model_chunks) != 1:
        raise ValueError(f"vrgd_ds.megatron supports one model chunk, got {len(model_chunks)} "
                         "(virtual pipeline parallelism is not supported); pass [ddp_model]")
    ddp = model_chunks[0]
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
    for name, size in seam.parallel_sizes(ddp).items():
        if size != (0 if name == "expert_parallel_buffers" else 1):
            what = "expert-parallel gradient buffers" if name == "expert_parallel_buffers" else name
            raise ValueError(f"vrgd_ds.megatron: {what}={size} is not supported: only data parallelism "
                             "is (layer norms of tensor-parallel shards would not be whole-layer norms); "
                             f"set {name} to {0 if name == 'expert_parallel_buffers' else 1}")
