"""Unsupported Megatron settings, tried on the 2 gloo ranks of tests/megatron_cases.py.

A setting that megatron-core cannot even construct on CPU (FP8 needs TransformerEngine,
fused weight-gradient accumulation needs APEX) is set on the real config object of an
otherwise real DDP model or optimizer config, as a user's config would carry it; the
adapter must refuse it before building anything, naming the setting.
"""

from __future__ import annotations

import contextlib

import torch

# id: (kind, target, value, words the message must contain)
REFUSALS = {
    "gradient_accumulation_fusion": ("model", "gradient_accumulation_fusion", True, "set it to False"),
    "fp8": ("model", "fp8", "hybrid", "set fp8=None"),
    "cuda_graph_impl": ("model", "cuda_graph_impl", "local", "cuda_graph_impl='none'"),
    "calculate_per_token_loss": ("model", "calculate_per_token_loss", True, "set it to False"),
    "num_distributed_optimizer_instances": ("ddp", "num_distributed_optimizer_instances", 2, "set it to 1"),
    "delay_wgrad_compute": ("ddp", "delay_wgrad_compute", True, "set it to False"),
    "average_in_collective": ("ddp", "average_in_collective", True, "set it to False"),
    "fp8_recipe": ("optimizer", "fp8_recipe", "tensorwise", "fp8_recipe=None"),
    "use_precision_aware_optimizer": ("optimizer", "use_precision_aware_optimizer", True, "set it to False"),
    "optimizer_cpu_offload": ("optimizer", "optimizer_cpu_offload", True, "set it to False"),
    "use_distributed_optimizer": ("optimizer", "use_distributed_optimizer", True, "set both alike"),
    "optimizer_name": ("optimizer", "optimizer", "adam", "must be one of"),
    "pipeline_shared_embedding": ("pp2", None, None, "set share_embeddings_and_output_weights=False"),
    "expert_parallel_buffers": ("expert", None, None, "expert-parallel gradient buffers=1"),
    "model_chunks": ("chunks", None, None, "2 model chunks with pipeline_model_parallel_size=1; several chunks "
                                           "are virtual pipeline stages"),
    "model_chunks_ddp_config": ("chunks config", None, None, "model chunk 1 has another "
                                                              "DistributedDataParallelConfig than chunk 0"),
    "model_chunk_left_out": ("chunk left out", None, None, "virtual_pipeline_model_parallel_size=2 but 1 model "
                                                           "chunk(s) were given"),
    "checkpoint": ("checkpoint", None, None, "--ckpt-format torch_dist) or vrgd_ds.megatron.save_optimizer"),
}


@contextlib.contextmanager
def _set(obj, field, value):
    old = getattr(obj, field)
    setattr(obj, field, value)
    try:
        yield
    finally:
        setattr(obj, field, old)


@contextlib.contextmanager
def _pipeline_parallel(virtual=None):
    """Megatron's parallel state at pipeline_model_parallel_size=2 (data-parallel size 1 on the
    2 ranks; ``virtual`` stages per pipeline rank) for the block, then back to data-parallel 2."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 2, virtual_pipeline_model_parallel_size=virtual)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(1, 1)


def _pipeline_parallel_ddp(rank):
    """A real DDP model under pipeline_model_parallel_size=2 (data-parallel size 1) whose first
    weight is marked as Megatron's LanguageModule marks word embeddings tied to the output
    layer on another stage (a real GPTModel: tests/megatron_pp_cases.py). Pipeline
    parallelism itself is supported: tests/test_megatron_pp.py."""
    from megatron_cases import build, make_model

    with _pipeline_parallel():
        model = make_model()
        model[0].weight.shared_embedding = True
        build("vrlamb", False, False, 0.0, {}, model=model)


def _chunks_config(rank):
    """Two model chunks under pipeline_model_parallel_size=2 (virtual pipeline stages, which are
    supported: tests/test_megatron_pp.py) wrapped with different DDP configs."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from megatron_cases import make_model
    from vrgd_ds.megatron import VROptimizerConfig, get_megatron_optimizer

    with _pipeline_parallel():
        config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=1,
                                   pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
        chunks = [DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=fp32), make_model())
                  for fp32 in (True, False)]
        get_megatron_optimizer(VROptimizerConfig(optimizer="vrlamb", lr=0.01), chunks)


def _chunk_left_out(rank):
    """Virtual pipeline stages (2 per pipeline rank) but only the first chunk given."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from megatron_cases import make_model
    from vrgd_ds.megatron import VROptimizerConfig, get_megatron_optimizer

    with _pipeline_parallel(virtual=2):
        config = TransformerConfig(num_layers=4, hidden_size=8, num_attention_heads=1, pipeline_model_parallel_size=2,
                                   virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), make_model())
        get_megatron_optimizer(VROptimizerConfig(optimizer="vrlamb", lr=0.01), [ddp])


def _expert_ddp(rank):
    from megatron_cases import build, make_model

    model = make_model()
    model[0].weight.allreduce = False  # Megatron's mark of an expert-parallel parameter
    build("vrlamb", False, False, 0.0, {}, model=model)


def _two_chunks(rank):
    from vrgd_ds.megatron import VROptimizerConfig, get_megatron_optimizer
    from megatron_cases import build

    ddp, _, _ = build("lamb", False, False, 0.0, {})
    get_megatron_optimizer(VROptimizerConfig(optimizer="lamb", lr=0.1), [ddp, ddp])


def _checkpoint(rank):
    from megatron_cases import build

    _, opt, _ = build("vrlamb", True, False, 0.0, {})
    opt.state_dict()  # Megatron's legacy format (--ckpt-format torch)


def try_refusal(rank, kind, field, value, _words):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from vrgd_ds.megatron import VROptimizerConfig, get_megatron_optimizer
    from megatron_cases import make_model

    try:
        special = {"pp2": _pipeline_parallel_ddp, "expert": _expert_ddp, "chunks": _two_chunks,
                   "chunks config": _chunks_config, "chunk left out": _chunk_left_out,
                   "checkpoint": _checkpoint}
        if kind in special:
            special[kind](rank)
            return None
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), make_model())
        opt_config = VROptimizerConfig(optimizer="vrlamb", lr=0.01)
        target = {"model": ddp.config, "ddp": ddp.ddp_config, "optimizer": opt_config}[kind]
        with _set(target, field, value):
            get_megatron_optimizer(opt_config, [ddp])
    except (ValueError, NotImplementedError) as e:
        return str(e)
    finally:
        torch.manual_seed(0)
    return None
