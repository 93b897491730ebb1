"""One test matrix over every optimizer, against the float64 reference in reference.py."""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field

import pytest
import torch

from vrgd_ds import LAMB, LARS, MicroStepMoments, VRAdam, VRAdamW, VRLAMB, VRLARS, VRMomentum, VRSGD
from vrgd_ds.optim import flat

from reference import Reference, group_grads, max_rel_err

K = 8
DEVICE = os.environ.get("VRGD_TEST_DEVICE", "cpu")  # benchmarks/gpu_check.sh runs the matrix on "cuda"
# foreach / loop: torch's multi-tensor / per-tensor updates for the torch-based optimizers, the
# flat kernels eagerly; default: no flags (torch's fused update, compiled flat kernels); rows:
# flat kernels with 4-element rows (the tiny model then runs through the row blocks, not
# only the edge elements), eagerly; compiled: the same, compiled
MODES = ["foreach", "loop"]
ALL_MODES = [*MODES, "default", "rows", "compiled"]
ROW_MODES = ("rows", "compiled", "compile")
IMPL = {"foreach": dict(foreach=True, compile=False), "loop": dict(foreach=False, compile=False), "default": {},
        "rows": dict(compile=False), "compiled": dict(compile=True), "compile": dict(compile=True)}


@pytest.fixture(autouse=True)
def short_rows(request, monkeypatch):
    """Row modes: 4-element rows, so the 53-parameter model exercises blocks and edges."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("mode") in ROW_MODES:
        monkeypatch.setattr(flat, "ROW", 4)


def twin_impl(spec, mode):
    """The implementation a VR optimizer with gamma = 1 must equal bit for bit in ``mode``: torch's
    fused, foreach or per-tensor update, or our LAMB/LARS with the same flat kernels."""
    if spec.base in ("lamb", "lars"):
        return IMPL[mode]
    return {"foreach": dict(foreach=True), "loop": dict(foreach=False)}.get(mode, dict(fused=True))


@dataclass
class Spec:
    name: str
    cls: type
    kwargs: dict
    base: str
    ref_hp: dict
    torch_twin: object = None  # gamma=1 must equal this optimizer bit for bit (kwargs: twin_impl)
    vr: bool = True
    beta3: float = 0.0
    extra: dict = field(default_factory=dict)


SPECS = [
    Spec("VRSGD", VRSGD, dict(lr=0.2, weight_decay=0.01), "sgd", dict(lr=0.2, weight_decay=0.01),
         lambda ps, kw: torch.optim.SGD(ps, lr=0.2, weight_decay=0.01, **kw)),
    Spec("VRMomentum", VRMomentum, dict(lr=0.05, momentum=0.9, weight_decay=0.01), "sgd",
         dict(lr=0.05, momentum=0.9, weight_decay=0.01),
         lambda ps, kw: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, **kw)),
    Spec("VRMomentum-nesterov", VRMomentum, dict(lr=0.05, momentum=0.9, nesterov=True), "sgd",
         dict(lr=0.05, momentum=0.9, nesterov=True),
         lambda ps, kw: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, **kw)),
    Spec("VRAdam", VRAdam, dict(lr=0.01, weight_decay=0.01), "adam", dict(lr=0.01, weight_decay=0.01),
         lambda ps, kw: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01, **kw), beta3=0.9),
    Spec("VRAdamW", VRAdamW, dict(lr=0.01, weight_decay=0.1), "adam",
         dict(lr=0.01, weight_decay=0.1, decoupled=True),
         lambda ps, kw: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, **kw), beta3=0.9),
    Spec("VRLAMB", VRLAMB, dict(lr=0.02, weight_decay=0.01), "lamb", dict(lr=0.02, weight_decay=0.01),
         lambda ps, kw: LAMB(ps, lr=0.02, weight_decay=0.01, **kw), beta3=0.9),
    Spec("VRLARS", VRLARS, dict(lr=2.0, weight_decay=1e-3), "lars", dict(lr=2.0, weight_decay=1e-3),
         lambda ps, kw: LARS(ps, lr=2.0, weight_decay=1e-3, **kw)),
    Spec("LAMB", LAMB, dict(lr=0.02, weight_decay=0.01), "lamb", dict(lr=0.02, weight_decay=0.01), vr=False),
    Spec("LARS", LARS, dict(lr=2.0, weight_decay=1e-3), "lars", dict(lr=2.0, weight_decay=1e-3), vr=False),
]
VR_SPECS = [s for s in SPECS if s.vr]
IDS = [s.name for s in SPECS]


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(DEVICE, dtype)


def batch(step, dtype=torch.float32, n=64):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 6, generator=gen)
    y = torch.randn(n, 3, generator=gen) + x[:, :3]
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype)


def loss_fn(out, y):
    return torch.nn.functional.mse_loss(out, y)


def make_opt(spec, params, mode="foreach", moments=None, **over):
    kw = dict(spec.kwargs, **IMPL[mode], **over)
    if spec.vr:
        kw["moments"] = moments
    return spec.cls(params, **kw)


def micro_steps(model, step, k=K, dtype=torch.float32):
    x, y = batch(step, dtype)
    for xb, yb in zip(x.chunk(k), y.chunk(k)):
        (loss_fn(model(xb), yb) / k).backward()


def train(spec, model, steps, mode="foreach", start=0, opt=None, moments=None, **over):
    moments = moments or MicroStepMoments(model.parameters())
    opt = opt or make_opt(spec, model.parameters(), mode, moments, **over)
    for s in range(start, start + steps):
        micro_steps(model, s, dtype=next(model.parameters()).dtype)
        opt.step()
        opt.zero_grad()
    return opt


def set_route(opt, mode):
    for group in opt.param_groups:
        group.update({"foreach": None, "compile": None, **IMPL[mode]})


def resume(spec, model, opt, steps, mode):
    """A new model and optimizer in ``mode`` from the state dicts of ``model`` and ``opt``
    (whose param groups hold their own mode), trained ``steps`` more."""
    resumed = make_model(next(model.parameters()).dtype, seed=123)
    resumed.load_state_dict(copy.deepcopy(model.state_dict()))
    moments = MicroStepMoments(resumed.parameters())
    opt2 = make_opt(spec, resumed.parameters(), mode, moments)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    set_route(opt2, mode)
    start = int(opt2.param_groups[0]["step"])
    return resumed, train(spec, resumed, steps, start=start, opt=opt2, moments=moments)


def reference_run(spec, steps, dtype=torch.float32, hp_per_param=None, gamma=0.1):
    model = make_model(torch.float32)
    if dtype != torch.float32:  # start from the same (rounded) weights
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    ref = Reference(list(model.parameters()), spec.base, gamma=gamma if spec.vr else None,
                    beta3=spec.beta3, **spec.ref_hp)
    return ref.run(model, loss_fn, batch, steps, K, hp_per_param)


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_matches_reference_fp32(spec, mode):
    model = make_model()
    train(spec, model, 6, mode)
    assert max_rel_err(list(model.parameters()), reference_run(spec, 6)) < 2e-5


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name in ("VRLAMB", "VRLARS", "VRAdamW")],
                         ids=lambda s: s.name)
def test_compiled_matches_reference(spec):
    model = make_model()
    train(spec, model, 4, "compile")
    assert max_rel_err(list(model.parameters()), reference_run(spec, 4)) < 2e-5


@pytest.mark.parametrize("how", ["compiled model", "compiled autograd"])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.name in ("VRLAMB", "VRAdamW", "LAMB")],
                         ids=lambda s: s.name)
def test_compiled_model_matches_reference(spec, how):
    """torch.compile on the user's model, also with compiled autograd (the backward traced, our
    hooks in it: Dynamo breaks the graph there): each micro-step's gradient still reaches the
    squares and is handed over, so nothing is gathered after the first step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, model.parameters(), "default", moments)
    compiled = torch.compile(model)

    def backward():
        if how == "compiled autograd":
            return torch._dynamo.compiled_autograd._enable(torch.compile)
        return contextlib.nullcontext()

    moved = []
    for step in range(4):
        x, y = batch(step)
        for xb, yb in zip(x.chunk(K), y.chunk(K)):
            loss = loss_fn(compiled(xb), yb) / K
            with backward():
                loss.backward()
        opt.step()
        moved.append(opt._buckets[0][1][0].moved.get("g"))
        opt.zero_grad()
    captured = counters["compiled_autograd"]["captures"]
    torch._dynamo.reset()
    assert (captured > 0) == (how == "compiled autograd"), captured
    assert moved[1:] == [0] * 3, moved
    assert max_rel_err(list(model.parameters()), reference_run(spec, 4)) < 2e-5


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_bf16_params_follow_fp32_reference(spec):
    model = make_model(torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    train(spec, model, 4, "foreach")
    ref = reference_run(spec, 4, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    moved = max_rel_err(start, ref)
    err = max_rel_err(list(model.parameters()), ref)
    assert err < 0.05 and err < 0.5 * moved, (err, moved)


@pytest.mark.parametrize("mode", [*MODES, "default", "rows"])
@pytest.mark.parametrize("spec", VR_SPECS, ids=[s.name for s in VR_SPECS])
def test_gamma_one_is_the_base_optimizer_bitwise(spec, mode):
    a, b = make_model(), make_model()
    train(spec, a, 4, mode, gamma=1.0)
    twin = spec.torch_twin(list(b.parameters()), twin_impl(spec, mode))
    for s in range(4):
        micro_steps(b, s)
        twin.step()
        twin.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_foreach_equals_per_tensor(spec):
    a, b = make_model(), make_model()
    train(spec, a, 5, "foreach")
    train(spec, b, 5, "loop")
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", [*MODES, "rows"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_state_dict_resume_is_bitwise(spec, mode):
    straight = make_model()
    train(spec, straight, 6, mode)

    first = make_model()
    resumed, _ = resume(spec, first, train(spec, first, 3, mode), 3, mode)
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_state_dict_resume_is_bitwise_on_low_precision_params(spec, dtype):
    """torch's load_state_dict casts floating state to the parameter's dtype; the fp32 state
    of our flat updates (LAMB/LARS moments, the GSNR momentum) must come back as fp32, or the
    resumed run leaves the saved one. torch's own updates keep their state in the parameters'
    dtype, and so does their resume."""
    straight = make_model(dtype)
    train(spec, straight, 5, "rows")

    first = make_model(dtype)
    opt = train(spec, first, 3, "rows")
    loaded = make_opt(spec, make_model(dtype, seed=5).parameters(), "rows")
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(first.parameters(), loaded.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.dim():  # the same dtype, the same values
                assert loaded.state[q][key].dtype == value.dtype and torch.equal(loaded.state[q][key], value), key
    resumed, _ = resume(spec, first, opt, 2, "rows")
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


ADAMS = [s for s in SPECS if s.base == "adam"]


def wrote_g_buffer(opt) -> bool:
    """Whether a step since the last call wrote g' into a work buffer for torch's update (the
    torch route); the buffer is dropped, so the next call sees only later steps."""
    return any([b.work.pop("g_out", None) is not None for _, buckets in opt._buckets.values() for b in buckets])


@pytest.mark.parametrize("spec", ADAMS, ids=lambda s: s.name)
def test_adam_default_route_is_one_flat_pass(spec):
    """fp32, foreach=None, gamma < 1: no g' buffer (the update is fused into the flat pass);
    foreach set, bf16 parameters or gamma = 1: torch's kernel (on g' or the gradient)."""
    opt = train(spec, make_model(), 2, "rows")
    assert not wrote_g_buffer(opt)
    assert wrote_g_buffer(train(spec, make_model(), 2, "foreach"))
    assert wrote_g_buffer(train(spec, make_model(torch.bfloat16), 2, "rows"))
    assert {"exp_avg", "exp_avg_sq"} <= set(opt._buckets[0][1][0].state_bufs)  # flat state, torch's keys
    plain = train(spec, make_model(), 2, "rows", gamma=1.0)
    assert not plain._buckets[0][1][0].state_bufs  # torch's own state tensors


@pytest.mark.parametrize("first,then", [("rows", "foreach"), ("foreach", "rows"), ("rows", "loop")])
@pytest.mark.parametrize("spec", ADAMS, ids=lambda s: s.name)
def test_adam_route_switch_keeps_state(spec, first, then, monkeypatch):
    """Switching foreach mid-run continues torch's state: the same step tensors and moments."""
    monkeypatch.setattr(flat, "ROW", 4)
    model = make_model()
    opt = train(spec, model, 3, first)
    p = model[0].weight
    step, exp_avg = opt.state[p]["step"], opt.state[p]["exp_avg"]
    assert step.dtype == torch.float32 and step.item() == 3.0
    assert wrote_g_buffer(opt) == (first != "rows")
    set_route(opt, then)
    train(spec, model, 3, start=3, opt=opt, moments=opt.moments)
    assert wrote_g_buffer(opt) == (then != "rows")
    assert opt.state[p]["step"] is step and step.item() == 6.0
    if first == "rows":  # torch's update works in place on the flat state's views
        assert opt.state[p]["exp_avg"] is exp_avg
    else:  # the flat route copied torch's moments into its buffer
        assert opt.state[p]["exp_avg"].data_ptr() != exp_avg.data_ptr()
    assert max_rel_err(list(model.parameters()), reference_run(spec, 6)) < 2e-5


@pytest.mark.parametrize("first,then", [("rows", "foreach"), ("foreach", "rows")])
@pytest.mark.parametrize("spec", ADAMS, ids=lambda s: s.name)
def test_adam_checkpoint_across_routes(spec, first, then, monkeypatch):
    monkeypatch.setattr(flat, "ROW", 4)
    model = make_model()
    resumed, opt2 = resume(spec, model, train(spec, model, 3, first), 3, then)
    assert wrote_g_buffer(opt2) == (then != "rows")
    assert all(opt2.state[p]["step"].item() == 6.0 for p in resumed.parameters())
    assert max_rel_err(list(resumed.parameters()), reference_run(spec, 6)) < 2e-5


@pytest.mark.parametrize("spec", ADAMS, ids=lambda s: s.name)
def test_adam_amsgrad_flat_route_equals_torch(spec):
    """amsgrad on the flat route: torch's kernel on g' to float rounding, the running max in use."""
    flat_run, torch_run = make_model(), make_model()
    opt = train(spec, flat_run, 5, "rows", amsgrad=True)
    twin = train(spec, torch_run, 5, "foreach", amsgrad=True)
    assert not wrote_g_buffer(opt)
    for pa, pb in zip(flat_run.parameters(), torch_run.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[pa]["max_exp_avg_sq"], twin.state[pb]["max_exp_avg_sq"])
    assert any((opt.state[p]["max_exp_avg_sq"] > opt.state[p]["exp_avg_sq"]).any() for p in flat_run.parameters())


@pytest.mark.parametrize("over", [{}, {"gsnr_interval": 2}, {"amsgrad": True}, {"momentum": 0.0}],
                         ids=["default", "interval2", "amsgrad", "momentum0"])
@pytest.mark.parametrize("mode", ["foreach", "default"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_element_state_keys_name_the_state(spec, mode, over):
    """What a distributed checkpoint asks for before it reads (vrgd_ds.megatron.dist_checkpoint)
    is exactly the per-element state the optimizer keeps after its steps."""
    if "gsnr_interval" in over and not spec.vr or "amsgrad" in over and spec.base != "adam" \
            or "momentum" in over and spec.cls not in (VRMomentum, LARS, VRLARS) or "nesterov" in spec.name:
        pytest.skip("the option does not apply")
    opt = train(spec, make_model(), 3, mode, **over)
    for group in opt.param_groups:
        for p in group["params"]:
            kept = sorted(k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0)
            assert kept == sorted(opt.element_state_keys(group)), (spec.name, over)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_params_without_grad_are_skipped(spec):
    model = make_model()
    frozen = torch.nn.Parameter(torch.randn(4))
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, [*model.parameters(), frozen], "foreach", moments)
    before = frozen.detach().clone()
    train(spec, model, 2, opt=opt, moments=moments)
    assert torch.equal(frozen, before) and len(opt.state[frozen]) == 0


@pytest.mark.parametrize("spec", [s for s in SPECS if s.base in ("lamb", "lars")], ids=lambda s: s.name)
@pytest.mark.parametrize("mode", MODES)
def test_param_groups_lr_and_exclusion(spec, mode):
    model = make_model()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    lr = spec.kwargs["lr"]
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, [{"params": weights},
                          {"params": biases, "lr": lr / 2, "exclude_from_adaptation": True}],
                   mode, moments)
    train(spec, model, 4, opt=opt, moments=moments)
    order = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    per_param = [{}, {"lr": lr / 2, "excluded": True}, {}, {"lr": lr / 2, "excluded": True}]
    ref = reference_run(spec, 4, hp_per_param=per_param)
    assert max_rel_err(order, ref) < 2e-5


@pytest.mark.parametrize("spec", VR_SPECS, ids=[s.name for s in VR_SPECS])
def test_lr_scheduler_drives_the_update(spec):
    a, b = make_model(), make_model()
    moments = MicroStepMoments(a.parameters())
    opt = make_opt(spec, a.parameters(), "foreach", moments)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s >= 1 else 1.0)
    for s in range(3):
        micro_steps(a, s)
        opt.step()
        opt.zero_grad()
        sched.step()
        if s == 0:
            after_first = [p.detach().clone() for p in a.parameters()]
    assert opt.param_groups[0]["lr"] == 0.0
    if spec.base != "lars":  # LARS momentum keeps moving with lr 0; SGD momentum too
        if spec.kwargs.get("momentum", 0.0) == 0.0:
            for p, q in zip(a.parameters(), after_first):
                assert torch.equal(p, q)
    train(spec, b, 1)
    for p, q in zip(b.parameters(), after_first):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", VR_SPECS, ids=[s.name for s in VR_SPECS])
def test_zero_variance_and_zero_gradients(spec, mode):
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, model.parameters(), mode, moments)
    x, y = batch(0, n=8)
    for _ in range(K):  # identical groups: zero variance everywhere
        (loss_fn(model(x), y) / K).backward()
    opt.step()
    opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(K):  # all-zero gradients: layer mean 0 -> r = 1, no NaN
        (0.0 * model(x).sum()).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if spec.base in ("sgd",) and spec.kwargs.get("momentum", 0.0) == 0.0:
        for p, q in zip(model.parameters(), before):  # only weight decay moves them
            torch.testing.assert_close(p, q * (1 - spec.kwargs["lr"] * spec.kwargs["weight_decay"]))


@pytest.mark.parametrize("spec", VR_SPECS, ids=[s.name for s in VR_SPECS])
def test_one_group_is_an_error(spec):
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, model.parameters(), "foreach", moments)
    micro_steps(model, 0, k=1)
    with pytest.raises(ValueError, match="k=1"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", [*MODES, "rows"])
@pytest.mark.parametrize("spec", VR_SPECS, ids=[s.name for s in VR_SPECS])
def test_nonfinite_gradient_raises_or_skips_without_touching_state(spec, mode, bad):
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, model.parameters(), mode, moments)
    train(spec, model, 2, opt=opt, moments=moments)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())

    def poisoned_step():
        micro_steps(model, 5)
        model[0].weight.grad[0, 0] = bad
        opt.step()

    with pytest.raises(FloatingPointError, match="non-finite"):
        poisoned_step()
    opt.zero_grad()
    opt.on_nonfinite = "skip"
    poisoned_step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    assert str(after["state"]) == str(state["state"])


