"""The gradient noise scale (docs/algorithm.md section 7) against explicit group and per-sample
gradients, and its unbiasedness on linear regression, where tr(Sigma) and |G|^2 are
known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from vrgd_ds import VRSGD, MicroStepMoments
from vrgd_ds.gsnr import SQUARE_ROW, grad_square_partials, raw_gsnr_terms, square_sum
from vrgd_ds.optim.flat import Spec
from vrgd_ds.noise_scale import NoiseScaleTracker, check_ema_decay, noise_scale

K, B = 6, 5  # groups x samples per group


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(K * B, 4, generator=gen)
    return x, torch.randn(K * B, 2, generator=gen)


def per_sample_grads(model, x, y):
    """Every sample's gradient with torch.func: {name: [N, *shape]} float64."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.mse_loss(out, yi.unsqueeze(0))

    return {n: g.double() for n, g in vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y).items()}


def exact(groups: torch.Tensor) -> dict:
    """Section 7 from explicit group gradients [k, ...] (float64)."""
    k = groups.shape[0]
    gbar = groups.mean(0)
    group_var = (groups - gbar).pow(2).sum(0).sum().item() / (k - 1)  # unbiased, summed over elements
    grad_sq = gbar.pow(2).sum().item() - group_var / k
    return {"group_var": group_var, "trace_cov": B * group_var, "grad_sq": grad_sq,
            "b_simple": B * group_var / grad_sq if grad_sq > 0 else None}


def assert_close(got, want, what):
    if want is None:  # grad_sq <= 0 on this batch: no b_simple
        assert got is None, what
    else:
        assert got == pytest.approx(want, rel=1e-5), what


@pytest.mark.parametrize("clip", [None, 0.05])
def test_telemetry_matches_explicit_per_sample_and_group_gradients(clip):
    """One VRSGD step with telemetry (lr 0) on a small model: every quantity, per layer and
    for the model, equals the same formula on the explicit gradients (group gradients
    formed from torch.func per-sample gradients); clipping does not change it."""
    model = tiny_model()
    x, y = data()
    moments = MicroStepMoments(model.parameters(), samples_per_group=B)
    opt = VRSGD(model.parameters(), lr=0.0, telemetry_interval=1, moments=moments)
    for xb, yb in zip(x.chunk(K), y.chunk(K)):
        (torch.nn.functional.mse_loss(model(xb), yb) / K).backward()
    if clip is not None:
        moments.clip_grad_norm_(clip)
        assert moments.clip_scale < 1.0
    opt.step()
    rec = opt.telemetry
    per_sample = per_sample_grads(model, x, y)
    groups = {n: g.view(K, B, *g.shape[1:]).mean(1) for n, g in per_sample.items()}
    names = [n for n, _ in model.named_parameters()]
    for i, n in enumerate(names):
        want = exact(groups[n])
        for key in ("group_var", "trace_cov", "grad_sq", "b_simple"):
            assert_close(rec["layers"][i][key], want[key], (n, key))
    flat = torch.cat([groups[n].reshape(K, -1) for n in names], 1)
    want = exact(flat)
    for key in ("group_var", "trace_cov", "grad_sq", "b_simple"):
        assert_close(rec[key], want[key], key)
    assert rec["b_simple_ema"] == pytest.approx(want["b_simple"], rel=1e-5)  # first measurement


def test_ema_smooths_numerator_and_denominator_separately():
    tracker = NoiseScaleTracker(ema_decay=0.5)
    tracker.update({0: (3.0, 2.0)}, k=4, b=2, step=1)
    model, _ = tracker.update({0: (1.0, 1.0)}, k=4, b=2, step=2)
    s1, s2 = 4 / 3 * 3.0, 4 / 3 * 1.0
    tc = 0.5 * 2 * s1 + 0.5 * 2 * s2
    gs = 0.5 * (2.0 - s1 / 4) + 0.5 * (1.0 - s2 / 4)
    assert model["b_simple_ema"] == pytest.approx(tc / gs)
    # a second call for the same step (DeepSpeed steps param groups one at a time) redoes it
    again, _ = tracker.update({0: (1.0, 1.0)}, k=4, b=2, step=2)
    assert again["b_simple_ema"] == pytest.approx(tc / gs)
    state = tracker.state_dict()
    other = NoiseScaleTracker()
    other.load_state_dict(state)
    assert other.ema == tracker.ema and other.ema_decay == 0.5


def test_nonpositive_grad_sq_is_reported_not_divided():
    rec = noise_scale(var_sum=3.0, gsq_sum=0.1, k=2, b=4)
    assert rec["grad_sq"] < 0 and rec["b_simple"] is None
    assert noise_scale(1.0, 1.0, 4, None)["trace_cov"] is None  # b unknown: no sample units
    with pytest.raises(ValueError, match=r"ema_decay must be a number in \[0, 1\), got 1.5"):
        check_ema_decay(1.5)
    with pytest.raises(ValueError, match="samples_per_group must be an integer >= 1 or None, got 0"):
        MicroStepMoments(tiny_model().parameters(), samples_per_group=0)


