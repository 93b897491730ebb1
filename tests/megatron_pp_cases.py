"""vrgd_ds.megatron under pipeline parallelism: 4 gloo CPU ranks, pipeline-parallel 2 x
data-parallel 2, Megatron's own 1F1B schedule (``get_forward_backward_func``, with
``no_sync_func``, ``grad_sync_func`` and ``finalize_model_grads_func`` set as Megatron-LM's
training loop sets them), behind tests/test_megatron_pp.py.

The model is tests/megatron_cases.py's make_model() cut in two: stage 0 holds its first two
layers (6 -> 16 -> 16, tanh), stage 1 the last (16 -> 3) and the loss; the 16 activations
of a micro-batch travel between the stages as Megatron's [sequence 1, micro-batch, hidden
16] tensors. So the float64 reference of the whole model (``float64_reference``) applies:
k = 2 data-parallel ranks x 2 micro-batches = 4 gradient groups per step, the global batch
cut as in tests/megatron_cases.py (data-parallel rank d takes groups 2d, 2d + 1).

Then Megatron's GPTModel (tests/megatron_gpt_cases.py) at pipeline-parallel 2 x
data-parallel 2: its tied word embeddings refused; untied, resumed bit for bit through
Megatron's distributed checkpointing, and the checkpoint loaded by 4 data-parallel ranks
without pipeline parallelism, whose next 2 steps must equal the pipelined run's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cases import HP, STEPS, MCase, _dtype, build, loss_fn, make_model, schedule, split
from megatron_gpt_cases import params as _params
from spawn_ranks import save_results

WORLD, PP, DP = 4, 2, 2

CASES = {
    "vrlamb-do1-ov1-a2": MCase("vrlamb", distributed=True, overlap=True, accum=2),
    "vrlamb-do0-ov0-a2": MCase("vrlamb", distributed=False, overlap=False, accum=2),
    "vradam-do1-ov0-a2-clip": MCase("vradam", distributed=True, overlap=False, accum=2, clip=0.05),
    "lamb-do1-ov1-a2": MCase("lamb", distributed=True, overlap=True, accum=2),
    # a third param group (a learning-rate multiplier of 1 on the first weight: the same
    # update) that stage 1 holds nothing of: a placeholder there (LARS reduces its trust
    # ratios per param group), with FP32Optimizer too
    "vrlars-do0-ov1-a2-clip-3groups": MCase("vrlars", distributed=False, overlap=True, accum=2, clip=0.05,
                                            extra={"three_groups": True}),
    "vrsgd-do1-ov1-a2-3groups": MCase("vrsgd", distributed=True, overlap=True, accum=2,
                                      extra={"three_groups": True}),
    "vrlamb-do1-ov1-a2-pg": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                  extra={"overlap_param_gather": True}),
    "vrlamb-do0-ov1-a2-bf16": MCase("vrlamb", distributed=False, overlap=True, accum=2, extra={"bf16": True}),
    "vrlamb-do1-ov1-a2-fp16": MCase("vrlamb", distributed=True, overlap=True, accum=2, extra={"fp16": True}),
    "vrlamb-do1-ov1-a2-telemetry": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                         extra={"vr_telemetry_interval": 1}),
}


class Stage(torch.nn.Module):
    """This rank's pipeline stage of make_model(): its layers 0-3 (stage 0) or 4 (stage 1),
    under their names there ("net.0.weight", ..., "net.4.bias")."""

    def __init__(self, stage: int):
        super().__init__()
        whole = make_model()
        self.net = whole[:4] if stage == 0 else whole[4:]
        self.pre_process, self.post_process = stage == 0, stage == PP - 1
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # read by the schedule
        self.input_tensor = None

    def set_input_tensor(self, tensor) -> None:  # Megatron's schedule hands over the activations
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, x):
        if self.pre_process:
            return self.net(x).unsqueeze(0)  # [1, micro-batch, 16]
        return self.net(self.input_tensor.squeeze(0))


def _extra(case: MCase, dtype) -> dict:
    extra = {k: v for k, v in case.extra.items() if k != "three_groups"}
    extra["model_config"] = dict(num_layers=PP, hidden_size=16, pipeline_model_parallel_size=PP,
                                 pipeline_dtype=dtype)
    if case.extra.get("three_groups"):
        from megatron.core.optimizer.optimizer_config import ParamKey

        extra["config_overrides"] = {ParamKey(name="*.bias"): {"wd_mult": 0.0},
                                     ParamKey(name="*net.0.weight"): {"lr_mult": 1.0}}
    return extra


def pipeline_step(ddp, step: int, accum: int, dtype, data_world: int = DP) -> None:
    """Zeroed buffers, then one 1F1B pass over this data-parallel rank's micro-batches of
    ``step``, ``finalize_model_grads`` included (Megatron's schedule calls it). ``ddp``: the
    DDP, or the list of model chunks (the interleaved schedule)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    d = parallel_state.get_data_parallel_rank()
    micro = split(step, accum, data_world)[d * accum:(d + 1) * accum]

    def forward_step(data, model):
        x, y = next(data)
        return model(x.to(dtype)), lambda out: (loss_fn(out, y), {})

    chunks = ddp if isinstance(ddp, list) else [ddp]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    data = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)  # interleaved: one per chunk
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=chunks,
                                num_microbatches=accum, seq_length=1, micro_batch_size=len(micro[0][0]),
                                forward_only=False)


