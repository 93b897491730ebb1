"""torch.amp.GradScaler driving a VR optimizer: the scaled micro-batch gradients put S^2 into
the squares; the step must unscale both, and skip the steps the scaler finds inf/NaN in.
Against the same run without a scaler (S is a power of 2: equal bit for bit)."""

from __future__ import annotations

import pytest
import torch

from vrgd_ds import MicroStepMoments

from test_optim_matrix import DEVICE, K, SPECS, batch, loss_fn, make_model, make_opt

VR = [s for s in SPECS if s.vr and s.name in ("VRLAMB", "VRAdamW", "VRLARS", "VRMomentum")]
CLIP = 0.5


def scaler(init=2.0**10):
    return torch.amp.GradScaler(DEVICE, init_scale=init, growth_interval=2)


def run(spec, steps, amp=None, unscale=False, clip=False, poison=None, **over):
    """``amp``: a GradScaler (None: plain). ``unscale``: scaler.unscale_ before the step (the
    moment source is given the scaler). ``poison``: a step whose first micro-batch is inf."""
    model = make_model()
    moments = MicroStepMoments(model.parameters(), grad_scaler=amp if unscale else None)
    opt = make_opt(spec, model.parameters(), "rows", moments, **over)
    scales = []
    for s in range(steps):
        x, y = batch(s)
        if s == poison:
            x = x.clone()
            x[0] = float("inf")
        for i, (xb, yb) in enumerate(zip(x.chunk(K), y.chunk(K))):
            loss = loss_fn(model(xb), yb) / K
            (amp.scale(loss) if amp else loss).backward()
        if amp is not None:
            scales.append(amp.get_scale())
            if unscale:
                amp.unscale_(opt)
            if clip:
                moments.clip_grad_norm_(CLIP)
            amp.step(opt)
            amp.update()
        else:
            if clip:
                moments.clip_grad_norm_(CLIP)
            opt.step()
        opt.zero_grad()
    return model, opt, scales


@pytest.mark.parametrize("spec", VR, ids=lambda s: s.name)
def test_scaled_steps_equal_the_unscaled_run_bitwise(spec):
    plain, _, _ = run(spec, 4)
    amp = scaler()
    scaled, opt, scales = run(spec, 4, amp)
    assert len(set(scales)) > 1  # the scale grew during the run
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)


class OwnSource:
    """A moment source of the user's own, which knows nothing of loss scales (no
    note_loss_scale): the step reads its squares through StepSource, divided by S^2."""

    squares_consumable = False

    def __init__(self, params):
        self.inner = MicroStepMoments(params)
        self.inner.follow_rescaling = False

    group_count = property(lambda self: self.inner.group_count)
    sq_scale = property(lambda self: self.inner.sq_scale)

    def sum_sq(self, p):
        return self.inner.sum_sq(p)

    def reset(self):
        self.inner.reset()


def test_a_source_without_loss_scale_support_is_unscaled_by_the_step():
    spec = VR[0]
    results = []
    for amp in (None, scaler()):
        model = make_model()
        opt = make_opt(spec, model.parameters(), "rows", OwnSource(model.parameters()))
        for s in range(3):
            x, y = batch(s)
            for xb, yb in zip(x.chunk(K), y.chunk(K)):
                loss = loss_fn(model(xb), yb) / K
                (amp.scale(loss) if amp else loss).backward()
            if amp:
                amp.step(opt)
                amp.update()
            else:
                opt.step()
            opt.zero_grad()
        results.append(list(model.parameters()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", VR[:2], ids=lambda s: s.name)
def test_unscale_then_clip_equals_the_unscaled_run_bitwise(spec):
    plain, _, _ = run(spec, 4, clip=True)
    scaled, _, _ = run(spec, 4, scaler(), unscale=True, clip=True)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("unscale", [False, True], ids=["scaler-step", "unscale-clip"])
def test_noise_scale_telemetry_is_that_of_the_unscaled_run(unscale):
    """The telemetry's clip scale (which the noise scale divides out) is the clipping factor,
    not the loss scale: the GradScaler's S is noted to the moment source."""
    spec = VR[0]
    _, plain, _ = run(spec, 3, clip=unscale, telemetry_interval=1)
    _, scaled, _ = run(spec, 3, scaler(), unscale=unscale, clip=unscale, telemetry_interval=1)
    a, b = plain.telemetry, scaled.telemetry
    for key in ("grad_sq", "group_var", "clamped_fraction"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


def test_unscale_without_telling_the_moment_source_raises():
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    spec = VR[0]
    opt = make_opt(spec, model.parameters(), "rows", moments)
    amp = scaler()
    x, y = batch(0)
    for xb, yb in zip(x.chunk(K), y.chunk(K)):
        amp.scale(loss_fn(model(xb), yb) / K).backward()
    before = [p.detach().clone() for p in model.parameters()]
    amp.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"grad_scaler=scaler"):
        amp.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="grad_scaler must be a torch.amp.GradScaler"):
        MicroStepMoments(model.parameters(), grad_scaler=2.0**10)


def test_fp16_gradients_are_refused_as_torch_refuses_them():
    """GradScaler.unscale_ refuses fp16 gradients (unscaling them in fp16 loses bits); so does
    the step that unscales them itself, before anything changes."""
    model = make_model(torch.float16)
    opt = make_opt(VR[0], model.parameters(), "rows", MicroStepMoments(model.parameters()))
    amp = scaler()
    x, y = batch(0, torch.float16)
    for xb, yb in zip(x.chunk(K), y.chunk(K)):
        amp.scale(loss_fn(model(xb).float(), yb.float()) / K).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="attempting to unscale FP16 gradients"):
        amp.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_step_with_inf_is_skipped_and_the_run_goes_on():
    spec = VR[0]
    amp = scaler()
    model, opt, scales = run(spec, 2, amp, poison=1)
    ref, ref_opt, _ = run(spec, 1)  # step 1 skipped: the weights and state after step 0
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(ref.parameters(), model.parameters()):
        assert {k: v for k, v in ref_opt.state[p].items() if not torch.is_tensor(v)} == \
            {k: v for k, v in opt.state[q].items() if not torch.is_tensor(v)}
    assert opt.overflow and amp.get_scale() == scales[1] / 2  # the scaler backed off
    x, y = batch(2)  # and the next step trains
    for xb, yb in zip(x.chunk(K), y.chunk(K)):
        amp.scale(loss_fn(model(xb), yb) / K).backward()
    amp.step(opt)
    amp.update()
    assert not opt.overflow
    assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