def test_estimator_is_unbiased_on_linear_regression():
    """y = x . w* + eps, x ~ N(0, I_d), eps ~ N(0, sigma^2), loss 0.5 (x . w - y)^2 at w =
    w* + delta. Then G = delta, |G|^2 = |delta|^2 and Sigma = (|delta|^2 + sigma^2) I +
    delta delta^T, so tr(Sigma) = d (|delta|^2 + sigma^2) + |delta|^2. Over many
    independent batches the mean estimates agree with both within 4 standard errors."""
    d, k, b, trials, sigma = 8, 8, 4, 4000, 0.5
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
    x = torch.randn(trials, k, b, d, generator=gen, dtype=torch.float64)
    eps = torch.randn(trials, k, b, generator=gen, dtype=torch.float64) * sigma
    per_sample = x * ((x @ delta) - eps).unsqueeze(-1)  # [trials, k, b, d] gradients of the loss
    groups = per_sample.mean(2).float()  # [trials, k, d]: the group gradients
    estimates = {"trace_cov": [], "grad_sq": []}
    spec, c = Spec(("ok",), ("sq_scale",), ("noise",)), torch.tensor([1.0 / k])
    for g in groups:
        gbar, sq = g.mean(0), (g * g).sum(0)
        # the sums a VR telemetry step takes in its r_raw pass (fp32 terms, float64 sums) ...
        _, (_, var_terms, gsq_terms) = raw_gsnr_terms(spec, {"g": gbar.view(1, -1), "sq": sq.view(1, -1)},
                                                      torch.ones(1, 1), c)
        var_sum, gsq_sum = var_terms.sum(dtype=torch.float64).item(), gsq_terms.sum(dtype=torch.float64).item()
        # ... and the measure-only meter's: sum s per layer from its moment source, sum gbar^2 here
        (minus_gsq, gsq_meter), = grad_square_partials([gbar]).tolist()
        assert gsq_meter == pytest.approx(gsq_sum, rel=1e-6)
        assert square_sum(sq, True).item() / k + minus_gsq == pytest.approx(var_sum, rel=1e-5, abs=1e-9)
        rec = noise_scale(var_sum, gsq_sum, k, b)
        estimates["trace_cov"].append(rec["trace_cov"])
        estimates["grad_sq"].append(rec["grad_sq"])
    truth = {"trace_cov": d * (delta.dot(delta).item() + sigma**2) + delta.dot(delta).item(),
             "grad_sq": delta.dot(delta).item()}
    for key, values in estimates.items():
        v = torch.tensor(values, dtype=torch.float64)
        se = v.std().item() / math.sqrt(trials)
        assert abs(v.mean().item() - truth[key]) < 4 * se, (key, v.mean().item(), truth[key], se)
        assert se < 0.05 * truth[key]  # the test has power: 4 SE is a tight band


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("squared", [False, True])
def test_square_sum_matches_float64_across_rows_chunks_and_tail(dtype, squared):
    """The measure-only routes' sum of squares: fp32 squares in fp32 row sums added in float64,
    a chunk at a time; against the float64 sum of the same fp32 squares (a row's fp32 sum is
    within ~eps log2(rows) of it). The sizes put chunk edges inside rows and leave a tail
    shorter than a row."""
    gen = torch.Generator().manual_seed(0)
    for n, chunk in ((5 * SQUARE_ROW + 7, 3 * SQUARE_ROW + 100), (SQUARE_ROW - 1, 1 << 22), (1, 4)):
        x = (torch.randn(n, generator=gen) * 1e-3).to(dtype)
        if squared:
            x = x.float().square()
        f = x.float()
        want = (f if squared else f * f).double().sum().item()
        got = square_sum(x, squared, chunk)
        assert got.dtype == torch.float64 and got.dim() == 0
        assert got.item() == pytest.approx(want, rel=1e-6), (n, chunk)
    assert square_sum(torch.zeros(0), squared).item() == 0.0


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_telemetry_sums_in_the_gsnr_pass_match_the_definition(compile):
    """The telemetry's noise sums ride in the pass that sums r_raw, and its clamped counts take
    a flat pass of their own, over rows and edge elements (layers of 2400 and 180 elements:
    two 1024-element rows and a tail, and a layer of edges only); eager and compiled agree with
    the definition on explicit group gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 60), torch.nn.Tanh(), torch.nn.Linear(60, 3))
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(K * B, 40, generator=gen), torch.randn(K * B, 3, generator=gen)
    moments = MicroStepMoments(model.parameters(), samples_per_group=B)
    opt = VRSGD(model.parameters(), lr=0.0, telemetry_interval=1, moments=moments, gamma=0.2, compile=compile)
    for xb, yb in zip(x.chunk(K), y.chunk(K)):
        (torch.nn.functional.mse_loss(model(xb), yb) / K).backward()
    opt.step()
    rec = opt.telemetry
    per_sample = per_sample_grads(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    for i, n in enumerate(names):
        groups = per_sample[n].view(K, B, *per_sample[n].shape[1:]).mean(1)
        want = exact(groups)
        for key in ("group_var", "grad_sq", "b_simple"):
            assert_close(rec["layers"][i][key], want[key], (n, key))
        gbar, sq = groups.mean(0), (groups ** 2).mean(0)
        r_raw = gbar ** 2 / (sq - gbar ** 2).clamp_min(0)
        # elements whose r_raw / m sits within rounding of gamma may fall either way
        assert rec["layers"][i]["clamped_fraction"] == pytest.approx(
            (r_raw / r_raw.mean() < 0.2).double().mean().item(), abs=2.0 / gbar.numel()), n
        assert 0.0 < rec["layers"][i]["clamped_fraction"] < 1.0, n