def train(ddp, opt, scheduler, accum: int, dtype, steps=range(STEPS), data_world: int = DP) -> list[bool]:
    applied = []
    for step in steps:
        opt.zero_grad()
        pipeline_step(ddp, step, accum, dtype, data_world)
        ok, _, _ = opt.step()
        applied.append(bool(ok))
        if ok:
            scheduler.step(1)
    return applied


def _build(case: MCase, stage: int, dtype=torch.float32, model=None):
    ddp, opt, scheduler = build(case.optimizer, case.distributed, case.overlap, case.clip, _extra(case, dtype),
                                model=Stage(stage) if model is None else model)
    schedule(ddp, opt)
    return ddp, opt, scheduler


def _trained(case: MCase, ddp, opt, scheduler) -> dict:
    """Train ``case`` for STEPS steps on the DDP (or the list of model chunks) and report what the
    tests read: the parameters (fp32), which steps were applied, k, the param groups' sizes and
    placeholders, the layer table's length and the telemetry record."""
    applied = train(ddp, opt, scheduler, case.accum, _dtype(case.extra))
    if case.extra.get("overlap_param_gather"):
        for chunk in ddp if isinstance(ddp, list) else [ddp]:
            chunk.start_param_sync(force_sync=True)  # the last step's all-gather waits for a forward
    inner = opt.chained_optimizers[0].optimizer
    moments = getattr(inner, "moments", None)
    return {"params": {n: p.float() for n, p in _params(ddp).items()},
            "applied": applied, "k": moments.group_count if moments is not None else None,
            "groups": [len(g["params"]) for g in inner.param_groups],
            "placeholders": sum(getattr(p, "_vrgd_ds_placeholder", False) for g in inner.param_groups
                                for p in g["params"]),
            "layers": inner.layout.layer_count, "telemetry": getattr(inner, "telemetry", None)}


def run_case(case: MCase, stage: int) -> dict:
    return _trained(case, *_build(case, stage, _dtype(case.extra)))


# ---- tensor-parallel 2 x pipeline-parallel 2 (data-parallel size 1) ----------------------

TP_PP_CASES = {
    "vrlamb-do1-ov1-a4": MCase("vrlamb", distributed=True, overlap=True, accum=4),
    "vrlars-do0-ov0-a4-clip": MCase("vrlars", distributed=False, overlap=False, accum=4, clip=0.05),
}


class TPStage(Stage):
    """tests/megatron_tp_cases.py's TPModel cut into stages: stage 0 its first two layers,
    split by Megatron's ColumnParallelLinear and RowParallelLinear, stage 1 its whole last."""

    def __init__(self, stage: int):
        from megatron_tp_cases import TPModel

        super().__init__(stage)
        del self.net
        whole = TPModel()
        if stage == 0:
            self.fc1, self.fc2 = whole.fc1, whole.fc2
        else:
            self.fc3 = whole.fc3

    def forward(self, x):
        if self.pre_process:
            h, _ = self.fc1(x)
            h, _ = self.fc2(torch.tanh(h))
            return torch.tanh(h).unsqueeze(0)
        return self.fc3(self.input_tensor.squeeze(0))


