"""Megatron's own GPTModel, VR-LAMB and distributed checkpointing on 4 gloo CPU ranks
(behind tests/test_megatron_gpt_checkpoint.py).

The model is megatron.core's ``GPTModel`` with the local (non-Transformer-Engine) layer spec:
2 layers, SwiGLU MLP (its fc1 weight is saved through Megatron's ShardedTensorFactory),
learned position embeddings, the output layer tied to the word embeddings, no linear biases (as LLaMA-style GPTs;
the attention's key bias would have a zero gradient, whose fp32 rounding noise Adam-type
updates scale up, and through the layer's trust ratio the other elements' too, differently
in each tensor-parallel layout); its sharded state dict stacks the layers along a prepended
axis and pads the vocabulary (``allow_shape_mismatch``), as a Megatron-LM GPT does. Dropout
is off.

Phase 1, tensor-parallel 2 x data-parallel 2, distributed optimizer, 2 micro-batches per rank:
2 steps, ``dist_checkpointing.save`` of the model and optimizer, 2 more steps ("a"), and the
model alone saved again (for the comparison below); a new run whose weights were moved off
loads the checkpoint and takes the same 2 steps ("b").

Phase 2, 4 data-parallel ranks without tensor parallelism, 1 micro-batch each (the same 4
gradient groups per step): the phase-1 checkpoint is loaded (the optimizer's fp32 weights
must equal the model weights Megatron's own loading put together), the same 2 steps are
taken, and the result is compared with phase 1's "a", loaded into this layout by Megatron.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cases import schedule
from spawn_ranks import save_results

WORLD, TP, VOCAB, SEQ, MICRO = 4, 2, 64, 8, 2
FIRST, REST = (0, 1), (2, 3)


def build(tp: int, moved_off: bool = False, pp: int = 1, tied: bool | None = None, vp: int | None = None,
          layers: int = 2):
    """The GPT at tensor-parallel size ``tp`` and pipeline-parallel size ``pp`` (this rank's
    stage), its output layer tied to the word embeddings (default: without pipeline
    parallelism only), DDP with the distributed optimizer, VR-LAMB. ``vp``: virtual pipeline
    stages, ``vp`` model chunks on this rank (the DDPs are returned as a list)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from vrgd_ds.megatron import VROptimizerConfig, get_megatron_optimizer

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)  # dropout is off; no CUDA RNG on a CPU
    config = TransformerConfig(
        num_layers=layers, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, use_cpu_initialization=True, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, virtual_pipeline_model_parallel_size=vp,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                               bucket_size=700)
    chunks = []
    for c in range(vp or 1):
        v = {} if vp is None else {"ignore_virtual": False, "vp_stage": c}
        model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                         share_embeddings_and_output_weights=pp == 1 if tied is None else tied,
                         pre_process=parallel_state.is_pipeline_first_stage(**v),
                         post_process=parallel_state.is_pipeline_last_stage(**v),
                         **({} if vp is None else {"vp_stage": c}))
        chunks.append(DistributedDataParallel(config, ddp_config, model, disable_bucketing=c > 0))
    opt = get_megatron_optimizer(VROptimizerConfig(optimizer="vrlamb", lr=0.01, weight_decay=0.01, clip_grad=0.0,
                                                   use_distributed_optimizer=True), chunks)
    schedule(chunks, opt)
    if moved_off:
        with torch.no_grad():
            for ddp in chunks:
                for p in ddp.module.parameters():
                    p.add_(1.0)
    return (chunks if vp else chunks[0]), opt


def tokens(step: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + micro)
    return torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)


