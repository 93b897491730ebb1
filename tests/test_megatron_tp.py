"""vrgd_ds.megatron under tensor parallelism: 4 real gloo CPU ranks (tensor-parallel 2 x
data-parallel 2), Megatron's ColumnParallelLinear / RowParallelLinear, Megatron DDP and
optimizers, against the float64 reference of docs/algorithm.md on the whole model
(``tests/megatron_tp_cases.py``). Layer statistics (GSNR mean, LAMB/LARS trust ratios) are
over whole layers: a split weight's two parts together, a replicated one once. With
sequence parallelism too (the squares of partial gradients summed over the tensor-parallel
group first)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_cases import STEPS, float64_reference  # noqa: E402
from megatron_tp_cases import CASES, DP, TP, WORLD, make_qk_model, whole_params  # noqa: E402
from reference import max_rel_err  # noqa: E402
from spawn_ranks import spawn_ranks  # noqa: E402


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    from megatron_tp_cases import worker

    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("megatron_tp"))


@pytest.mark.parametrize("cid", list(CASES))
def test_matches_float64_reference(tp_results, cid):
    case = CASES[cid]
    ranks = [r["ranks"] for r in tp_results]
    assert ranks == [{"tp": r % TP, "dp": r // TP} for r in range(WORLD)]
    split = tp_results[0][cid]["tensor_parallel"]
    qk = case.extra.get("qk_layernorm", False)
    assert split == {"fc1.weight": True, "fc1.bias": True, **({"q_layernorm.weight": False} if qk else {}),
                     "fc2.weight": True, "fc2.bias": False, "fc3.weight": False, "fc3.bias": False}
    # a replicated parameter is the same on both tensor-parallel ranks; the data-parallel ranks agree
    for d in range(DP):
        for name, is_split in split.items():
            if not is_split:
                torch.testing.assert_close(tp_results[d * TP][cid]["params"][name],
                                           tp_results[d * TP + 1][cid]["params"][name], rtol=0, atol=0)
    got = whole_params(tp_results, cid, 0)
    torch.testing.assert_close(got, whole_params(tp_results, cid, 1), rtol=0, atol=0)
    err = max_rel_err(got, float64_reference(case.optimizer, DP * case.accum, case.clip,
                                             model_fn=make_qk_model if qk else None))
    # bf16/fp16 forward and backward (8 / 11 mantissa bits) against the fp32-model reference,
    # as tests/test_megatron.py::test_bf16_close_to_reference
    assert err < (3e-2 if case.low_precision else 2e-5), f"{cid}: max relative error {err:.2e}"
    if case.optimizer.startswith("vr"):
        assert tp_results[0][cid]["k"] == DP * case.accum
    assert tp_results[0][cid]["layout_bytes"] > 0  # the layer sums did cross the tensor-parallel group


def test_partial_gradients_are_refused(tp_results):
    for r in tp_results:
        got = r["refusals"]
        msg = got["average_gradients_across_tp_domain"]
        assert msg and "fc3.weight" in msg and "average_gradients_across_tp_domain" in msg, got
        msg = got["differs"]
        assert msg and "parameter fc3.weight differs between the tensor-parallel ranks" in msg, got
        msg = got["unmarked"]
        assert msg and "fc1.weight" in msg and "perform_initialization=True" in msg, got


@pytest.mark.parametrize("fmt", ["resume", "resume sharded"])
def test_resume_is_bitwise(tp_results, fmt):
    """3 steps, save, 2 steps; a new run loads the checkpoint and takes the same 2 steps."""
    from megatron_tp_cases import RESUME

    for r in tp_results:
        for cid in RESUME:
            got = r["checkpoints"][fmt][cid]
            assert got["a"] and len(got["a"]) == len(got["b"])
            torch.testing.assert_close(got["b"], got["a"], rtol=0, atol=0)


def test_checkpoint_keeps_each_tensor_parallel_part_and_refuses_another_size(tp_results):
    files = tp_results[0]["checkpoints"]["files"]
    names = ["fc1.bias#tp0", "fc1.bias#tp1", "fc1.weight#tp0", "fc1.weight#tp1", "fc2.bias", "fc2.weight#tp0",
             "fc2.weight#tp1", "fc3.bias", "fc3.weight"]
    assert files["names"] == names and files["sharded names"] == names
    assert files["tensor_parallel_size"] == TP
    assert files["shards"] == ["meta.pt", *[f"shard-{r:05d}-of-{WORLD:05d}.pt" for r in range(WORLD)]]
    for r in tp_results:
        msg = r["other tp size"]
        assert msg and "saved with tensor_model_parallel_size=2, this run has 1" in msg, msg


def test_megatron_dist_checkpoint_resumes_bitwise(tp_results):
    """Megatron's distributed checkpointing (dist_checkpointing.save / load, torch_dist) with
    the optimizer's sharded_state_dict / load_state_dict: 3 steps, save, 2 steps; a new run
    loads it and takes the same 2 steps, bit for bit (with and without the distributed
    optimizer, with sequence parallelism); a save before the first step loads as one."""
    from megatron_tp_cases import DIST

    for r in tp_results:
        got = r["dist checkpoints"]
        for cid in DIST:
            assert got[cid]["a"] and len(got[cid]["a"]) == len(got[cid]["b"])
            torch.testing.assert_close(got[cid]["b"], got[cid]["a"], rtol=0, atol=0)
        torch.testing.assert_close(got["unstepped b"], got["unstepped a"], rtol=0, atol=0)
        for cid in DIST[:2]:  # SwiGLU's ShardedTensorFactory: 2 tensors per rank
            torch.testing.assert_close(got[f"glu {cid}"], got[DIST[0]]["a"], rtol=0 if cid == DIST[0] else 1e-5,
                                       atol=0 if cid == DIST[0] else 1e-6)
        msg = got["other optimizer"]
        assert msg and "holds the state of VRLAMB, this run's optimizer is VRAdamW" in msg, msg
        msg = got["other state"]
        assert msg and "has the optimizer state ['exp_avg', 'exp_avg_sq', 'gsnr_momentum'] in the checkpoint, " \
                       "this run's VRLAMB keeps ['exp_avg', 'exp_avg_sq']" in msg, msg
        msg = got["other groups"]
        assert msg and "is in param group 1 in the checkpoint, 0 in this run" in msg, msg
        msg = got["more groups"]
        assert msg and "the checkpoint has 2 param groups, this optimizer 3" in msg, msg
        msg = got["fsdp"]
        assert msg and "'fsdp_dtensor' (Megatron FSDP) is not supported" in msg, msg


def test_megatron_dist_checkpoint_reshards(tp_results):
    """The distributed optimizer's checkpoint of tensor-parallel 2 x data-parallel 2 loads
    without the distributed optimizer (same sizes), and on 4 data-parallel ranks without
    tensor parallelism (with and without it): the 2 steps after it equal the unbroken run's to
    float32 rounding (the layers' arithmetic differs between the layouts)."""
    from megatron_tp_cases import DIST, SPLIT_DIM

    for d in range(DP):
        want = tp_results[d * TP]["dist checkpoints"][DIST[0]]["a"]
        cross = tp_results[d * TP]["dist checkpoints"]["cross"]
        torch.testing.assert_close(cross, want, rtol=1e-5, atol=1e-6)
    names = list(SPLIT_DIM) + ["fc2.bias", "fc3.weight", "fc3.bias"]
    a = {n: p for n, p in zip(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"],
                              whole_dist_params(tp_results, DIST[0]))}
    for r in tp_results:
        for cid in DIST[:2]:
            got = r["dist tp1"][cid]
            assert sorted(got) == sorted(names)
            for n in names:
                torch.testing.assert_close(got[n], a[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{cid} {n}: {m}")
            # SwiGLU's fc1 weight resharded 2 -> 1: the optimizer's fp32 weights (set into the model
            # by load_state_dict) are the model's own loaded weights, rows moved; the rest as saved
            glu = r["dist tp1"][f"glu {cid}"]
            for n, w in glu["model"].items():
                torch.testing.assert_close(glu["after"][n], w, rtol=0, atol=0)
            saved = [tp_results[t]["dist checkpoints"]["glu saved"][0] for t in range(TP)]  # fc1.weight parts
            half = saved[0].shape[0] // 2
            moved = torch.cat([s[:half] for s in saved] + [s[half:] for s in saved])
            torch.testing.assert_close(glu["after"]["fc1.weight"], moved, rtol=0, atol=0)


def whole_dist_params(results, cid):
    """The unbroken tensor-parallel run's parameters, the split ones put back together."""
    from megatron_tp_cases import SPLIT_DIM

    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    parts = [results[t]["dist checkpoints"][cid]["a"] for t in range(TP)]
    return [torch.cat([part[i] for part in parts], SPLIT_DIM[n]) if n in SPLIT_DIM else parts[0][i]
            for i, n in enumerate(names)]


def _same(got, want, where):
    if want is None:  # trace_cov and b_simple: samples per group are not known to the Megatron source
        assert got is None, where
    else:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12), where


TELEMETRY = ("vrlamb-do1-ov1-a2-telemetry", "vrlamb-do1-ov1-a2-sp-telemetry")


def test_noise_scale_telemetry_is_over_whole_layers(tp_results):
    """The telemetry record (GSNR means, clamped fractions, gradient noise scale per layer
    and for the model) equals the run of the same 4 gradient groups on 4 data-parallel
    ranks without tensor parallelism, on every rank; with sequence parallelism too (the
    squares of partial gradients summed over the tensor-parallel group first)."""
    want = tp_results[0]["telemetry dp4"]
    assert want["step"] == STEPS and want["k"] == 4  # the last of the STEPS steps
    assert want["grad_sq"] > 0 and want["group_var"] > 0
    model_keys = ("trace_cov", "grad_sq", "b_simple", "group_var", "clamped_fraction")
    layer_keys = ("gsnr_mean", "clamped_fraction", "trace_cov", "grad_sq", "b_simple", "group_var")
    for r, cid in ((r, cid) for r in tp_results for cid in TELEMETRY):
        got = r[cid]["telemetry"]
        assert got["step"] == want["step"] and got["k"] == want["k"]
        for key in model_keys:
            _same(got[key], want[key], key)
        assert sorted(got["layers"]) == sorted(want["layers"])
        for layer, row in want["layers"].items():
            assert got["layers"][layer]["numel"] == row["numel"], layer  # whole layers: 96, 16, 256, ...
            for key in layer_keys:
                _same(got["layers"][layer][key], row[key], (layer, key))


@pytest.mark.parametrize("shape", [(), (7,), (4, 5), (3, 4, 5), (2, 1, 3, 4)])
def test_flat_ranges_become_contiguous_boxes_in_order(shape):
    """How a distributed-optimizer shard's element range of a parameter is written as N-D
    chunks (vrgd_ds.megatron.dist_checkpoint._boxes): every range of every shape, as at most
    2 * ndim - 1 boxes that are, in order, exactly the range's elements."""
    from vrgd_ds.megatron.dist_checkpoint import _boxes

    n = max(1, int(torch.tensor(shape).prod()))
    index = torch.arange(n).reshape(shape)
    for s in range(n):
        for e in range(s + 1, n + 1):
            boxes = _boxes(shape, s, e)
            assert len(boxes) <= max(1, 2 * len(shape) - 1)
            got = [index[tuple(slice(o, o + b) for o, b in zip(off, box))].reshape(-1) for off, box in boxes]
            assert torch.equal(torch.cat(got), torch.arange(s, e)), (shape, s, e, boxes)


def test_a_state_tensor_is_the_tensor_its_boxes_were_read_into_only_when_they_tile_it():
    """A dist load keeps as the state the tensor torch.distributed.checkpoint read a
    parameter's boxes into (vrgd_ds.megatron.dist_checkpoint._read) only when the boxes are,
    in order, contiguous views that cover it exactly; any other boxes are put together anew,
    in element order."""
    from vrgd_ds.megatron.dist_checkpoint import _read

    target = torch.arange(24.0)
    grid = target.view(4, 6)
    tiles = [grid[:1], grid[1:3], grid[3:]]
    assert _read(tiles, target) is target  # views in order, covering it: the tensor itself
    window = torch.arange(40.0)[8:32]  # a target that starts inside its storage
    assert _read([window[:10].view(2, 5), window[10:]], window) is window

    def joined(boxes, target):
        got = _read(boxes, target)
        assert got is not target and got.untyped_storage().data_ptr() != target.untyped_storage().data_ptr()
        return got

    assert torch.equal(joined([tiles[1], tiles[0], tiles[2]], target),  # out of order
                       torch.cat([target[6:18], target[:6], target[18:]]))
    assert torch.equal(joined(tiles[:2], target), target[:18])  # not all of it
    assert torch.equal(joined([grid[:, :3], grid[:, 3:]], target),  # views that are not contiguous
                       torch.cat([grid[:, :3].reshape(-1), grid[:, 3:].reshape(-1)]))
    copies = [t.clone() for t in tiles]  # read elsewhere
    assert torch.equal(joined(copies, target), target)
    assert torch.equal(joined([target[:6], target[7:]], target), torch.cat([target[:6], target[7:]]))  # a gap
    assert torch.equal(_read(tiles, None), target)  # nothing was read in place