@pytest.mark.parametrize("spec", VR_SPECS, ids=[s.name for s in VR_SPECS])
def test_missing_moment_source_is_a_clear_error(spec):
    model = make_model()
    opt = make_opt(spec, model.parameters(), "foreach", None)
    micro_steps(model, 0)
    with pytest.raises(RuntimeError, match="MicroStepMoments"):
        opt.step()


BAD = [
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "1.5"), (dict(gamma=-0.1), "-0.1"),
    (dict(lr=-1.0), "lr"), (dict(beta3=1.0), "beta3"),
]


@pytest.mark.parametrize("bad,word", BAD)
@pytest.mark.parametrize("spec", VR_SPECS, ids=[s.name for s in VR_SPECS])
def test_bad_hyperparameters_name_the_value(spec, bad, word):
    with pytest.raises(ValueError, match=word):
        spec.cls(make_model().parameters(), **bad)


@pytest.mark.parametrize("cls", [VRAdam, VRAdamW, VRLAMB, LAMB])
@pytest.mark.parametrize("betas,word", [((1.0, 0.9), "betas\\[0\\]"), ((0.9, -0.1), "-0.1")])
def test_bad_betas(cls, betas, word):
    with pytest.raises(ValueError, match=word):
        cls(make_model().parameters(), betas=betas)


