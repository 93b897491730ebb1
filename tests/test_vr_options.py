"""VR options beside the algorithm: gsnr_interval, telemetry, sq_comm_dtype (single process)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from vrgd_ds import MicroStepMoments, VRLAMB, VRSGD

from reference import Reference, group_grads, gsnr_scaled, max_rel_err
from test_optim_matrix import (K, SPECS, VR_SPECS, batch, loss_fn, make_model, make_opt, micro_steps, train,
                               wrote_g_buffer)
from test_optim_matrix import short_rows  # noqa: F401  (autouse: 4-element rows in mode "rows")

BY_NAME = {s.name: s for s in SPECS}


def reference_interval(spec, steps, interval):
    model = make_model()
    ref = Reference(list(model.parameters()), spec.base, gamma=0.1, beta3=spec.beta3, interval=interval,
                    **spec.ref_hp)
    return ref.run(model, loss_fn, batch, steps, K)


@pytest.mark.parametrize("mode", ["foreach", "loop", "rows"])
@pytest.mark.parametrize("name", ["VRSGD", "VRLAMB", "VRAdamW", "VRLARS"])
@pytest.mark.parametrize("interval", [2, 3])
def test_gsnr_interval_reuses_the_last_gsnr(name, mode, interval):
    spec = BY_NAME[name]
    model = make_model()
    train(spec, model, 7, mode, gsnr_interval=interval)
    expected = reference_interval(spec, 7, interval)
    assert max_rel_err(list(model.parameters()), expected) < 2e-5
    # and it is a different trajectory from computing the GSNR every step
    assert max_rel_err(expected, reference_interval(spec, 7, 1)) > 1e-4


@pytest.mark.parametrize("mode", ["foreach", "rows"])
@pytest.mark.parametrize("interval", [1, 2])
def test_adamw_without_gsnr_momentum(mode, interval):
    """beta3 = 0 (the ratio itself; with gsnr_interval kept and reused) on both Adam routes."""
    spec = dataclasses.replace(BY_NAME["VRAdamW"], beta3=0.0)
    model = make_model()
    opt = train(spec, model, 5, mode, beta3=0.0, gsnr_interval=interval)
    assert wrote_g_buffer(opt) == (mode != "rows")
    expected = reference_interval(spec, 5, interval)
    assert max_rel_err(list(model.parameters()), expected) < 2e-5
    assert max_rel_err(expected, reference_interval(BY_NAME["VRAdamW"], 5, interval)) > 1e-4  # not beta3 = 0.9


def test_gsnr_interval_reads_no_moments_between_gsnr_steps():
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    opt = VRLAMB(model.parameters(), lr=0.02, moments=moments, gsnr_interval=3)
    wanted = []
    for s in range(7):
        wanted.append(opt.wants_moments())
        micro_steps(model, s)
        if not wanted[-1]:
            moments.reset()  # a source that skipped the squares has nothing: must not be read
        opt.step()
        opt.zero_grad()
    assert wanted == [True, False, False, True, False, False, True]


def test_gsnr_interval_resume_is_bitwise():
    spec = BY_NAME["VRLAMB"]
    straight = make_model()
    train(spec, straight, 6, gsnr_interval=4)
    first = make_model()
    opt = train(spec, first, 2, gsnr_interval=4)
    resumed = make_model(seed=5)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    moments = MicroStepMoments(resumed.parameters())
    opt2 = make_opt(spec, resumed.parameters(), "foreach", moments, gsnr_interval=4)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert not opt2.wants_moments()  # step 3 of 4 reuses the GSNR of step 1
    train(spec, resumed, 4, start=2, opt=opt2, moments=moments)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_gsnr_interval_still_catches_nonfinite_gradients():
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    opt = VRSGD(model.parameters(), lr=0.1, moments=moments, gsnr_interval=2, on_nonfinite="skip")
    train(BY_NAME["VRSGD"], model, 1, opt=opt, moments=moments)
    before = [p.detach().clone() for p in model.parameters()]
    micro_steps(model, 1)
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_telemetry_matches_the_definition():
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    opt = VRLAMB(model.parameters(), lr=0.02, moments=moments, telemetry_interval=2, gamma=0.3)
    seen = []
    for s in range(5):
        micro_steps(model, s)
        params = [p.detach().clone() for p in model.parameters()]
        x, y = batch(s)
        groups = group_grads(model_copy(model, params), loss_fn, x, y, K)
        opt.step()
        opt.zero_grad()
        seen.append(opt.telemetry["step"] if opt.telemetry else None)
        if s == 4:
            rec = opt.telemetry
            assert rec["k"] == K and rec["step"] == 5
            for i, gg in enumerate(groups):
                gbar, sq = gg.mean(0), (gg ** 2).mean(0)
                r_raw = gbar ** 2 / ((sq - gbar ** 2).clamp_min(0) + torch.finfo(torch.float32).tiny)
                layer = rec["layers"][i]
                assert layer["gsnr_mean"] == pytest.approx(r_raw.mean().item(), rel=1e-4)
                assert layer["clamped_fraction"] == pytest.approx(
                    (r_raw / r_raw.mean() < 0.3).double().mean().item(), abs=1.0 / gg[0].numel())
            assert 0.0 < rec["clamped_fraction"] < 1.0
    assert seen == [1, 1, 3, 3, 5]


def model_copy(model, params):
    twin = make_model()
    with torch.no_grad():
        for p, v in zip(twin.parameters(), params):
            p.copy_(v)
    return twin


@pytest.mark.parametrize("kw,msg", [
    (dict(gsnr_interval=0), "gsnr_interval must be an integer >= 1, got 0"),
    (dict(gsnr_interval=1.5), "gsnr_interval must be an integer >= 1, got 1.5"),
    (dict(sq_comm_dtype="fp8"), "sq_comm_dtype must be one of ('fp32', 'bf16'), got 'fp8'"),
    (dict(telemetry_interval=-1), "telemetry_interval must be an integer >= 0"),
])
@pytest.mark.parametrize("spec", VR_SPECS, ids=[s.name for s in VR_SPECS])
def test_bad_options_name_the_value(spec, kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        make_opt(spec, make_model().parameters(), moments=None, **kw)


def test_gsnr_scaled_reference_interval_is_the_definition():
    """The reference's own reuse rule: phat from step 0 multiplies step 1's mean gradient."""
    g0, g1 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    st = {}
    a = gsnr_scaled(g0, 0.1, 0.0, st, interval=2)
    b = gsnr_scaled(g1, 0.1, 0.0, st, interval=2)
    phat = a / g0.mean(0)
    torch.testing.assert_close(b, phat * g1.mean(0))


VR_KEYWORDS = ["moments", "on_nonfinite", "gsnr_interval", "sq_comm_dtype", "telemetry_interval", "sq_chunk_numel",
               "foreach", "compile"]
SIGNATURES = {  # positional arguments after params, with their defaults; then VR_KEYWORDS
    "VRSGD": dict(lr=1e-3, weight_decay=0.0, gamma=0.1, beta3=0.0),
    "VRMomentum": dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, gamma=0.1, beta3=0.0),
    "VRAdam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, gamma=0.1, beta3=0.9),
    "VRAdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, gamma=0.1, beta3=0.9),
    "VRLAMB": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True, gamma=0.1,
                   beta3=0.9),
    "VRLARS": dict(lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.001, gamma=0.1, beta3=0.0),
}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_vr_classes_have_explicit_signatures_and_documented_args(name):
    """The constructors are assembled from one definition, but inspect.signature (DeepSpeed's
    config check reads it) sees each class's explicit arguments and defaults, calls are bound
    against them, and the docstring's Args section lists every one."""
    import inspect

    from vrgd_ds.optim import VR_OPTIMIZERS

    cls = VR_OPTIMIZERS[name]
    params = inspect.signature(cls).parameters
    positional = {n: p.default for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    assert positional == {"params": inspect.Parameter.empty, **SIGNATURES[name]}
    assert list(positional) == ["params", *SIGNATURES[name]]  # and their order
    assert [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY] == VR_KEYWORDS
    args = cls.__doc__.split("Args:\n", 1)[1]
    for n, p in params.items():
        assert f"\n    {n} (" in "\n" + args, n
        if p.default is not p.empty:
            assert f"(default: {p.default!r})" in " ".join(args.split()), n
    opt = cls(make_model().parameters(), *SIGNATURES[name].values())
    assert all(opt.defaults[k] == v for k, v in SIGNATURES[name].items())
    with pytest.raises(TypeError, match=f"{name}\\(\\): got an unexpected keyword argument 'nesterov_'"):
        cls(make_model().parameters(), nesterov_=True)
