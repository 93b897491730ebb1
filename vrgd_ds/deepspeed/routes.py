"""Which DeepSpeed routes vrgd-ds runs, decided once per engine at initialize.

:func:`decide` takes the plain :class:`~.seam.EngineFacts` of an engine whose optimizer
wrapper DeepSpeed has just built and returns the route, or raises :class:`RouteRefused`
naming the setting and the supported alternative. Every route it returns is covered by the
parity tests against the float64 reference (tests/test_deepspeed_zero.py); the table in
docs and README ("route -> supported / refused") is :data:`ROUTE_TABLE`.

``kind`` is "vr" for the VR optimizers (they need the squared gradients) and "layer" for
NVLAMB and LARS (they need whole-layer norms across partitions only).
"""

from __future__ import annotations

from .seam import EngineFacts

MIN_GROUPS = 8  # the paper asks for k >= 8 gradient groups


class RouteRefused(NotImplementedError):
    pass


ROUTE_TABLE = [
    ("ZeRO stage 0, fp32", "supported", "all"),
    ("ZeRO stage 0, fp16 / bf16", "refused",
     "DeepSpeed's wrapper steps the optimizer with zero gradients while built; use stage 1 or 2"),
    ("ZeRO stage 1 / 2: fp32, bf16, fp16 with dynamic loss scaling", "supported", "all"),
    ("ZeRO-2 overlap_comm, contiguous_gradients, reduce_scatter, round_robin_gradients", "supported", "all"),
    ("several param groups (decay / no-decay, exclude_from_adaptation), frozen parameters",
     "supported", "all"),
    ("client optimizer instance or callable in deepspeed.initialize", "supported", "all"),
    ("torch_autocast bf16", "supported", "all, stages 0 to 3"),
    ("torch_autocast fp16 (GradScaler)", "refused", "it unscales and skips per rank; use bf16 autocast"),
    ("bf16 + data_types.grad_accum_dtype fp32 at stage 1 (BF16_Optimizer)", "refused",
     "its flat partitions are not hooked; use stage 2"),
    ("ZeRO stage 3: fp32, bf16, fp16 with dynamic loss scaling, several sub-groups (sub_group_size)",
     "supported", "all"),
    ("offload_optimizer / offload_param (any stage), MiCS, ZeRO++ hpZ", "refused",
     "not covered by the exactness tests"),
    ("MoE, pipeline, tensor / sequence parallelism, ZeRO++ quantization, ZenFlow, DeepCompile",
     "refused", "other process groups reduce the gradients"),
    ("engine.coalesce_grad_reduction(), engine.no_sync()", "refused",
     "VR: micro-step squares would be lost; NVLAMB/LARS: not covered by the tests"),
    ("engine.compile() (the module compiled with torch.compile)", "supported", "all, stages 0 to 3"),
    ("engine.compile(compiled_autograd_enabled=True)", "refused",
     "Dynamo would trace DeepSpeed's gradient hooks and the squares' reduction in them"),
    ("managed_gradient_accumulation false", "refused for VR", "the number of groups per step is not fixed"),
    ("elastic_checkpoint, consolidated checkpoints across world sizes", "supported", "all"),
]


def _refuse(name: str, setting: str, why: str, fix: str) -> RouteRefused:
    return RouteRefused(f"optimizer type {name!r} with {setting}: {why}; {fix}")