@pytest.mark.parametrize("cls", [VRMomentum, VRLARS, LARS])
def test_bad_momentum(cls):
    with pytest.raises(ValueError, match="1.5"):
        cls(make_model().parameters(), momentum=1.5)


def test_bad_gamma_in_added_group():
    model = make_model()
    opt = VRLAMB([model[0].weight], moments=MicroStepMoments(model.parameters()))
    with pytest.raises(ValueError, match="gamma must be in \\(0, 1\\], got 2.0"):
        opt.add_param_group({"params": [model[0].bias], "gamma": 2.0})


def test_unknown_nonfinite_policy():
    with pytest.raises(ValueError, match="'ignore'"):
        VRSGD(make_model().parameters(), on_nonfinite="ignore")


def clip(how, model, moments, max_norm=0.05):
    """Clip the mean gradient: through the moment source, with torch's clip_grad_norm_ on
    p.grad (what HF Trainer and Accelerate do), or by multiplying every p.grad by hand."""
    if how == "moments":
        total = moments.clip_grad_norm_(max_norm)
    elif how == "torch":
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        for p in model.parameters():
            p.grad.mul_(max_norm / (total + 1e-6))
    return total


@pytest.mark.parametrize("how", ["moments", "torch", "by hand"])
@pytest.mark.parametrize("mode", MODES)
def test_clipping_scales_the_mean_only(mode, how):
    """GSNR from the unclipped moments, update from the clipped mean (docs/algorithm.md sec. 1),
    however the mean gradient was clipped (the moment source probes p.grad for it)."""
    spec = next(s for s in SPECS if s.name == "VRSGD")
    model = make_model()
    ref_model = copy.deepcopy(model)
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, model.parameters(), mode, moments, weight_decay=0.0)
    micro_steps(model, 0)
    total = clip(how, model, moments)
    assert total > 0.05
    coef = 0.05 / (total.item() + 1e-6)
    assert abs(moments.clip_scale / coef - 1) < 1e-6  # what the telemetry divides out
    opt.step()
    x, y = batch(0)
    ref = Reference(list(ref_model.parameters()), "sgd", gamma=0.1, lr=spec.kwargs["lr"])
    ref.step([g * coef for g in group_grads(ref_model, loss_fn, x, y, K)])
    assert max_rel_err(list(model.parameters()), ref.theta) < 2e-5


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name in ("VRLAMB", "VRAdamW")], ids=lambda s: s.name)
def test_clipping_p_grad_directly_is_followed(spec):
    """Four steps clipped with torch's clip_grad_norm_ on p.grad equal those clipped through the
    moment source (to the probe's rounding); without the probe they do not."""
    def run(how, follow=True):
        model = make_model()
        moments = MicroStepMoments(model.parameters())
        moments.follow_rescaling = follow
        opt = make_opt(spec, model.parameters(), "rows", moments)
        for s in range(4):
            micro_steps(model, s)
            clip(how, model, moments, 0.02)
            opt.step()
            opt.zero_grad()
        return list(model.parameters())

    through_moments = run("moments")
    assert max_rel_err(run("torch"), through_moments) < 1e-6
    assert max_rel_err(run("torch", follow=False), through_moments) > 1e-4