def run_tensor_and_pipeline_parallel() -> dict:
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    out = {"ranks": {"tp": parallel_state.get_tensor_model_parallel_rank(), "pp": stage}}
    for cid, case in TP_PP_CASES.items():
        ddp, opt, scheduler = _build(case, stage, model=TPStage(stage))
        out[cid] = {"applied": train(ddp, opt, scheduler, case.accum, torch.float32, data_world=1),
                    "params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
                    "k": opt.chained_optimizers[0].optimizer.moments.group_count}
    return out


def run_nonfinite(stage: int) -> dict:
    """A NaN in stage 1's last bias gradient (every data-parallel rank of that stage): the
    ranks of stage 0, which hold nothing of it, must raise in the same step too, not go on
    into the next step's pipeline transfers and wait there."""
    case = CASES["vrlamb-do0-ov0-a2"]
    ddp, opt, scheduler = _build(case, stage)
    train(ddp, opt, scheduler, case.accum, torch.float32, steps=[0])
    opt.zero_grad()
    pipeline_step(ddp, 1, case.accum, torch.float32)
    if stage == 1:
        ddp.module.net[-1].bias.main_grad[1] = float("nan")
    try:
        opt.step()
        return {"error": None}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _resumed(new_run, accum: int, path_of) -> dict:
    """One file, then sharded: 2 steps, save_optimizer, 2 more ("a"); a new run whose weights
    were moved off, load_optimizer, the same 2 steps ("b"). ``new_run()`` builds a DDP (or a
    list of model chunks), optimizer and scheduler; ``path_of(sharded)`` names the checkpoint."""
    from vrgd_ds.megatron import load_optimizer, save_optimizer

    out = {}
    for sharded in (False, True):
        ddp, opt, scheduler = new_run()
        train(ddp, opt, scheduler, accum, torch.float32, steps=range(2))
        save_optimizer(opt, ddp, path_of(sharded), user_state={"scheduler": scheduler.state_dict()}, sharded=sharded)
        train(ddp, opt, scheduler, accum, torch.float32, steps=range(2, 4))
        a = _params(ddp)
        ddp, opt, scheduler = new_run()
        with torch.no_grad():
            for chunk in ddp if isinstance(ddp, list) else [ddp]:
                for p in chunk.module.parameters():
                    p.add_(1.0)
        scheduler.load_state_dict(load_optimizer(opt, ddp, path_of(sharded))["scheduler"])
        train(ddp, opt, scheduler, accum, torch.float32, steps=range(2, 4))
        out[f"resumed sharded={sharded}"] = (a, _params(ddp))
    return out


def run_checkpoints(stage: int, out_dir: Path) -> dict:
    """save_optimizer / load_optimizer, one checkpoint per stage: resumed bit for bit (one file
    and sharded); the same path for both stages, and another stage's checkpoint, refused."""
    from vrgd_ds.megatron import load_optimizer, save_optimizer

    case = CASES["vrlamb-do1-ov1-a2"]
    out = _resumed(lambda: _build(case, stage), case.accum, lambda sharded: out_dir / f"pp-optimizer-{sharded}-stage{stage}")
    ddp, opt, _ = _build(case, stage)
    same = out_dir / "pp-optimizer-same.pt"
    out["same path"] = _error(lambda: save_optimizer(opt, ddp, same))
    out["same path written"] = same.exists()
    other = out_dir / f"pp-optimizer-False-stage{1 - stage}"
    out["other stage"] = _error(lambda: load_optimizer(opt, ddp, other))
    return out


# ---- virtual pipeline stages: 2 model chunks per pipeline rank ---------------------------

VP = 2
VP_CASES = {
    "vrlamb-do1-ov1-a2": MCase("vrlamb", distributed=True, overlap=True, accum=2),
    "vrlamb-do0-ov0-a2": MCase("vrlamb", distributed=False, overlap=False, accum=2),
    "vradam-do1-ov0-a2-clip": MCase("vradam", distributed=True, overlap=False, accum=2, clip=0.05),
    "vrlars-do0-ov1-a2-clip": MCase("vrlars", distributed=False, overlap=True, accum=2, clip=0.05),
    "lamb-do1-ov1-a2": MCase("lamb", distributed=True, overlap=True, accum=2),
    # the third param group holds virtual stage 0's weight (chunk 0 of pipeline rank 0) only: a
    # placeholder on pipeline rank 1
    "vrsgd-do1-ov1-a2-3groups": MCase("vrsgd", distributed=True, overlap=True, accum=2,
                                      extra={"three_groups": True}),
    "vrlamb-do1-ov1-a2-pg": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                  extra={"overlap_param_gather": True}),
    "vrlamb-do1-ov1-a2-telemetry": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                         extra={"vr_telemetry_interval": 1}),
    "vrlamb-do0-ov1-a2-bf16": MCase("vrlamb", distributed=False, overlap=True, accum=2, extra={"bf16": True}),
    "vrlamb-do1-ov1-a2-fp16": MCase("vrlamb", distributed=True, overlap=True, accum=2, extra={"fp16": True}),
    # 4 micro-batches: the interleaved schedule's steady state (2 have none)
    "vrlamb-do1-ov1-a4": MCase("vrlamb", distributed=True, overlap=True, accum=4),
}