def decide(f: EngineFacts, kind: str) -> str:
    """The route name for an engine, or :class:`RouteRefused`."""
    name = f.optimizer_name
    if f.stage > 3:
        raise _refuse(name, f"zero_optimization.stage {f.stage}", "DeepSpeed's ZeRO stages are 0 to 3",
                      "set zero_optimization.stage to 0, 1, 2 or 3")
    if f.offload_optimizer or f.offload_param:
        raise _refuse(name, "zero_optimization.offload_optimizer / offload_param",
                      "offload is not supported by vrgd-ds", "remove the offload settings")
    for on, setting, why in (
        (f.moe, "MoE layers", "expert parameters are reduced over expert-parallel groups the adapter does not see"),
        (f.pipeline, "pipeline parallelism (PipelineModule)",
         "tied layers' gradients are summed across stages outside the ZeRO buckets"),
        (f.tensor_parallel > 1, f"tensor / model parallelism of size {f.tensor_parallel}",
         "a layer split across model-parallel ranks needs its norms reduced over that group too"),
        (f.sequence_parallel > 1, f"sequence_parallel_size {f.sequence_parallel}",
         "sequence-parallel ranks share samples, so a rank's gradient is not one gradient group"),
        (f.quantized, "zero_quantized_weights / zero_quantized_gradients (ZeRO++)",
         "quantized gradient reduction bypasses the buckets the squares are reduced beside"),
        (f.hpz_partition_size > 1, f"zero_hpz_partition_size {f.hpz_partition_size} (ZeRO++ hpZ)",
         "secondary parameter partitions are not covered by vrgd-ds's exactness tests"),
        (f.zenflow, "ZenFlow", "its optimizer step runs outside the hooked ZeRO step"),
        (f.deepcompile, "DeepCompile", "compiled graphs reduce the gradients outside the hooked buckets"),
    ):
        if on:
            raise _refuse(name, setting, f"not supported by vrgd-ds ({why})", "remove that setting")
    if f.wrapper == "bf16_optimizer":
        raise _refuse(name, "bf16 and data_types.grad_accum_dtype fp32 at zero_optimization.stage 1",
                      "DeepSpeed runs these with its BF16_Optimizer, whose flat partitions vrgd-ds does not "
                      "hook (a trust ratio would span a rank's whole partition)",
                      "use zero_optimization.stage 2, or stage 1 without data_types.grad_accum_dtype")
    if f.autocast_dtype not in (None, "bfloat16"):
        raise _refuse(name, f"torch_autocast dtype {f.autocast_dtype}",
                      "its GradScaler unscales and skips steps per rank, outside DeepSpeed's loss scaler",
                      "use torch_autocast with dtype bfloat16, or DeepSpeed's fp16 section")
    low = "fp16" if f.fp16 else "bf16" if f.bf16 else None
    refuse_before_wrapper(name, f.stage, low)
    if f.wrapper not in ("none", "zero", "zero3"):
        raise _refuse(name, f"DeepSpeed optimizer wrapper {f.wrapper}", "this wrapper is not supported",
                      "use ZeRO stage 0, 1, 2 or 3 with fp32, bf16 or fp16")
    if kind == "vr":
        if not f.managed_accumulation:
            raise _refuse(name, "managed_gradient_accumulation false",
                          "the number of gradient groups per step must be fixed for the variance",
                          "remove managed_gradient_accumulation (DeepSpeed's default is true)")
    if f.stage == 0:
        return "stage 0" + (f" {low}" if low else "")
    return f"ZeRO-{f.stage}" + (f" {low}" if low else "")


def refuse_before_wrapper(name: str, stage: int, low: str | None) -> None:
    """Routes refused before DeepSpeed builds its wrapper (the wrapper would already step)."""
    if stage == 0 and low:
        raise _refuse(name, f"{low} and zero_optimization.stage 0",
                      f"DeepSpeed's {low} wrapper at stage 0 (FP16_UnfusedOptimizer) takes an optimizer step "
                      "with zero gradients while it is built, which moves the weights under weight decay and "
                      "advances the step counts, and its fp32 copies are not hooked for the squared gradients",
                      "set zero_optimization.stage to 1 or 2 (or train in fp32 / torch_autocast bf16 at stage 0)")


def group_count_advice(f: EngineFacts) -> str | None:
    """A warning when k = ranks x accumulation is below the paper's 8, else None."""
    k = f.dp_world * f.accumulation
    if k >= MIN_GROUPS:
        return None
    return (f"vrgd-ds: the GSNR is estimated from k = {f.dp_world} data-parallel ranks x {f.accumulation} "
            f"gradient accumulation steps = {k} gradient groups; the paper asks for k >= {MIN_GROUPS}, and with "
            "k = 2 fp32 cancellation in s - gbar^2 moves results by 1e-4..1e-3. Raise k with more ranks or a "
            "larger gradient_accumulation_steps (same global batch: a smaller "
            "train_micro_batch_size_per_gpu).")


def refuse_compiled_autograd(name: str) -> RouteRefused:
    return _refuse(name, "engine.compile(compiled_autograd_enabled=True)",
                   "compiled autograd traces DeepSpeed's gradient-reduction hooks, where vrgd-ds reduces "
                   "the squared gradients and checks the buckets; Dynamo failed there on some ranks and "
                   "not on others (a hang), and at ZeRO-3 on DeepSpeed's own code",
                   "call engine.compile() without it (the module compiled: supported at stages 0 to 3)")


def refuse_context(name: str, context: str, kind: str) -> RouteRefused:
    why = ("a VR optimizer needs each micro-step's gradient squared before the micro-steps are summed, "
           f"which {context} prevents" if kind == "vr" else
           f"the gradient accumulation of {context} is not covered by vrgd-ds's exactness tests")
    return RouteRefused(f"optimizer type {name!r} with {context}: {why}; train without it (plain gradient "
                        "accumulation through gradient_accumulation_steps gives the same gradient groups)")
