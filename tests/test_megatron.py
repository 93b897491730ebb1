"""vrgd_ds.megatron on 2 real gloo CPU ranks with real megatron-core DDP and optimizers.

One ``mp.spawn`` runs every case of ``megatron_cases.CASES`` (and the refusals); the tests
compare each case with the float64 reference of docs/algorithm.md (``tests/reference.py``),
over the k = W x a explicit group gradients. The only non-Megatron code in the workers is
the CUDA-to-CPU redirection of ``megatron_cpu.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_cases import CASES, WORLD, float64_reference, loss_fn, make_model  # noqa: E402
from megatron_refusals import REFUSALS  # noqa: E402
from reference import max_rel_err  # noqa: E402
from spawn_ranks import spawn_ranks  # noqa: E402

from tiny_problem import batch  # noqa: E402


@pytest.fixture(scope="module")
def megatron_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("megatron")


@pytest.fixture(scope="module")
def megatron_results(megatron_dir):
    from megatron_cases import worker

    return spawn_ranks(worker, WORLD, megatron_dir)


FP32 = [cid for cid, case in CASES.items() if not (case.low_precision or "gamma1" in cid)]


@pytest.mark.parametrize("cid", FP32)
def test_matches_float64_reference(megatron_results, cid):
    case = CASES[cid]
    got = [r[cid] for r in megatron_results]
    torch.testing.assert_close(got[0]["params"], got[1]["params"], rtol=0, atol=0)
    err = max_rel_err(got[0]["params"], float64_reference(case.optimizer, WORLD * case.accum, case.clip,
                                                          gate=case.extra.get("gate")))
    assert err < 2e-5, f"{cid}: max relative error {err:.2e}"
    if case.optimizer.startswith("vr"):
        assert got[0]["k"] == WORLD * case.accum
        assert got[0]["squares_bytes"] > 0


def test_cases_cover_the_hard_layouts(megatron_results):
    """Several buckets; a layer split across the two shards; a rank whose shard holds no
    element of a param group (placeholder); the no-decay group really has no decay. The
    gated cases (a layer without a gradient on some micro-steps) are the one exception to
    the straddling layer: their model's layers each fall whole into one shard."""
    r0, r1 = megatron_results
    for cid, case in CASES.items():
        if case.overlap:
            assert r0[cid]["bucket_groups"] >= 2, cid
        if case.distributed:
            assert "gate" in case.extra or (r0[cid]["straddles"] and r1[cid]["straddles"]), cid
        assert r0[cid]["weight_decays"][1] == 0.0 and r0[cid]["weight_decays"][0] > 0.0, cid
    assert r1["vrlamb-do1-ov1-a2"]["group_numels"][1] == [0]  # rank 1 holds no bias: placeholder
    assert r0["vrlamb-do1-ov1-a2"]["group_numels"][1] != [0]