def train(ddp, opt, steps, accum: int) -> None:
    """Megatron's schedule (``get_forward_backward_func``: without pipeline parallelism,
    micro-batches with no_sync but the last; with it, 1F1B), ``finalize_model_grads`` in it,
    then the step; data-parallel rank d takes micro-batches d*accum .. d*accum + accum - 1."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    d = parallel_state.get_data_parallel_rank()
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    pos = torch.arange(SEQ).unsqueeze(0).expand(MICRO, SEQ)

    def forward_step(data, model):
        t = next(data)
        return model(t[:, :-1], pos, mask, labels=t[:, 1:]), lambda out: (out.float().mean(), {})

    chunks = ddp if isinstance(ddp, list) else [ddp]
    for step in steps:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        micro = [tokens(step, d * accum + j) for j in range(accum)]
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1
            else iter(micro), model=chunks, num_microbatches=accum, seq_length=SEQ, micro_batch_size=MICRO,
            forward_only=False)
        ok, _, _ = opt.step()
        assert ok


def sharded(ddp) -> dict:
    """The model's sharded state dict; of several chunks, under model0, model1, ... as Megatron-LM
    saves them."""
    if isinstance(ddp, list):
        return {f"model{c}": d.module.sharded_state_dict() for c, d in enumerate(ddp)}
    return ddp.module.sharded_state_dict()


def save(folder: Path, ddp, opt=None) -> None:
    from megatron.core import dist_checkpointing

    folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sd = {"model": sharded(ddp)}
    if opt is not None:
        sd["optimizer"] = opt.sharded_state_dict(sd["model"])
    dist_checkpointing.save(sd, str(folder))


def load(folder: Path, ddp, opt=None) -> dict:
    """Megatron-LM's load_checkpoint for torch_dist; returns the model weights Megatron loaded."""
    from megatron.core import dist_checkpointing

    sd = {"model": sharded(ddp)}
    if opt is not None:
        sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=True)
    loaded = dist_checkpointing.load(sd, str(folder))
    if isinstance(ddp, list):
        weights = {f"model{c}.{k}": v.detach().clone() for c in range(len(ddp))
                   for k, v in loaded["model"][f"model{c}"].items() if torch.is_tensor(v)}
        for c, d in enumerate(ddp):
            d.module.load_state_dict(loaded["model"][f"model{c}"], strict=False)
    else:
        weights = {k: v.detach().clone() for k, v in loaded["model"].items() if torch.is_tensor(v)}
        ddp.module.load_state_dict(loaded["model"], strict=False)
    if opt is not None:
        opt.load_state_dict(loaded["optimizer"])
    return weights


def params(ddp) -> dict:
    """The parameters by name; of a list of model chunks, chunk c's as ``model<c>.<name>``."""
    if isinstance(ddp, list):
        return {f"model{c}.{n}": p.detach().clone() for c, d in enumerate(ddp) for n, p in d.module.named_parameters()}
    return {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


def worker(rank, init_file, out_dir):
    from megatron_cpu import start_gloo_worker

    start_gloo_worker(rank, init_file, out_dir, WORLD)
    from megatron.core import parallel_state

    out_dir = Path(out_dir)

    def compute():
        parallel_state.initialize_model_parallel(TP, 1)
        out = {"tp rank": parallel_state.get_tensor_model_parallel_rank()}
        ddp, opt = build(TP)
        train(ddp, opt, FIRST, accum=2)
        save(out_dir / "gpt.dist", ddp, opt)
        train(ddp, opt, REST, accum=2)
        out["a"] = params(ddp)
        save(out_dir / "gpt-a.dist", ddp)
        ddp, opt = build(TP, moved_off=True)
        load(out_dir / "gpt.dist", ddp, opt)
        train(ddp, opt, REST, accum=2)
        out["b"] = params(ddp)
        parallel_state.destroy_model_parallel()

        parallel_state.initialize_model_parallel(1, 1)
        ddp, opt = build(1, moved_off=True)
        out["loaded model"] = load(out_dir / "gpt.dist", ddp, opt)
        out["loaded"] = {k: v.detach().clone() for k, v in ddp.module.state_dict().items() if torch.is_tensor(v)}
        train(ddp, opt, REST, accum=1)
        out["tp1"] = params(ddp)
        ddp, _ = build(1)
        load(out_dir / "gpt-a.dist", ddp)
        out["tp1 a"] = params(ddp)
        parallel_state.destroy_model_parallel()
        return out

    save_results(out_dir, rank, compute)
    dist.barrier()
    dist.destroy_process_group()


def check_resharded(model: dict, after: dict, got: dict, want: dict) -> None:
    """A checkpoint loaded in another parallel layout: the model weights after the optimizer's
    load (``after``) are those Megatron's own loading read (``model``); the steps after it
    (``got``) equal the saving layout's run (``want``, loaded into this layout by Megatron) to
    float32 rounding, and did train."""
    assert sorted(model) == sorted(after)
    for k in model:
        torch.testing.assert_close(after[k], model[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert sorted(got) == sorted(want)
    for n, p in got.items():
        torch.testing.assert_close(p, want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert any(not torch.equal(got[n], after[n]) for n in got if n in after)  # it did train
