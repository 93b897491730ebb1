"""The flat kernels' machinery: plans, passes, flat parameter buckets, compile fallback."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from vrgd_ds import LAMB, MicroStepMoments
from vrgd_ds.optim import flat
from vrgd_ds.optim.flat import FlatPlan, Spec, constants, run_pass, segment_table
from vrgd_ds.optim.flat_group import aliased_flat

from test_optim_matrix import DEVICE, SPECS, make_model, make_opt, micro_steps, reference_run, train
from host_reads import HostReads
from reference import max_rel_err

BY_NAME = {s.name: s for s in SPECS}


def random_segments(rng, count=30, numel=(1, 40), gap=(0, 3)):
    segs, at = [], rng.randint(0, 5)
    for _ in range(count):
        n = rng.randint(*numel)
        segs.append((at, n))
        at += n + rng.randint(*gap)
    return segs, at


@pytest.mark.parametrize("row", [4, 8, 16])
@pytest.mark.parametrize("seed", range(4))
def test_plan_covers_every_segment_element_once(seed, row):
    segs, total = random_segments(random.Random(seed))
    plan = FlatPlan(segs, "cpu", row=row)
    owner = torch.full((total,), -1)
    for i, (off, n) in enumerate(segs):
        owner[off:off + n] = i
    seen = torch.zeros(total, dtype=torch.long)
    for b in plan.blocks:
        for r in range(b.rows):
            lo = b.start + r * row
            if b.row_ok[r, 0]:  # a whole row inside its segment
                assert (owner[lo:lo + row] == b.row_seg[r]).all()
                seen[lo:lo + row] += 1
    seen.index_add_(0, plan.edge_idx, torch.ones_like(plan.edge_idx))
    assert torch.equal(plan.edge_seg, owner[plan.edge_idx])
    assert torch.equal(seen, (owner >= 0).long())  # every segment element once, no gap element


def double_and_sum(spec, x, s, c):
    return {"a": x["a"] * spec.s(s, "k") + spec.c(c, "add")}, (x["a"], x["a"] * x["a"])


@pytest.mark.parametrize("compile", [False, True])
def test_run_pass_updates_segments_only_and_sums_them(compile):
    segs, total = random_segments(random.Random(7), count=12, numel=(1, 60))
    plan = FlatPlan(segs, "cpu", row=8)
    a = torch.randn(total, generator=torch.Generator().manual_seed(3))
    before = a.clone()
    spec = Spec(("ok", "k"), ("add",))
    k = [float(i + 2) for i in range(len(segs))]
    table = segment_table(spec, {"k": k}, len(segs), "cpu")
    sums = run_pass(double_and_sum, spec, plan, {"a": a}, writes=("a",), table=table,
                    c=constants(spec, {"add": 0.5}, "cpu"), compile=compile, n_terms=2)
    inside = torch.zeros(total, dtype=torch.bool)
    for i, (off, n) in enumerate(segs):
        inside[off:off + n] = True
        torch.testing.assert_close(a[off:off + n], before[off:off + n] * k[i] + 0.5)
        piece = before[off:off + n].double()
        # row sums are fp32 (added up in float64): fp32 rounding of up to 8 terms near 1
        torch.testing.assert_close(sums[i], torch.stack([piece.sum(), (piece * piece).sum()]), rtol=1e-6, atol=1e-5)
    assert torch.equal(a[~inside], before[~inside])  # padding between segments is never written


def test_record_passes_logs_each_kernel_with_its_elements_and_arrays():
    segs, total = random_segments(random.Random(5), count=12, numel=(1, 60))
    plan = FlatPlan(segs, DEVICE, row=8)
    a, b = torch.randn(total, device=DEVICE), torch.randn(total, device=DEVICE)
    spec = Spec(("ok", "k"), ("add",))
    table = segment_table(spec, {"k": [1.0] * len(segs)}, len(segs), DEVICE)

    def run():
        run_pass(double_and_sum, spec, plan, {"a": a, "b": b}, writes=("a",), table=table,
                 c=constants(spec, {"add": 0.5}, DEVICE), compile=False, n_terms=2)

    run()  # nothing is recorded outside the block
    with flat.record_passes() as outer:
        run()
        # a synchronised block (waits for the device around each pass, where there is CUDA)
        # inside a plain one: each ends as it began
        with flat.record_passes(sync=True) as inner:
            run()
            assert flat._SYNC == torch.cuda.is_available()
        assert flat.recording() and not flat._SYNC
    assert not flat.recording()
    for log in (outer, inner):
        assert [e["kind"] for e in log] == ["block"] * len(plan.blocks) + ["edge"]
        assert all(e["fn"] == "double_and_sum" and e["reads"] == 2 and e["writes"] == 1 and e["arrays"] == 2
                   and e["seconds"] > 0
                   for e in log)
        assert sum(e["elements"] for e in log) == sum(b.rows * 8 for b in plan.blocks) + plan.edge_idx.numel()
    # the block's rows include those straddling segments, which the edge kernel does over
    assert sum(n for _, n in segs) <= sum(e["elements"] for e in outer)


def test_parameters_are_viewed_as_one_buffer_once():
    model = make_model()
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    held = params[0]  # a reference a user holds
    opt = LAMB(params, lr=0.0, weight_decay=0.0)  # lr 0: nothing moves
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    base = params[0].data_ptr()
    at = 0
    for p, v in zip(params, values):
        assert p.data_ptr() == base + at * 4 and torch.equal(p, v)
        at += p.numel()
    assert held is params[0] and held.data_ptr() == base
    twin = LAMB(params, lr=0.0)  # a second optimizer over the same parameters finds them flat
    twin.step()
    assert params[0].data_ptr() == base


def test_moved_parameters_are_followed_exactly():
    spec = BY_NAME["VRLAMB"]
    straight, moved = make_model(), make_model()
    train(spec, straight, 5)
    opt = train(spec, moved, 2)
    with torch.no_grad():
        for p in moved.parameters():
            p.data = p.data.clone()  # what module.to() or load_state_dict(assign=True) do
    train(spec, moved, 3, start=2, opt=opt, moments=opt.moments)
    for a, b in zip(straight.parameters(), moved.parameters()):
        assert torch.equal(a, b)


def test_parameters_sharing_a_buffer_are_gathered_not_moved():
    spec = BY_NAME["VRLAMB"]
    plain = make_model()
    shared = make_model()
    params = list(shared.parameters())
    buf = torch.zeros(sum(p.numel() for p in params) + 7, device=params[0].device)  # reversed, a gap: not ours
    at = 7
    with torch.no_grad():
        for p in reversed(params):
            view = buf[at:at + p.numel()].view_as(p)
            view.copy_(p)
            p.data = view
            at += p.numel()
    ptrs = [p.data_ptr() for p in params]
    train(spec, plain, 4)
    train(spec, shared, 4)
    assert [p.data_ptr() for p in params] == ptrs
    for a, b in zip(plain.parameters(), shared.parameters()):
        assert torch.equal(a, b)


def test_mixed_dtypes_in_one_group_are_two_buckets():
    spec = BY_NAME["VRLAMB"]
    model = make_model()
    model[2].to(torch.bfloat16)
    x = torch.randn(16, 6, device=model[0].weight.device)
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, model.parameters(), "default", moments)
    for _ in range(4):
        for xb in x.chunk(4):  # k = 4 gradient groups
            out = model[2](model[1](model[0](xb)).to(torch.bfloat16))
            (out.float().square().mean() / 4).backward()
        opt.step()
        opt.zero_grad()
    assert model[2].weight.dtype == torch.bfloat16 and model[0].weight.dtype == torch.float32
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert len(opt._buckets[0][1]) == 2


def test_state_is_per_parameter_views_of_one_buffer():
    spec = BY_NAME["VRLAMB"]
    model = make_model()
    opt = train(spec, model, 2)
    sd = opt.state_dict()
    params = list(model.parameters())
    for i, p in enumerate(params):
        assert set(sd["state"][i]) >= {"exp_avg", "exp_avg_sq", "gsnr_momentum", "step"}
        assert sd["state"][i]["exp_avg"].shape == p.shape
    m = [opt.state[p]["exp_avg"] for p in params]
    assert all(t.untyped_storage().data_ptr() == m[0].untyped_storage().data_ptr() for t in m)


def _same_storage(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_micro_step_moments_write_into_the_optimizers_buffers_after_the_first_step():
    """After step 1 the squares live in the bucket's flat buffer and p.grad is a view of its
    gradient buffer (autograd adopts the view), so the step gathers nothing."""
    spec = BY_NAME["VRLAMB"]
    model = make_model()
    opt = train(spec, model, 1)
    bucket = opt._buckets[0][1][0]
    train(spec, model, 1, start=1, opt=opt, moments=opt.moments)  # zero_grad: p.grad None again
    micro_steps(model, 2)
    for p in model.parameters():
        assert _same_storage(p.grad, bucket.work["g"]) and not p.grad.requires_grad
        assert _same_storage(opt.moments.sum_sq(p), bucket.work["sq"])
    assert aliased_flat([p.grad for p in model.parameters()], bucket.offsets, bucket.numel) is not None


@pytest.mark.parametrize("held", ["none", "one", "all"])
def test_gradients_the_user_replaced_are_gathered_with_the_same_result(held):
    """p.grad replaced by the user's own tensor (all of them, or one: the step then gathers
    into the buffer the others already lie in) gives the same parameters bit for bit."""
    spec = BY_NAME["VRLAMB"]
    runs = []
    for variant in ("none", held):
        model = make_model()
        moments = MicroStepMoments(model.parameters())
        opt = make_opt(spec, model.parameters(), "default", moments)
        for step in range(4):
            micro_steps(model, step)
            params = list(model.parameters())
            chosen = {"none": [], "one": params[1:2], "all": params}[variant]
            for p in chosen:
                p.grad = p.grad.clone()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert max_rel_err(runs[0], reference_run(spec, 4)) < 2e-5


def test_squares_of_a_parameter_no_backward_reached_are_zero():
    """The first hit of a step writes h^2 without a zeroing pass; a parameter that no backward
    pass reached on a step reads as zeros (p.grad kept as zeros by set_to_none=False)."""
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    moments = MicroStepMoments([*a.parameters(), *b.parameters()])
    opt = make_opt(BY_NAME["VRLAMB"], [*a.parameters(), *b.parameters()], "default", moments)
    x = torch.randn(4, 3)
    for _ in range(2):
        for xb in x.chunk(2):
            (a(xb).sum() + b(xb).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    hs = []
    for xb in x.chunk(2):
        hs.append(torch.ones(2, 1) * xb.sum(0, keepdim=True))  # d sum(a(x)) / d a.weight
        a(xb).sum().backward()
    assert torch.equal(moments.sum_sq(b.weight), torch.zeros_like(b.weight))
    assert torch.allclose(moments.sum_sq(a.weight), hs[0] * hs[0] + hs[1] * hs[1], rtol=1e-6, atol=0)
    assert moments.group_count == 2


def _lamb_u(opt, params, before, wd, eps=1e-6, betas=(0.9, 0.999)):
    """LAMB's u per parameter from the optimizer's state after the step and the parameters before it."""
    out = []
    for p, w in zip(params, before):
        st = opt.state[p]
        t = st["step"]
        m = st["exp_avg"] / (1 - betas[0] ** t)
        v = st["exp_avg_sq"] / (1 - betas[1] ** t)
        out.append((m / (v.sqrt() + eps) + wd * w).reshape(-1))
    return torch.cat(out)


def test_lamb_keeps_u_in_an_input_the_step_owns_never_in_the_users_gradient():
    """LAMB's second pass reads u from the first: written over the gathered gradient copy
    (plain LAMB), or over the squared gradients in the bucket's buffer (VRLAMB whose moment
    source placed them there), never over p.grad the user sees."""
    model = make_model()
    params = list(model.parameters())
    opt = LAMB(params, lr=0.01, weight_decay=0.01)
    micro_steps(model, 0)
    grads, before = [p.grad.clone() for p in params], [p.detach().clone() for p in params]
    opt.step()
    bucket = opt._buckets[0][1][0]
    assert bucket.copied["g"]
    assert torch.allclose(bucket.work["g"], _lamb_u(opt, params, before, 0.01), rtol=1e-5, atol=1e-7)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # the user's gradient is untouched

    spec = BY_NAME["VRLAMB"]
    model = make_model()
    params = list(model.parameters())
    opt = train(spec, model, 2)
    micro_steps(model, 2)
    bucket = opt._buckets[0][1][0]
    assert _same_storage(params[0].grad, bucket.work["g"])  # placed: the step must not write there
    grads, before = [p.grad.clone() for p in params], [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert torch.allclose(bucket.work["sq"], _lamb_u(opt, params, before, 0.01), rtol=1e-5, atol=1e-7)
    opt.zero_grad()


def test_autograd_grad_results_and_existing_gradients_are_left_alone():
    """Only a p.grad that the backward pass creates is handed over: a torch.autograd.grad
    result never aliases the optimizer's buffer, and a p.grad that already existed keeps its
    identity and is accumulated into."""
    spec = BY_NAME["VRLAMB"]
    model = make_model()
    opt = train(spec, model, 2)
    bucket = opt._buckets[0][1][0]
    x = torch.randn(8, 6, device=DEVICE)
    params = list(model.parameters())
    got = torch.autograd.grad(model(x).square().mean(), params)
    kept = [g.clone() for g in got]
    assert not any(_same_storage(g, bucket.work["g"]) for g in got)
    opt.moments.reset()
    mine = torch.ones_like(params[0])
    params[0].grad = mine
    model(x).square().mean().backward()
    assert all(torch.equal(g, k) for g, k in zip(got, kept))
    assert params[0].grad is mine and not torch.equal(mine, torch.ones_like(mine))
    assert all(_same_storage(p.grad, bucket.work["g"]) for p in params[1:])
    opt.zero_grad()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_create_graph_gradients_keep_their_graph():
    """With create_graph=True the gradient is left where autograd puts it (it has a graph)."""
    spec = BY_NAME["VRLAMB"]
    model = make_model()
    opt = train(spec, model, 2)
    x = torch.randn(8, 6, device=DEVICE)
    model(x).square().mean().backward(create_graph=True)
    bucket = opt._buckets[0][1][0]
    assert all(p.grad.requires_grad and not _same_storage(p.grad, bucket.work["g"]) for p in model.parameters())
    opt.zero_grad()


def _train_plain(spec, steps, flat_grads=True, meddle=None, set_to_none=True):
    """``steps`` steps of ``spec`` (K micro-steps each, no moment source for the base
    optimizers); ``meddle(step, model, opt)`` runs after the backward passes. Returns the
    model, the optimizer and per step how many gradients the step gathered."""
    model = make_model()
    moments = MicroStepMoments(model.parameters()) if spec.vr else None
    opt = make_opt(spec, model.parameters(), "default", moments)
    opt.flat_grads = flat_grads
    if moments is not None:
        moments.flat_grads = flat_grads  # a moment source that places p.grad has its own switch
    moved = []
    for step in range(steps):
        micro_steps(model, step)
        if meddle is not None:
            meddle(step, model, opt)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # p.grad untouched
        moved.append(opt._buckets[0][1][0].moved.get("g"))
        opt.zero_grad(set_to_none=set_to_none)
    return model, opt, moved


@pytest.mark.parametrize("name", ["LAMB", "LARS", "VRLAMB"])
def test_the_optimizer_hands_the_gradient_over_after_gathering_it_once(name):
    """A bucket whose gradients the step had to gather gets them handed over from the next
    backward pass on (p.grad a view of its flat gradient buffer): later steps gather nothing and
    give the same parameters bit for bit. A bucket a moment source places (VRLAMB with
    MicroStepMoments) is left to it: the optimizer hooks nothing of its own."""
    spec = BY_NAME[name]
    model, opt, moved = _train_plain(spec, 5)
    bucket = opt._buckets[0][1][0]
    micro_steps(model, 5)
    assert all(_same_storage(p.grad, bucket.work["g"]) for p in model.parameters())
    assert moved == [len(bucket.params)] + [0] * 4
    if spec.vr:
        assert opt._hand_over is None and bucket.grads_home is None and bucket.placed_for is opt.moments
    else:
        assert bucket.grads_home and len(opt._hand_over._handles) == len(bucket.params)
    gathered, _, moved_off = _train_plain(spec, 5, flat_grads=False)
    assert moved_off == [len(bucket.params)] * 5
    for a, b in zip(model.parameters(), gathered.parameters()):
        assert torch.equal(a, b)
    assert max_rel_err(list(gathered.parameters()), reference_run(spec, 5)) < 2e-5


@pytest.mark.parametrize("how", ["clone", "none-then-own"])
def test_a_gradient_re_pointed_after_the_hand_over_drops_the_bucket_for_good(how):
    """Something that re-points a handed-over p.grad before the step (DDP's
    gradient_as_bucket_view, Megatron's main_grad, the user) drops that bucket's hand-over: its
    hooks go, it is gathered from then on, and the parameters are those of a gathering run."""
    spec = BY_NAME["LAMB"]

    def meddle(step, model, opt):
        if step == 2:
            p = list(model.parameters())[1]
            p.grad = p.grad.clone() if how == "clone" else torch.zeros_like(p).copy_(p.grad)

    model, opt, moved = _train_plain(spec, 5, meddle=meddle)
    bucket = opt._buckets[0][1][0]
    assert moved == [4, 0, 1, 4, 4]
    assert bucket.grads_home is False and not opt._hand_over._handles and not opt._hand_over.homes
    gathered, _, _ = _train_plain(spec, 5, flat_grads=False)
    for a, b in zip(model.parameters(), gathered.parameters()):
        assert torch.equal(a, b)


def test_flat_grads_false_stops_the_hand_over_and_true_starts_it_again():
    spec = BY_NAME["LARS"]

    def meddle(step, model, opt):
        opt.flat_grads = step not in (2, 3)

    model, opt, moved = _train_plain(spec, 6, meddle=meddle)
    # step 2 (off) still finds the gradients handed over by then; step 3 gathers; step 4 (on
    # again) gathers once more and hands over for step 5
    assert moved == [4, 0, 0, 4, 4, 0]
    gathered, _, _ = _train_plain(spec, 6, flat_grads=False)
    for a, b in zip(model.parameters(), gathered.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="flat_grads must be True or False, got 1"):
        opt.flat_grads = 1


def test_an_optimizer_that_is_gone_leaves_no_hooks_behind():
    """A new optimizer for the same model (a second training phase) finds p.grad where
    autograd puts it: the old one's hooks went with it."""
    import gc

    model, opt, _ = _train_plain(BY_NAME["LAMB"], 2)
    buffer = opt._buckets[0][1][0].work["g"]
    params = list(model.parameters())
    assert all(p._post_accumulate_grad_hooks for p in params)
    del opt
    gc.collect()
    assert not any(p._post_accumulate_grad_hooks for p in params)
    micro_steps(model, 2)
    assert not any(_same_storage(p.grad, buffer) for p in params)


def test_a_frozen_parameter_in_the_group_leaves_the_others_handed_over():
    """A parameter with requires_grad=False in the group (never a gradient) is not hooked; the
    others are handed over and the step reads them in place."""
    spec = BY_NAME["LAMB"]

    def train_frozen(flat_grads):
        model = make_model()
        model[0].bias.requires_grad_(False)
        opt = make_opt(spec, model.parameters(), "default")
        opt.flat_grads = flat_grads
        moved = []
        for step in range(4):
            micro_steps(model, step)
            opt.step()
            moved.append(opt._buckets[0][1][0].moved.get("g"))
            opt.zero_grad()
        return model, opt, moved

    model, opt, moved = train_frozen(True)
    assert moved == [3, 0, 0, 0]
    assert set(opt._hand_over._handles) == {p for p in model.parameters() if p.requires_grad}
    gathered, _, _ = train_frozen(False)
    for a, b in zip(model.parameters(), gathered.parameters()):
        assert torch.equal(a, b)


def test_gradients_kept_by_zero_grad_set_to_none_false_are_not_re_pointed():
    """zero_grad(set_to_none=False) keeps autograd's own p.grad: nothing is handed over (only a
    p.grad the backward pass creates is), the step gathers it, the result is the same."""
    spec = BY_NAME["LAMB"]
    model, opt, moved = _train_plain(spec, 4, set_to_none=False)
    assert moved == [4] * 4 and not opt._hand_over.handed
    gathered, _, _ = _train_plain(spec, 4, flat_grads=False, set_to_none=False)
    for a, b in zip(model.parameters(), gathered.parameters()):
        assert torch.equal(a, b)


def scaled_by_flag(spec, x, s, c):
    return {"a": x["a"] * float(spec.flags[0])}, ()


@torch._dynamo.config.patch(recompile_limit=8)
def test_more_graphs_than_dynamos_default_limit_stay_compiled():
    """Each spec is its own graph of the one block kernel; 12 of them exceed dynamo's default
    recompile limit (8), which must not send a compile=True pass to an error or eager."""
    segs, total = random_segments(random.Random(11), count=6, numel=(20, 40))
    plan = FlatPlan(segs, "cpu", row=8)
    a = torch.randn(total, generator=torch.Generator().manual_seed(5))
    expect = a.clone()
    inside = torch.zeros(total, dtype=torch.bool)
    for off, n in segs:
        inside[off:off + n] = True
    code = flat._block_kernel.__code__
    before = len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code))
    for i in range(12):
        spec = Spec(("ok",), (), (1.0 + i / 64,))  # a distinct flag: a distinct graph
        run_pass(scaled_by_flag, spec, plan, {"a": a}, writes=("a",), table=segment_table(spec, {}, len(segs), "cpu"),
                 c=constants(spec, {}, "cpu"), compile=True)
        expect[inside] *= 1.0 + i / 64
    assert len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)) >= before + 12
    torch.testing.assert_close(a, expect)
    assert not flat._FAILED


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    spec = BY_NAME["VRLAMB"]

    def broken(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return fail

    monkeypatch.setattr(flat, "ROW", 4)
    eager = make_model()
    train(spec, eager, 3, "rows")
    monkeypatch.setattr(flat, "COMPILE_MIN", 0)
    monkeypatch.setattr(flat, "_COMPILED", {})
    monkeypatch.setattr(flat, "_FAILED", set())
    monkeypatch.setattr(torch, "compile", broken)
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(spec, model, 3, "default")
    ours = [w for w in caught if "torch.compile of the flat optimizer kernels failed" in str(w.message)]
    assert len(ours) == 1 and "no C++ compiler here" in str(ours[0].message)
    for a, b in zip(eager.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        train(spec, make_model(), 1, "compiled")


@pytest.mark.parametrize("name", ["VRLAMB", "VRLARS", "VRAdamW", "LAMB"])
def test_compiled_edge_kernel_matches_the_reference(name, monkeypatch):
    """Default settings where they compile (here: the tiny model's edge elements)."""
    monkeypatch.setattr(flat, "COMPILE_MIN", 0)
    spec = BY_NAME[name]
    model = make_model()
    train(spec, model, 3, "default")
    assert max_rel_err(list(model.parameters()), reference_run(spec, 3)) < 2e-5


def test_micro_step_moments_rejects_a_non_bool_flat_grads():
    with pytest.raises(ValueError, match="flat_grads must be True or False, got 'yes'"):
        MicroStepMoments(make_model().parameters(), flat_grads="yes")
    moments = MicroStepMoments(make_model().parameters())
    with pytest.raises(ValueError, match="flat_grads must be True or False, got 1"):
        moments.flat_grads = 1  # set later, as the optimizer's switch is
    assert moments.flat_grads is True


def reads_of_the_third_step(name, clip=None):
    """What vrgd_ds reads back in the third step of ``name`` (HostReads), clipping the mean
    gradient first when ``clip`` is given (the first steps build buckets and plans once)."""
    spec = BY_NAME[name]
    model = make_model()
    moments = MicroStepMoments(model.parameters())
    opt = make_opt(spec, model.parameters(), "default", moments)
    for step in range(3):
        micro_steps(model, step)
        with HostReads(DEVICE) as reads:
            if clip is not None:
                moments.clip_grad_norm_(clip)
            opt.step()
        opt.zero_grad()
    assert moments.clip_scale == 1.0  # reset with the step
    return reads


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_a_step_reads_back_at_most_the_gsnr_layer_sums(name):
    """The device never waits for the host inside a step, except once on a GSNR step: the
    layer sums of r_raw decide, before any state changes, whether the step raises or skips on a
    non-finite value and which layers take the float64 path. LAMB's and LARS's per-layer
    ratios, the segment tables and the ZeRO layer index stay on the device or are queued to it."""
    reads = reads_of_the_third_step(name)
    assert reads.ours == (1 if BY_NAME[name].vr else 0), reads.where


@pytest.mark.parametrize("name", ["VRLAMB", "VRAdamW"])
def test_clipping_adds_no_read_back(name):
    """``moments.clip_grad_norm_`` keeps its factor on the device (it enters the squares' scale
    there): clipping and a GSNR step read back once in all, and the result is exact (the
    clipping tests of test_optim_matrix.py compare it with the reference)."""
    reads = reads_of_the_third_step(name, clip=0.05)
    assert reads.ours == 1, reads.where