def test_a_change_to_one_parameters_gradient_is_not_taken_for_clipping():
    """Halving one probed parameter's gradient (a change to some parameters only: a layer's own
    gradient scale, a zeroed padding row) is no common factor: the other probes disagree, and
    the squares keep their scale (as without probes)."""
    spec = next(s for s in SPECS if s.name == "VRLAMB")

    zeroed = []  # per step, the index of the parameter whose gradient is halved

    def run(follow):
        model = make_model()
        params = list(model.parameters())
        moments = MicroStepMoments(params)
        moments.follow_rescaling = follow
        opt = make_opt(spec, params, "rows", moments)
        for s in range(3):
            micro_steps(model, s)
            if follow:  # the probe the factor is read from (the largest): no other probe sees the change
                assert len(moments._probes) >= 2
                probe = max(moments._probes, key=lambda p: float(moments._probes[p]))
                zeroed.append(next(i for i, p in enumerate(params) if p is probe))
            params[zeroed[s]].grad.mul_(0.5)
            opt.step()
            opt.zero_grad()
        return params

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", [*MODES, "rows", "compile"])
@pytest.mark.parametrize("k", [2, 8])
def test_zero_variance_with_large_gradients_does_not_overflow(mode, k):
    """gbar^2 / tiny overflows fp32 for |gbar| > 2; the layer is redone in float64, not NaN."""
    model = make_model()
    spec = next(s for s in SPECS if s.name == "VRSGD")
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, model.parameters(), mode, moments, weight_decay=0.0)
    x, y = batch(0, n=8)
    for _ in range(k):  # identical groups, gradients far above 2 in size
        (1e3 * loss_fn(model(x), y) / k).backward()
    g = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    assert max(t.abs().max() for t in g) > 2
    opt.step()  # used to raise FloatingPointError
    lr, gamma = spec.kwargs["lr"], 0.1
    for p, q, gi in zip(model.parameters(), before, g):
        step = (q - p) / (lr * gi)  # = r elementwise, must lie in [gamma, 1]
        ok = gi.abs() > 1e-3
        assert torch.isfinite(p).all()
        assert (step[ok] >= gamma - 1e-3).all() and (step[ok] <= 1 + 1e-3).all()


