"""A straightforward reference of docs/algorithm.md, written from the document, in float64.

Every group gradient is computed explicitly (one forward/backward per group), the two
moments are formed by hand, and each base update is a plain per-tensor loop. Nothing
here imports vrgd_ds.
"""

from __future__ import annotations

import math

import torch


def group_grads(model, loss_fn, xs, ys, k, params=None, before_group=None):
    """Explicit per-group gradients: a list (per parameter) of [k, *shape] float64 tensors,
    for ``params`` (default: all of the model's). ``before_group(i)`` runs before group i's
    forward; a parameter the group's loss does not reach has a zero gradient there."""
    params = list(model.parameters()) if params is None else list(params)
    per_param = [[] for _ in params]
    for i, (xb, yb) in enumerate(zip(xs.chunk(k), ys.chunk(k))):
        if before_group is not None:
            before_group(i)
        grads = torch.autograd.grad(loss_fn(model(xb), yb), params, allow_unused=True)
        for j, (g, p) in enumerate(zip(grads, params)):
            per_param[j].append(torch.zeros_like(p, dtype=torch.float64) if g is None else g.detach().double())
    return [torch.stack(g) for g in per_param]


def gsnr_scaled(g_groups, gamma, beta3, state, tiny=torch.finfo(torch.float32).tiny, interval=1):
    """Sections 1-3: g' = phat * gbar for one parameter tensor (float64).

    ``interval`` N (the gsnr_interval option): phat is computed on steps 0, N, 2N, ... and
    the last one is reused on the steps between."""
    k = g_groups.shape[0]
    gbar = g_groups.sum(0) / k
    n = state.get("vr_n", 0)
    state["vr_n"] = n + 1
    if n % interval != 0:
        return state["phat"] * gbar
    s = (g_groups ** 2).sum(0) / k
    var = torch.clamp(s - gbar ** 2, min=0.0)
    r_raw = gbar ** 2 / (var + tiny)
    m = r_raw.mean()
    r = torch.clamp(r_raw / m, gamma, 1.0) if m > 0 else torch.ones_like(r_raw)
    if beta3 == 0.0:
        phat = r
    else:
        t = state.get("gsnr_t", 0) + 1
        p = beta3 * state.get("gsnr_p", torch.zeros_like(r)) + (1 - beta3) * r
        state["gsnr_t"], state["gsnr_p"] = t, p
        phat = p / (1 - beta3 ** t)
    state["phat"] = phat
    return phat * gbar


def sgd(theta, g, st, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    d = g + weight_decay * theta
    if momentum:
        buf = d.clone() if "buf" not in st else momentum * st["buf"] + (1 - dampening) * d
        st["buf"] = buf
        d = d + momentum * buf if nesterov else buf
    return theta - lr * d


def adam(theta, g, st, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    b1, b2 = betas
    t = st["t"] = st.get("t", 0) + 1
    if decoupled:
        theta = theta * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * theta
    m = st["m"] = b1 * st.get("m", torch.zeros_like(g)) + (1 - b1) * g
    v = st["v"] = b2 * st.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return theta - lr * mhat / (vhat.sqrt() + eps)


def lamb(theta, g, st, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, excluded=False):
    b1, b2 = betas
    wd = 0.0 if excluded else weight_decay
    t = st["t"] = st.get("t", 0) + 1
    m = st["m"] = b1 * st.get("m", torch.zeros_like(g)) + (1 - b1) * g
    v = st["v"] = b2 * st.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
    u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * theta
    wn, un = theta.norm().item(), u.norm().item()
    trust = wn / un if wn > 0 and un > 0 else 1.0
    return theta - lr * trust * u


def lars(theta, g, st, lr, momentum=0.9, eta=0.001, weight_decay=0.0, excluded=False):
    wd = 0.0 if excluded else weight_decay
    wn, gn = theta.norm().item(), g.norm().item()
    local = 1.0 if excluded or not (wn > 0 and gn > 0) else eta * wn / (gn + wd * wn)
    buf = st["buf"] = momentum * st.get("buf", torch.zeros_like(g)) + lr * local * (g + wd * theta)
    return theta - buf


BASES = {"sgd": sgd, "adam": adam, "lamb": lamb, "lars": lars}


class Reference:
    """Runs one VR (or base, gamma=None) optimizer over explicit group gradients."""

    def __init__(self, params, base, gamma=None, beta3=0.0, interval=1, **hp):
        self.interval = interval
        self.theta = [p.detach().double().clone() for p in params]
        self.base, self.gamma, self.beta3, self.hp = BASES[base], gamma, beta3, hp
        self.state = [dict() for _ in params]

    def step(self, g_groups, hp_per_param=None):
        for i, gg in enumerate(g_groups):
            st = self.state[i]
            if self.gamma is None:
                g = gg.sum(0) / gg.shape[0]
            else:
                g = gsnr_scaled(gg, self.gamma, self.beta3, st, interval=self.interval)
            hp = dict(self.hp, **(hp_per_param[i] if hp_per_param else {}))
            self.theta[i] = self.base(self.theta[i], g, st, **hp)

    def run(self, model, loss_fn, batch, steps, k, hp_per_param=None):
        """``steps`` steps on ``batch(step)``: each step's k group gradients are computed
        explicitly at the reference's own weights (copied into ``model`` in fp32)."""
        for step in range(steps):
            with torch.no_grad():
                for p, t in zip(model.parameters(), self.theta):
                    p.copy_(t.float())
            x, y = batch(step)
            self.step(group_grads(model, loss_fn, x, y, k), hp_per_param)
        return self.theta


def max_rel_err(actual, expected):
    """max |a - e| / (max |e| + tiny) over a list of tensors."""
    worst = 0.0
    for a, e in zip(actual, expected):
        a, e = a.detach().double(), e.double()
        worst = max(worst, ((a - e).abs().max() / (e.abs().max() + 1e-12)).item())
    return worst


__all__ = ["group_grads", "gsnr_scaled", "Reference", "max_rel_err", "math"]
