"""vrgd_ds.megatron under pipeline parallelism: 4 real gloo CPU ranks (pipeline-parallel 2 x
data-parallel 2), Megatron's own 1F1B schedule, DDP and optimizers, against the float64
reference of docs/algorithm.md on the whole model (``tests/megatron_pp_cases.py``). Each
stage's layers are whole on it, so the layer statistics are the stage's; what must be
global (the non-finite decision, the telemetry's noise scale) comes from one layer table of
every stage's layers. Then Megatron's GPTModel: tied embeddings refused, untied ones
resumed bit for bit through distributed checkpointing and resharded to no pipeline."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_cases import float64_reference  # noqa: E402
from megatron_gpt_cases import check_resharded  # noqa: E402
from megatron_pp_cases import CASES, DP, PP, TP_PP_CASES, TP_VP_CASES, VP, VP_CASES, WORLD, make_deep  # noqa: E402
from megatron_tp_cases import SPLIT_DIM  # noqa: E402
from reference import max_rel_err  # noqa: E402
from spawn_ranks import spawn_ranks  # noqa: E402


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory):
    from megatron_pp_cases import worker

    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("megatron_pp"))


def _stage(results, stage, dp=0):
    return next(r for r in results if r["ranks"] == {"pp": stage, "dp": dp})


@pytest.mark.parametrize("cid", list(CASES))
def test_matches_float64_reference(pp_results, cid):
    case = CASES[cid]
    assert sorted((r["ranks"]["pp"], r["ranks"]["dp"]) for r in pp_results) == [(p, d) for p in range(PP)
                                                                                   for d in range(DP)]
    for stage in range(PP):  # the data-parallel ranks of a stage agree
        for name, p in _stage(pp_results, stage)[cid]["params"].items():
            torch.testing.assert_close(_stage(pp_results, stage, 1)[cid]["params"][name], p, rtol=0, atol=0)
    first, last = (_stage(pp_results, s)[cid] for s in range(PP))
    assert sorted(first["params"]) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert sorted(last["params"]) == ["net.4.bias", "net.4.weight"]
    assert first["applied"] == [True] * 3
    got = [*first["params"].values(), *last["params"].values()]  # make_model()'s order
    err = max_rel_err(got, float64_reference(case.optimizer, DP * case.accum, case.clip))
    # bf16 and fp16 forward and backward (8 and 11 mantissa bits) against the fp32-model reference, as the
    # data-parallel tests allow
    assert err < (3e-2 if case.low_precision else 2e-5), f"{cid}: max relative error {err:.2e}"
    for r in pp_results:
        assert r[cid]["layers"] == 6  # one layer table of both stages' layers on every rank
        if case.optimizer.startswith("vr"):
            assert r[cid]["k"] == DP * case.accum
        if case.extra.get("three_groups"):  # stage 1 holds nothing of the third group
            assert len(r[cid]["groups"]) == 3
            assert r[cid]["placeholders"] >= (1 if r["ranks"]["pp"] == 1 else 0)


def _check_telemetry(records: list, dp4: dict, layers: int) -> None:
    """The record is the same on every rank and covers every stage's layers: the whole model's
    noise scale equals the one of 4 data-parallel ranks without pipeline parallelism (the
    same 4 gradient groups)."""
    for rec in records[1:]:
        assert rec == records[0]
    rec = records[0]
    assert rec["k"] == dp4["k"] == 4 and rec["step"] == dp4["step"]
    assert len(rec["layers"]) == len(dp4["layers"]) == layers
    assert sorted(v["numel"] for v in rec["layers"].values()) == sorted(v["numel"] for v in dp4["layers"].values())
    for key in ("grad_sq", "group_var", "clamped_fraction"):
        assert rec[key] == pytest.approx(dp4[key], rel=1e-5), key
    assert sorted(v["gsnr_mean"] for v in rec["layers"].values()) == pytest.approx(
        sorted(v["gsnr_mean"] for v in dp4["layers"].values()), rel=1e-5)


def test_telemetry_covers_every_stage(pp_results):
    _check_telemetry([r["vrlamb-do1-ov1-a2-telemetry"]["telemetry"] for r in pp_results],
                     pp_results[0]["telemetry dp4"], 6)


def test_a_nonfinite_gradient_on_one_stage_stops_every_stage(pp_results):
    """A NaN in a gradient of stage 1: the ranks of stage 0, which hold nothing of that layer,
    raise in the same step (not go on into the next step's pipeline transfers)."""
    for r in pp_results:
        error = r["nonfinite"]["error"]
        assert error and error.startswith("FloatingPointError: VRLAMB: non-finite gradient"), error
        if r["ranks"]["pp"] == 0:
            assert "in a layer that only other ranks hold pieces of" in error, error
        else:
            assert "in 1 of 2 parameter tensors" in error, error


def test_each_stage_resumes_its_own_checkpoint_bitwise(pp_results):
    for r in pp_results:
        got = r["checkpoints"]
        for sharded in (False, True):
            a, b = got[f"resumed sharded={sharded}"]
            assert len(a) == (4 if r["ranks"]["pp"] == 0 else 2)
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
        assert "pipeline stages 0 and 1 were given the same checkpoint path" in got["same path"]
        assert not got["same path written"]
        other = 1 - r["ranks"]["pp"]
        assert (f"holds pipeline stage {other} of pipeline_model_parallel_size=2; this rank is stage "
                f"{r['ranks']['pp']} of 2") in got["other stage"]


def test_gpt_tied_embeddings_across_stages_are_refused(pp_results):
    for r in pp_results:
        msg = r["gpt"]["tied"]
        assert msg and "has a copy on several pipeline stages" in msg, msg
        assert "share_embeddings_and_output_weights=False" in msg, msg
        # Megatron marks the word embeddings on stage 0 and the output layer on stage 1
        assert ("embedding.word_embeddings.weight" if r["ranks"]["pp"] == 0 else "output_layer.weight") in msg, msg


def test_gpt_pipelined_resumes_bitwise_and_reshards_to_one_stage(pp_results):
    """Megatron's GPTModel, untied embeddings, pipeline-parallel 2 x data-parallel 2 with the
    distributed optimizer: resumed bit for bit from Megatron's distributed checkpoint; the
    checkpoint loaded by 4 data-parallel ranks without pipeline parallelism puts the same
    weights into the model as Megatron's own loading, and the 2 steps after it equal the
    pipelined run's to float32 rounding."""
    for r in pp_results:
        g = r["gpt"]
        stage = r["ranks"]["pp"]
        assert ("embedding.word_embeddings.weight" in g["a"]) == (stage == 0)
        assert ("output_layer.weight" in g["a"]) == (stage == 1)
        assert any("linear_fc1" in n for n in g["a"])
        for n in g["a"]:
            torch.testing.assert_close(g["b"][n], g["a"][n], rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
        assert any("output_layer.weight" in k for k in g["loaded model"])
        check_resharded(g["loaded model"], g["loaded"], g["pp1"], g["pp1 a"])


@pytest.mark.parametrize("cid", list(TP_PP_CASES))
def test_tensor_and_pipeline_parallel_together_match_float64_reference(pp_results, cid):
    """Tensor-parallel 2 x pipeline-parallel 2 (data-parallel size 1, 4 micro-batches): stage 0's
    layers split by Megatron's Column/RowParallelLinear, stage 1's whole; the layer table summed
    over the tensor-parallel group (a replicated layer once), then over the pipeline group."""
    case = TP_PP_CASES[cid]
    got = {(r["tp pp"]["ranks"]["pp"], r["tp pp"]["ranks"]["tp"]): r["tp pp"][cid] for r in pp_results}
    assert sorted(got) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = [got[0, t]["params"] for t in range(2)]
    assert sorted(first[0]) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    for name in ("fc3.weight", "fc3.bias", "fc2.bias"):  # replicated: the same on both tensor-parallel ranks
        stage = 0 if name == "fc2.bias" else 1
        torch.testing.assert_close(got[stage, 1]["params"][name], got[stage, 0]["params"][name], rtol=0, atol=0)
    whole = [torch.cat([first[0][n], first[1][n]], SPLIT_DIM[n]) if n in SPLIT_DIM else first[0][n]
             for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    whole += [got[1, 0]["params"]["fc3.weight"], got[1, 0]["params"]["fc3.bias"]]
    err = max_rel_err(whole, float64_reference(case.optimizer, case.accum, case.clip))
    assert err < 2e-5, f"{cid}: max relative error {err:.2e}"
    assert all(g["k"] == case.accum and g["applied"] == [True] * 3 for g in got.values())


@pytest.mark.parametrize("cid", list(TP_VP_CASES))
def test_tensor_parallel_virtual_stages_match_float64_reference(pp_results, cid):
    """Tensor-parallel 2 x pipeline-parallel 2 x 2 virtual stages (Megatron's interleaved
    schedule, 4 micro-batches, data-parallel size 1): virtual stages 0 and 2 split by rows
    (ColumnParallelLinear), 1 by columns (RowParallelLinear), 3 whole; one layer table over
    both chunks of a rank, summed over the tensor-parallel group (a replicated layer once),
    then over the pipeline group."""
    case = TP_VP_CASES[cid]
    got = {(r["tp vp"]["ranks"]["pp"], r["tp vp"]["ranks"]["tp"]): r["tp vp"][cid] for r in pp_results}
    assert sorted(got) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    whole = []
    for v in range(PP * VP):
        c, s = divmod(v, PP)
        parts = [got[s, t]["params"] for t in range(2)]
        for w in ("weight", "bias"):
            name = f"model{c}.fc.{w}"
            if v == 3 or (v == 1 and w == "bias"):  # whole on both tensor-parallel ranks, bitwise equal
                # (with clipping too: the clip factor is the same on every tensor-parallel rank)
                torch.testing.assert_close(parts[1][name], parts[0][name], rtol=0, atol=0)
                whole.append(parts[0][name])
            else:
                whole.append(torch.cat([parts[0][name], parts[1][name]], 1 if v == 1 else 0))
    err = max_rel_err(whole, float64_reference(case.optimizer, case.accum, case.clip, model_fn=make_deep))
    assert err < 2e-5, f"{cid}: max relative error {err:.2e}"
    assert all(g["k"] == case.accum and g["applied"] == [True] * 3 and g["layers"] == 8 for g in got.values())


# ---- virtual pipeline stages ------------------------------------------------------------


def _virtual_stages(results, cid: str, dp: int = 0) -> list:
    """The parameters of virtual stages 0-3 in make_deep()'s order: chunk c of pipeline rank s
    is virtual stage c * PP + s."""
    out = []
    for c in range(VP):
        for s in range(PP):
            params = _stage(results, s, dp)["virtual"][cid]["params"]
            out += [p for n, p in params.items() if n.startswith(f"model{c}.")]
    return out


@pytest.mark.parametrize("cid", list(VP_CASES))
def test_virtual_pipeline_matches_float64_reference(pp_results, cid):
    """Megatron's interleaved schedule, 2 model chunks per pipeline rank (4 virtual stages,
    a layer each), pipeline-parallel 2 x data-parallel 2: each chunk its own DDP with its own
    buffers and bucket groups, one optimizer over both chunks."""
    case = VP_CASES[cid]
    for r in pp_results:
        got = r["virtual"][cid]
        s = r["ranks"]["pp"]
        assert sorted(got["params"]) == sorted(f"model{c}.net.{2 * (c * PP + s)}.{w}" for c in range(VP)
                                               for w in ("weight", "bias"))
        assert got["applied"] == [True] * 3
        assert got["layers"] == 8  # one layer table of every virtual stage's layers
        if case.optimizer.startswith("vr"):
            assert got["k"] == DP * case.accum
        if case.extra.get("three_groups"):  # pipeline rank 1 holds nothing of the third group
            assert len(got["groups"]) == 3
            assert got["placeholders"] >= (1 if s == 1 else 0)
    for dp in range(1, DP):  # the data-parallel ranks of a stage agree
        for a, b in zip(_virtual_stages(pp_results, cid), _virtual_stages(pp_results, cid, dp)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    err = max_rel_err(_virtual_stages(pp_results, cid),
                      float64_reference(case.optimizer, DP * case.accum, case.clip, model_fn=make_deep))
    # bf16 and fp16 against the fp32-model reference, as for one chunk per stage
    assert err < (3e-2 if case.low_precision else 2e-5), f"{cid}: max relative error {err:.2e}"


def test_virtual_pipeline_telemetry_covers_every_chunk(pp_results):
    _check_telemetry([r["virtual"]["vrlamb-do1-ov1-a2-telemetry"]["telemetry"] for r in pp_results],
                     pp_results[0]["telemetry dp4 deep"], 8)


def test_virtual_pipeline_checkpoints_resume_bitwise(pp_results):
    """save_optimizer / load_optimizer given the list of chunks: each stage resumes bit for bit;
    a run with one chunk per stage is refused the 2-chunk checkpoint, naming both; given only
    the first of the chunks the optimizer was built with, both refuse before anything is done."""
    for r in pp_results:
        got = r["virtual"]
        for sharded in (False, True):
            a, b = got[f"resumed sharded={sharded}"]
            assert len(a) == 4
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
        assert "was saved with 2 model chunk(s) per pipeline stage (virtual pipeline stages), this run has 1" in \
            got["one chunk"], got["one chunk"]
        save_error, written, load_error = got["first chunk given"]
        for error in (save_error, load_error):
            assert error and "the model given (1 model chunk(s)) is not the one this optimizer was built with (2 " \
                "chunk(s))" in error, error
        assert not written


def test_gpt_virtual_pipeline_resumes_bitwise_and_reshards_to_one_stage(pp_results):
    """Megatron's GPTModel, 4 layers, pipeline-parallel 2 x data-parallel 2 with 2 chunks per
    pipeline rank (the chunks' sharded state dicts under model0, model1 as Megatron-LM saves
    them), the distributed optimizer over both chunks: resumed bit for bit from Megatron's
    distributed checkpoint, and the checkpoint loaded by 4 data-parallel ranks with one chunk
    and no pipeline parallelism trains on as the pipelined run does."""
    for r in pp_results:
        g = r["gpt virtual"]
        stage = r["ranks"]["pp"]
        assert ("model0.embedding.word_embeddings.weight" in g["a"]) == (stage == 0)
        assert ("model1.output_layer.weight" in g["a"]) == (stage == 1)
        assert sum(n.endswith("linear_qkv.weight") for n in g["a"]) == 2  # a layer in each chunk
        for n in g["a"]:
            torch.testing.assert_close(g["b"][n], g["a"][n], rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
        assert sum(n.endswith("linear_qkv.weight") for n in g["pp1"]) == 4
        check_resharded(g["loaded model"], g["loaded"], g["pp1"], g["pp1 a"])