def test_gamma_one_is_lamb(megatron_results):
    for r in megatron_results:
        torch.testing.assert_close(r["vrlamb-gamma1-do1-ov1-a2"]["params"], r["lamb-do1-ov1-a2"]["params"],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("cid", [c for c in CASES if CASES[c].low_precision])
def test_bf16_close_to_reference(megatron_results, cid):
    case = CASES[cid]
    got = megatron_results[0][cid]["params"]
    assert all(p.isfinite().all() for p in got)
    # bf16 forward/backward (8 mantissa bits) against the fp32-model reference
    assert max_rel_err(got, float64_reference(case.optimizer, WORLD * case.accum, case.clip)) < 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_moments_match_explicit_groups(megatron_results, dtype):
    """The squares path in bf16, and in fp16 with its loss scale: mean gradient and mean of
    squared group gradients as the VR optimizer reads them, against the k explicit group
    gradients of the same low-precision model."""
    accum = 2
    model = make_model().to(dtype)
    params = list(model.parameters())
    x, y = batch(0)
    gg = [torch.stack(gs).float() for gs in zip(*(
        torch.autograd.grad(loss_fn(model(xb.to(dtype)), yb), params)
        for xb, yb in zip(x.chunk(WORLD * accum), y.chunk(WORLD * accum))))]
    for r in megatron_results:
        got = r[f"{'bf16' if dtype == torch.bfloat16 else 'fp16'}-moments"]
        assert got["k"] == WORLD * accum
        assert got["loss_scale"] == (2.0**12 if dtype == torch.float16 else 1.0)
        for g, grad, msq in zip(gg, got["grad"], got["msq"]):
            scale = g.abs().max()
            torch.testing.assert_close(grad, g.mean(0), rtol=3e-2, atol=3e-2 * scale)
            torch.testing.assert_close(msq, (g * g).mean(0), rtol=3e-2, atol=3e-2 * scale**2)


def test_fp16_overflow_step_leaves_no_trace(megatron_results):
    for r in megatron_results:
        got = r["fp16-overflow"]
        assert got["applied"] == [True, False, True, True]
        torch.testing.assert_close(got["params"], r["vrlamb-do1-ov1-a2-fp16"]["params"], rtol=0, atol=0)


def test_a_nonfinite_gradient_in_one_shard_stops_every_rank(megatron_results):
    """The distributed optimizer on 2 ranks, a NaN in the gradient of a layer only one rank's
    shard holds: both ranks raise FloatingPointError in the same step, the rank without the
    layer saying so (before, it went on into its next collective and waited there until the
    process group's timeout)."""
    got = [r["nonfinite"] for r in megatron_results]
    assert sorted(g["holds"] for g in got) == [False, True]
    for g in got:
        assert g["error"] and g["error"].startswith("FloatingPointError: VRLAMB: non-finite gradient"), g
    held = next(g for g in got if g["holds"])["error"]
    assert "in 1 of" in held and "first: tensor #" in held, held
    assert "in a layer that only other ranks hold pieces of" in next(g for g in got if not g["holds"])["error"]


@pytest.mark.parametrize("cid", list(REFUSALS))
def test_unsupported_settings_refused(megatron_results, cid):
    *_, words = REFUSALS[cid]
    for r in megatron_results:
        msg = r["refusals"][cid]
        assert msg is not None, f"{cid} was not refused"
        assert words in msg, msg
        if REFUSALS[cid][1] is not None:
            assert REFUSALS[cid][1] in msg, msg


@pytest.mark.parametrize("cid", ["vrlamb-do1-ov1-a2", "vrlamb-do0-ov1-a2", "vrlamb-do1-ov1-a2-bf16",
                                 "vrlamb-do0-ov1-a2-bf16", "vrlamb-do1-ov1-a2-fp16", "lars-do1-ov1-a2",
                                 "vrlamb-do1-ov1-a2-pg"])
def test_save_and_load_optimizer_resume_bitwise(megatron_results, cid):
    """3 steps, save_optimizer, 2 steps; against: a new run (weights moved off), load_optimizer,
    the same 2 steps. Equal bit for bit on both ranks: no state key, scalar or weight is lost."""
    for r in megatron_results:
        got = r["resume"][cid]
        torch.testing.assert_close(got["b"], got["a"], rtol=0, atol=0)


@pytest.mark.parametrize("cid", ["vrlamb-do1-ov1-a2", "vrlamb-do0-ov1-a2", "vrlamb-do1-ov1-a2-fp16"])
def test_sharded_save_and_load_resume_bitwise(megatron_results, cid):
    """The same with save_optimizer(..., sharded=True) (each rank writes its own shard; without
    the distributed optimizer rank 0 writes the one shard), saved twice: the folder holds the
    second version only, and the run resumes from it bit for bit."""
    for r in megatron_results:
        got = r["resume sharded"][cid]
        assert got["listing"] == ["latest", "v000002"]
        torch.testing.assert_close(got["b"], got["a"], rtol=0, atol=0)
        torch.testing.assert_close(got["a"], r["resume"][cid]["a"], rtol=0, atol=0)  # the same run


def test_optimizer_checkpoint_is_layout_free(megatron_results):
    """The distributed optimizer's file (shards gathered into whole tensors) continues without
    the distributed optimizer: the same run up to the reduction order."""
    for r in megatron_results:
        assert max_rel_err(r["cross"]["params"], r["resume"]["vrlamb-do1-ov1-a2"]["a"]) < 2e-5
        assert not [f for f in r["cross"]["files"] if f.startswith(".")]  # no temporary file left


@pytest.fixture(scope="module")
def one_rank_results(megatron_results, megatron_dir):
    """1 rank, 4 micro-batches: loads run_resume's 2-rank checkpoints (one file and sharded),
    trains 2 steps, saves a sharded folder ("one-rank/one-rank.optimizer")."""
    from megatron_cases import one_rank_worker

    out = megatron_dir / "one-rank"
    out.mkdir()
    (got,) = spawn_ranks(one_rank_worker, 1, out)
    return got


def test_optimizer_checkpoint_loads_at_another_world_size(megatron_results, one_rank_results, megatron_dir):
    """The 2-rank distributed optimizer's file into 1 rank with 4 micro-batches (the same k = 4
    gradient groups): every main weight and state tensor is the file's, and the next 2 steps
    are the 2-rank run's up to the reduction order. The sharded folder of the same run loads
    the same tensors (each 1-rank tensor read from the 2 ranks' shard files)."""
    got = one_rank_results
    saved = torch.load(megatron_dir / "vrlamb-do1-ov1-a2.optimizer.pt", weights_only=True)
    for loaded in (got["loaded"], got["loaded from shards"]):
        assert len(loaded) == 6
        for name, tensors in loaded.items():
            tensors = dict(tensors)
            torch.testing.assert_close(tensors.pop("fp32"), saved["weights"][name], rtol=0, atol=0)
            assert set(tensors) == {k for k, v in saved["state"][name].items()
                                    if torch.is_tensor(v) and v.dim() > 0}
            for key, t in tensors.items():
                torch.testing.assert_close(t, saved["state"][name][key], rtol=0, atol=0)
    assert max_rel_err(got["params"], megatron_results[0]["resume"]["vrlamb-do1-ov1-a2"]["a"]) < 2e-5


def test_sharded_checkpoint_loads_at_a_larger_world_size(one_rank_results, megatron_dir):
    """1 -> 2 ranks: the 1-rank run's sharded folder (saved after its 2 steps) into 2 ranks with
    the distributed optimizer: the two ranks' main shards and state tile every parameter and
    equal the 1-rank shard's elements, and both models hold the saved weights."""
    from megatron_cases import two_rank_load_worker

    out = megatron_dir / "two-ranks"
    out.mkdir()
    got = spawn_ranks(two_rank_load_worker, WORLD, out)
    folder = megatron_dir / "one-rank" / "one-rank.optimizer"
    version = folder / (folder / "latest").read_text().strip()
    pieces = torch.load(version / "shard-00000-of-00001.pt", weights_only=True)["pieces"]
    assert len(pieces) == 6
    for name, by_start in pieces.items():
        (whole,) = by_start.values()  # 1 rank: one piece per parameter, from element 0
        parts = sorted((p for r in got for p in r["mains"].get(name, [])), key=lambda p: p[0])
        assert [(s, e) for s, e, _ in parts][0][0] == 0 and parts[-1][1] == whole["fp32"].numel()
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        for key, t in whole.items():
            torch.testing.assert_close(torch.cat([p[2][key] for p in parts]), t, rtol=0, atol=0)
    assert sum(len(r["mains"]) > 0 for r in got) == WORLD  # both ranks hold elements
    names = [n for n, _ in make_model().named_parameters()]
    for r in got:
        for p, name in zip(r["params"], names, strict=True):
            torch.testing.assert_close(p.reshape(-1), pieces[name][0]["fp32"], rtol=0, atol=0)


def test_bad_optimizer_checkpoints_refused_on_every_rank(megatron_results):
    expected = {
        "optimizer": "holds the state of LAMB, this run's optimizer is VRLAMB",
        "format": "is not a vrgd-ds Megatron optimizer checkpoint",
        "damaged": "damaged.pt cannot be read as a checkpoint file (",
        "one rank": "rank 1 of the data-parallel group failed: FileNotFoundError",
        "save": "rank 0 of the data-parallel group failed",
        "shape": "parameter '4.weight' has shape (3, 16) there, (4, 16) in this model",
        "user state": "user_state must be a dict of numbers",
        "sharded user state": "rank 0 of the data-parallel group failed: ValueError: user_state must be",
        "sharded mixed": "rank 0 of the data-parallel group failed: RuntimeError: vrgd_ds.megatron: the shards "
                         "of 2.weight hold different optimizer state keys",
        "sharded foreign": "holds files that are not part of a sharded optimizer checkpoint (['notes.txt'])",
        "sharded file": "is a file; save_optimizer(..., sharded=True) writes a folder",
        "no latest": "is a folder without a 'latest' file: not a sharded optimizer checkpoint",
    }
    for r in megatron_results:
        got = r["checkpoint refusals"]
        assert got["kept intact"] is True  # the refused save left the file it would replace alone
        assert got["sharded kept"] is True  # ... and the folder's complete version (the refused saves'
        # versions removed)
        assert got["sharded loads"] is None and got["foreign kept"] is True
        for key, words in expected.items():
            assert got[key] is not None and words in got[key], (key, got[key])


def test_version_and_internals_checks():
    from vrgd_ds.megatron import seam

    seam.check_megatron_version()
    with pytest.raises(RuntimeError, match=r"supports megatron-core 0\.16\.x .*found 0\.17\.0"):
        seam.check_megatron_version("0.17.0")
    with pytest.raises(RuntimeError, match=r"DistributedDataParallel of megatron-core 0\.16\.\d+ lacks buffers"):
        seam._require(object(), ("buffers",), "DistributedDataParallel")
    with pytest.raises(TypeError, match="DistributedDataParallel, got Linear"):
        seam.check_internals(torch.nn.Linear(2, 2))


def test_vrgd_ds_imports_without_megatron():
    code = ("import sys; sys.modules['megatron'] = None\n"
            "import vrgd_ds\n"
            "try:\n    import vrgd_ds.megatron\nexcept ImportError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "refused: vrgd_ds.megatron needs megatron-core: pip install 'vrgd-ds[megatron]'" in out.stdout