def _float64_path_step(monkeypatch, chunk):
    """One VRSGD step on a 1.5M-element layer of identical groups with |gbar| > 2 (the whole
    layer takes the float64 path); the parameters after it, the largest single allocation
    during it, and whether the float64 path ran."""
    from torch.profiler import ProfilerActivity, profile

    import vrgd_ds.gsnr as gsnr_module
    import vrgd_ds.optim.flat as flat_module
    from vrgd_ds.optim.vr import GSNRTransform

    monkeypatch.setattr(gsnr_module, "WIDE_CHUNK", chunk)
    monkeypatch.setattr(flat_module, "WIDE_CHUNK", chunk)
    wide = []
    original = GSNRTransform._wide_sums

    def spy(self, *args):
        wide.append(sum(args[5]))
        return original(self, *args)

    monkeypatch.setattr(GSNRTransform, "_wide_sums", spy)
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1500, 1000, generator=gen) * 0.1)
    g = torch.randn(1500, 1000, generator=gen) * 3
    opt = VRSGD([w], lr=0.01, moments=MicroStepMoments([w]), compile=False)
    for _ in range(4):  # identical groups: zero variance
        ((w * g).sum() / 4).backward()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    monkeypatch.undo()  # the next call wraps the real _wide_sums again
    return w.detach().clone(), max(e.self_cpu_memory_usage for e in prof.events()), wide