def make_deep():
    """6 -> 16 -> 16 -> 16 -> 3 with tanh: a layer for each of the PP x VP = 4 virtual stages."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


class VirtualStage(Stage):
    """Virtual stage v of make_deep() (Megatron's model chunk v // PP of pipeline rank v % PP):
    its linear layer v and the tanh after it, as "net.0.weight", "net.0.bias"."""

    def __init__(self, v: int):
        super().__init__(0)
        self.net = make_deep()[2 * v:2 * v + 2]
        self.pre_process, self.post_process = v == 0, v == PP * VP - 1

    def forward(self, x):
        h = self.net(x if self.pre_process else self.input_tensor.squeeze(0))
        return h if self.post_process else h.unsqueeze(0)  # [1, micro-batch, 16] to the next stage


def _virtual_build(case: MCase, stage: int, stage_cls=None):
    """Virtual stages ``stage`` and ``stage + PP`` (``stage_cls``, default VirtualStage) as this
    rank's model chunks, built and scheduled as Megatron-LM does for the interleaved schedule:
    ``overlap_p2p_comm`` on, so ``batch_p2p_comm`` off. (With megatron-core's default
    ``batch_p2p_comm=True`` at pipeline size 2, where the next and previous stage are the same
    rank, a steady-state step's batched sends to that rank do not pair with its receives on
    gloo: the gradients came out wrong by up to 300x with 4 micro-batches, before any
    optimizer saw them. 2 micro-batches have no steady state.)"""
    chunks = [(stage_cls or VirtualStage)(c * PP + stage) for c in range(VP)]
    extra = _extra(case, _dtype(case.extra))
    extra["model_config"].update(num_layers=PP * VP, virtual_pipeline_model_parallel_size=VP,
                                 overlap_p2p_comm=True, batch_p2p_comm=False)
    ddps, opt, scheduler = build(case.optimizer, case.distributed, case.overlap, case.clip, extra, model=chunks)
    schedule(ddps, opt)
    return ddps, opt, scheduler


def run_virtual(stage: int, out_dir: Path) -> dict:
    """Megatron's interleaved schedule over 2 chunks per pipeline rank (virtual stages 0-3: this
    rank's chunks are stages ``stage`` and ``stage + PP``): every case against the float64
    reference; then save_optimizer / load_optimizer with the chunk list (bit for bit), and a
    1-chunk run refused the 2-chunk checkpoint; given the first chunk only, both refuse."""
    from vrgd_ds.megatron import load_optimizer, save_optimizer

    out: dict = {}
    for cid, case in VP_CASES.items():
        out[cid] = _trained(case, *_virtual_build(case, stage))
    case = VP_CASES["vrlamb-do1-ov1-a2"]
    out.update(_resumed(lambda: _virtual_build(case, stage), case.accum,
                        lambda sharded: out_dir / f"vp-optimizer-{sharded}-stage{stage}"))
    ddps, opt, _ = _virtual_build(case, stage)
    first_only = out_dir / f"vp-first-chunk-stage{stage}.pt"
    out["first chunk given"] = (_error(lambda: save_optimizer(opt, ddps[0], first_only)), first_only.exists(),
                                _error(lambda: load_optimizer(opt, ddps[0], out_dir / f"vp-optimizer-False-stage{stage}")))
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, PP)
    ddp, opt, _ = _build(case, stage)
    out["one chunk"] = _error(lambda: load_optimizer(opt, ddp, out_dir / f"vp-optimizer-False-stage{stage}"))
    return out


def _error(fn) -> str | None:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# ---- Megatron's GPTModel ----------------------------------------------------------------


def run_gpt(out_dir: Path) -> dict:
    from megatron.core import parallel_state

    import megatron_gpt_cases as gpt

    out = {"tied": _error(lambda: gpt.build(1, pp=PP, tied=True))}
    ddp, opt = gpt.build(1, pp=PP)
    out["names"] = sorted(n for n, _ in ddp.module.named_parameters())
    gpt.train(ddp, opt, gpt.FIRST, accum=2)
    gpt.save(out_dir / "gpt-pp.dist", ddp, opt)
    gpt.train(ddp, opt, gpt.REST, accum=2)
    out["a"] = gpt.params(ddp)
    gpt.save(out_dir / "gpt-pp-a.dist", ddp)
    ddp, opt = gpt.build(1, pp=PP, moved_off=True)
    gpt.load(out_dir / "gpt-pp.dist", ddp, opt)
    gpt.train(ddp, opt, gpt.REST, accum=2)
    out["b"] = gpt.params(ddp)
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(1, 1)
    ddp, opt = gpt.build(1, moved_off=True, tied=False)
    out["loaded model"] = gpt.load(out_dir / "gpt-pp.dist", ddp, opt)
    out["loaded"] = {k: v.detach().clone() for k, v in ddp.module.state_dict().items() if torch.is_tensor(v)}
    gpt.train(ddp, opt, gpt.REST, accum=1)
    out["pp1"] = gpt.params(ddp)
    ddp, _ = gpt.build(1, tied=False)
    gpt.load(out_dir / "gpt-pp-a.dist", ddp)
    out["pp1 a"] = gpt.params(ddp)
    parallel_state.destroy_model_parallel()
    return out


def run_gpt_virtual(out_dir: Path) -> dict:
    """The untied GPT with 4 layers, 2 model chunks per pipeline rank (a layer each), through
    Megatron's distributed checkpointing: resumed bit for bit, and loaded by 4 data-parallel
    ranks with one chunk and no pipeline parallelism."""
    from megatron.core import parallel_state

    import megatron_gpt_cases as gpt

    parallel_state.initialize_model_parallel(1, PP, virtual_pipeline_model_parallel_size=VP)
    build = lambda moved_off=False: gpt.build(1, moved_off, pp=PP, vp=VP, layers=4)  # noqa: E731
    chunks, opt = build()
    gpt.train(chunks, opt, gpt.FIRST, accum=2)
    gpt.save(out_dir / "gpt-vp.dist", chunks, opt)
    gpt.train(chunks, opt, gpt.REST, accum=2)
    out = {"a": gpt.params(chunks)}
    gpt.save(out_dir / "gpt-vp-a.dist", chunks)
    chunks, opt = build(moved_off=True)
    gpt.load(out_dir / "gpt-vp.dist", chunks, opt)
    gpt.train(chunks, opt, gpt.REST, accum=2)
    out["b"] = gpt.params(chunks)
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(1, 1)
    ddp, opt = gpt.build(1, moved_off=True, tied=False, layers=4)
    out["loaded model"] = gpt.load(out_dir / "gpt-vp.dist", ddp, opt)
    out["loaded"] = {k: v.detach().clone() for k, v in ddp.module.state_dict().items() if torch.is_tensor(v)}
    gpt.train(ddp, opt, gpt.REST, accum=1)
    out["pp1"] = gpt.params(ddp)
    ddp, _ = gpt.build(1, tied=False, layers=4)
    gpt.load(out_dir / "gpt-vp-a.dist", ddp)
    out["pp1 a"] = gpt.params(ddp)
    parallel_state.destroy_model_parallel()
    return out


# ---- tensor-parallel 2 x pipeline-parallel 2 x 2 virtual stages (data-parallel size 1) ----

TP_VP_CASES = {
    "vrlamb-do1-ov1-a4": MCase("vrlamb", distributed=True, overlap=True, accum=4),
    "vradam-do0-ov0-a4-clip": MCase("vradam", distributed=False, overlap=False, accum=4, clip=0.05),
}


class TPVirtualStage(Stage):
    """Virtual stage v of make_deep() (as VirtualStage), its layer ``fc`` split over the
    tensor-parallel ranks by Megatron's own layers: stages 0 and 2 by rows
    (ColumnParallelLinear, output gathered), stage 1 by columns (RowParallelLinear, input
    scattered, bias whole); stage 3 whole on every rank."""

    def __init__(self, v: int):
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__(0)
        del self.net
        whole = make_deep()[2 * v]
        self.pre_process, self.post_process = v == 0, v == PP * VP - 1
        if self.post_process:
            self.fc = whole
            return
        tp = parallel_state.get_tensor_model_parallel_world_size()
        t = parallel_state.get_tensor_model_parallel_rank()
        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
        shape = dict(config=config, init_method=torch.nn.init.zeros_, bias=True)  # the weights: set below
        if v % 2 == 0:
            self.fc = ColumnParallelLinear(whole.in_features, whole.out_features, gather_output=True, **shape)
            weight, bias = whole.weight.chunk(tp, 0)[t], whole.bias.chunk(tp, 0)[t]
        else:
            self.fc = RowParallelLinear(whole.in_features, whole.out_features, input_is_parallel=False,
                                        skip_bias_add=False, **shape)
            weight, bias = whole.weight.chunk(tp, 1)[t], whole.bias
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x):
        h = self.fc(x if self.pre_process else self.input_tensor.squeeze(0))
        h = h[0] if isinstance(h, tuple) else h  # Megatron's layers return (output, bias)
        return h if self.post_process else torch.tanh(h).unsqueeze(0)


def run_tensor_and_virtual_pipeline() -> dict:
    """Megatron's interleaved schedule with tensor-parallel layers: 2 chunks per pipeline rank
    (virtual stages ``stage`` and ``stage + PP``), each chunk's layer split over 2
    tensor-parallel ranks (TPVirtualStage)."""
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    out = {"ranks": {"tp": parallel_state.get_tensor_model_parallel_rank(), "pp": stage}}
    for cid, case in TP_VP_CASES.items():
        ddps, opt, scheduler = _virtual_build(case, stage, TPVirtualStage)
        inner = opt.chained_optimizers[0].optimizer
        out[cid] = {"applied": train(ddps, opt, scheduler, case.accum, torch.float32, data_world=1),
                    "params": _params(ddps), "k": inner.moments.group_count, "layers": inner.layout.layer_count}
    return out


def worker(rank, init_file, out_dir):
    from megatron_cpu import start_gloo_worker

    start_gloo_worker(rank, init_file, out_dir, WORLD)
    from megatron.core import parallel_state

    out_dir = Path(out_dir)

    def compute():
        parallel_state.initialize_model_parallel(1, PP)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        results = {"ranks": {"pp": stage, "dp": parallel_state.get_data_parallel_rank()}}
        results.update({cid: run_case(case, stage) for cid, case in CASES.items()})
        results["nonfinite"] = run_nonfinite(stage)
        results["checkpoints"] = run_checkpoints(stage, out_dir)
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(1, PP, virtual_pipeline_model_parallel_size=VP)
        results["virtual"] = run_virtual(stage, out_dir)
        # the telemetry case without pipeline parallelism: 4 data-parallel ranks, 1 micro-batch each
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(1, 1)
        from megatron_cases import train as dp_train

        case = CASES["vrlamb-do1-ov1-a2-telemetry"]
        ddp, opt, scheduler = build(case.optimizer, True, True, 0.0, dict(case.extra))
        dp_train(rank, ddp, opt, scheduler, 1)
        results["telemetry dp4"] = opt.chained_optimizers[0].optimizer.telemetry
        case = VP_CASES["vrlamb-do1-ov1-a2-telemetry"]  # the same for the virtual stages' model
        ddp, opt, scheduler = build(case.optimizer, True, True, 0.0, dict(case.extra), model=make_deep())
        dp_train(rank, ddp, opt, scheduler, 1)
        results["telemetry dp4 deep"] = opt.chained_optimizers[0].optimizer.telemetry
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(1, PP)
        results["gpt"] = run_gpt(out_dir)
        results["gpt virtual"] = run_gpt_virtual(out_dir)
        parallel_state.initialize_model_parallel(2, PP)
        results["tp pp"] = run_tensor_and_pipeline_parallel()
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(2, PP, virtual_pipeline_model_parallel_size=VP)
        results["tp vp"] = run_tensor_and_virtual_pipeline()
        parallel_state.destroy_model_parallel()
        return results

    save_results(out_dir, rank, compute)
    dist.barrier()
    dist.destroy_process_group()


__all__ = ["CASES", "DP", "HP", "PP", "TP_PP_CASES", "TP_VP_CASES", "VP", "VP_CASES", "WORLD", "make_deep",
           "worker"]
