"""How MicroStepMoments counts the gradient groups k, against the float64 reference.

k is the number of backward passes of a step. Two counts are kept: the backward() calls
(top-level autograd graph tasks; a reentrant checkpoint's nested backward belongs to the call
that runs it) and the most passes that reached one parameter. They agree unless no parameter
is reached by every pass; that case is ambiguous and raises until ``count_by`` says which.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from reference import Reference, group_grads, max_rel_err
from vrgd_ds import VRLAMB
from vrgd_ds.moments import MicroStepMoments

K, STEPS = 4, 3


class TwoBranches(torch.nn.Module):
    """A frozen stem, a trainable branch per task, no trainable parameter shared by the tasks
    (per-task adapters on a frozen model); optionally a trainable head shared by both, and the
    branches inside (reentrant or not) activation checkpoints."""

    def __init__(self, shared_head=False, ckpt=None):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Linear(6, 8).requires_grad_(False)
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)
        self.head.requires_grad_(shared_head)
        self.ckpt, self.task = ckpt, 0

    def forward(self, x):
        h = self.stem(x)
        if self.ckpt == "reentrant":  # its input must need a gradient (HF: enable_input_require_grads)
            h.requires_grad_(True)
        branch = self.a if self.task == 0 else self.b
        if self.ckpt is None:
            h = torch.tanh(branch(h))
        else:
            h = checkpoint(lambda t: torch.tanh(branch(t)), h, use_reentrant=self.ckpt == "reentrant")
        return self.head(h)


def loss_fn(out, y):
    return torch.nn.functional.mse_loss(out, y)


def data(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(K * 3, 6, generator=gen), torch.randn(K * 3, 3, generator=gen)


def task_of(group):  # micro-batches alternate between the two tasks
    return group % 2


def train(model, moments, split=False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = VRLAMB(params, lr=0.02, weight_decay=0.01, beta3=0.9, moments=moments)
    for step in range(STEPS):
        x, y = data(step)
        for j, (xb, yb) in enumerate(zip(x.chunk(K), y.chunk(K))):
            model.task = task_of(j)
            if split:  # the head's backward, then the body's, from its detached input: two calls
                h = model.stem(xb)
                body = torch.tanh((model.a if model.task == 0 else model.b)(h))
                cut = body.detach().requires_grad_(True)
                (loss_fn(model.head(cut), yb) / K).backward()
                body.backward(cut.grad)
            else:
                (loss_fn(model(xb), yb) / K).backward()
        opt.step()
        opt.zero_grad()
    return params


def reference(model):
    params = [p for p in model.parameters() if p.requires_grad]
    ref = Reference(params, "lamb", gamma=0.1, beta3=0.9, lr=0.02, weight_decay=0.01)
    for step in range(STEPS):
        with torch.no_grad():
            for p, t in zip(params, ref.theta):
                p.copy_(t.float())
        x, y = data(step)
        ref.step(group_grads(model, loss_fn, x, y, K, params,
                             before_group=lambda i: setattr(model, "task", task_of(i))))
    return ref.theta


def test_disjoint_branches_are_ambiguous_until_count_by_says_backward():
    """No parameter reached by every micro-batch: the most passes per parameter is 2 of 4."""
    model = TwoBranches()
    with pytest.raises(RuntimeError, match="4 backward\\(\\) calls reached the parameters, but no parameter was "
                                           "reached by more than 2 .* count_by='backward'"):
        train(model, MicroStepMoments([p for p in model.parameters() if p.requires_grad]))
    for ckpt in (None, "non-reentrant"):
        model = TwoBranches(ckpt=ckpt)
        moments = MicroStepMoments([p for p in model.parameters() if p.requires_grad], count_by="backward")
        got = train(model, moments)
        assert max_rel_err(got, reference(TwoBranches())) < 2e-5, ckpt
    # every trainable parameter inside reentrant checkpoints: the calls cannot be counted
    model = TwoBranches(ckpt="reentrant")
    with pytest.raises(RuntimeError, match="count_by='backward': no backward\(\) call reached .* use_reentrant=False"):
        train(model, MicroStepMoments([p for p in model.parameters() if p.requires_grad], count_by="backward"))


def test_several_backward_calls_per_micro_batch_need_count_by_parameter():
    """Each micro-batch runs the head's backward and then the body's: 8 calls, 4 groups."""
    model = TwoBranches(shared_head=True)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="8 backward\\(\\) calls .* more than 4 .* count_by='parameter'"):
        train(model, MicroStepMoments(params), split=True)
    model = TwoBranches(shared_head=True)
    got = train(model, MicroStepMoments([p for p in model.parameters() if p.requires_grad], count_by="parameter"),
                split=True)
    assert max_rel_err(got, reference(TwoBranches(shared_head=True))) < 2e-5


@pytest.mark.parametrize("ckpt", [None, "reentrant", "non-reentrant"])
def test_a_shared_parameter_needs_no_setting(ckpt):
    """A trainable head every micro-batch reaches: both counts are 4, with the branches inside
    activation checkpoints too (a reentrant checkpoint's nested backward is not a call of its own)."""
    model = TwoBranches(shared_head=True, ckpt=ckpt)
    moments = MicroStepMoments([p for p in model.parameters() if p.requires_grad])
    got = train(model, moments)
    assert max_rel_err(got, reference(TwoBranches(shared_head=True))) < 2e-5


def test_everything_inside_reentrant_checkpoints_counts_the_parameters():
    """Trainable parameters only inside reentrant checkpoints (adapters in checkpointed layers of
    a frozen model): autograd's own calls never reach them directly, so the per-parameter count
    is k. A shared branch here: both tasks use `a`."""
    model = TwoBranches(ckpt="reentrant")
    model.b = model.a
    moments = MicroStepMoments([p for p in model.parameters() if p.requires_grad])
    got = train(model, moments)
    x, y = data(0)
    for xb, yb in zip(x.chunk(K), y.chunk(K)):  # one more step's passes: what each count saw
        loss_fn(model(xb), yb).backward()
    assert moments._passes == 0 and moments.group_count == K
    ref_model = TwoBranches()
    ref_model.b = ref_model.a
    assert max_rel_err(got, reference(ref_model)) < 2e-5


def test_count_by_is_checked():
    with pytest.raises(ValueError, match="count_by must be one of \\('backward', 'parameter'\\) or None, got 'calls'"):
        MicroStepMoments([torch.nn.Parameter(torch.ones(2))], count_by="calls")