def test_float64_path_runs_in_bounded_chunks(monkeypatch):
    """The float64 path (layers whose fp32 GSNR sum overflowed) works a chunk of
    gsnr.WIDE_CHUNK elements at a time: no allocation grows with the layer (it used to gather
    every element of the layer at once, 31 GB for a BERT-base-sized model), and the
    parameters are those of one pass over the whole layer."""
    from vrgd_ds.gsnr import WIDE_CHUNK

    chunked, biggest, wide = _float64_path_step(monkeypatch, WIDE_CHUNK)
    whole, biggest_whole, wide_whole = _float64_path_step(monkeypatch, 1 << 40)
    assert wide == wide_whole == [1]  # the layer took the float64 path
    assert biggest <= 32 * WIDE_CHUNK < biggest_whole
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=0)


class GivenSquares:
    """A moment source whose squared-gradient sums are given (any MomentSource may supply
    them: the micro-step sums never reach these layer means, see the test below)."""

    def __init__(self, squares: dict, k: int):
        self.group_count, self.sq_scale, self._sq = k, 1.0 / k, squares

    def sum_sq(self, p):
        return self._sq[p]

    def reset(self):
        pass


@pytest.mark.parametrize("mode", ["foreach", "compile"])
def test_layer_means_whose_inverse_is_not_normal_take_the_float64_path(mode):
    """The kernels compute r = clamp(r_raw / m, gamma, 1) as r_raw * (1 / m). Where 1 / m is not
    a normal fp32 number (m under 2.9e-39: it would round to inf and give NaN where r_raw = 0;
    m over 8.5e37: a denormal that loses bits), the layer's sum and ratios are redone in
    float64. Each element's ratio is checked against the float64 formula, next to a layer of
    ordinary size."""
    from vrgd_ds.gsnr import TINY

    k, lr, gamma, n = 4, 0.2, 0.1, 64
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(n, generator=gen) * 1.8 + 0.2  # r_raw spread over a factor of 81: r between gamma and 1
    grads = {
        "tiny": 1e-21 * u,  # gbar^2 ~ 1e-42 (an fp32 denormal) against a variance of 1: m ~ 1e-42
        "big": 1.0 + 0.4 * u,  # zero variance, r_raw = gbar^2 / tiny ~ 1e38 (no overflow): m over 8.5e37
        "ordinary": torch.randn(n, generator=gen),
    }
    grads["tiny"][0] = grads["ordinary"][0] = 0.0  # r_raw = 0: r = gamma (0 * inf would be NaN)
    squares = {"tiny": k * (1.0 + grads["tiny"] ** 2), "big": k * grads["big"] ** 2,
               "ordinary": k * (grads["ordinary"] ** 2 + torch.rand(n, generator=gen))}
    params = {name: torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for name in grads}
    moments = GivenSquares({params[name]: squares[name].to(DEVICE) for name in grads}, k)
    opt = VRSGD(list(params.values()), lr=lr, weight_decay=0.0, gamma=gamma, moments=moments, **IMPL[mode])
    for name, p in params.items():
        p.grad = grads[name].to(DEVICE)
    opt.step()
    for name, p in params.items():
        g, q = grads[name], squares[name]
        var = ((q * (1.0 / k) - g * g).clamp_min(0.0) + TINY).double()  # the kernels' fp32 variance
        raw = g.double() ** 2 / var
        want = (raw / raw.mean()).clamp(gamma, 1.0)
        got = -p.detach().cpu().double() / (lr * g.double())
        assert torch.isfinite(p).all(), name
        live = g != 0
        assert want[live].min() < 0.7 and want.max() == 1.0, name  # the ratios are spread, not all clamped
        torch.testing.assert_close(got[live], want[live], rtol=2e-6, atol=0, msg=name)


@pytest.mark.parametrize("cls", [LAMB, LARS, VRLAMB, VRSGD])
def test_unknown_hyperparameter_is_rejected(cls):
    with pytest.raises(TypeError, match="gama"):
        cls(make_model().parameters(), gama=0.1)


def test_moments_from_sums():
    from vrgd_ds.gsnr import moments_from_sums

    g = torch.tensor([[1.0, -2.0], [3.0, 0.0], [2.0, 2.0]])  # k = 3 groups
    mean, msq = moments_from_sums(g.sum(0), (g ** 2).sum(0), 3)
    torch.testing.assert_close(mean, g.mean(0))
    torch.testing.assert_close(msq, (g ** 2).mean(0))
    with pytest.raises(ValueError, match="k=1"):
        moments_from_sums(g[0], g[0] ** 2, 1)
