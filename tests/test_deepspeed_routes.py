"""Route decisions (every refusal names its setting), registration and its undoing, the
version gate, and repeated launches of the routes whose collectives used to mismatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from ds_helpers import ROOT, fault_stack, free_port, gloo_transport_abort, run_deepspeed, tail
from vrgd_ds.deepspeed.routes import RouteRefused, decide, group_count_advice
from vrgd_ds.deepspeed.seam import EngineFacts

PLAIN = EngineFacts(optimizer_name="VRLAMB", stage=2, wrapper="zero", fp16=False, bf16=False,
                    grad_accum_dtype="float32", autocast_dtype=None, offload_optimizer=False,
                    offload_param=False, moe=False, pipeline=False, tensor_parallel=1, sequence_parallel=1,
                    managed_accumulation=True, accumulation=4, dp_world=2, micro_batch=8, quantized=False,
                    hpz_partition_size=1, zenflow=False, deepcompile=False)


@pytest.mark.parametrize("change,kind,words", [
    ({"stage": 3, "wrapper": "zero3", "offload_param": True}, "vr", ["offload_optimizer / offload_param"]),
    ({"stage": 3, "wrapper": "MiCS_Optimizer"}, "vr", ["DeepSpeed optimizer wrapper MiCS_Optimizer"]),
    ({"stage": 3, "wrapper": "zero3", "hpz_partition_size": 8}, "layer", ["zero_hpz_partition_size 8 (ZeRO++ hpZ)"]),
    ({"offload_optimizer": True}, "vr", ["offload_optimizer / offload_param", "remove the offload settings"]),
    ({"offload_param": True}, "layer", ["offload_optimizer / offload_param"]),
    ({"moe": True}, "vr", ["with MoE layers", "expert-parallel groups", "remove that setting"]),
    ({"pipeline": True}, "layer", ["pipeline parallelism (PipelineModule)", "tied layers"]),
    ({"tensor_parallel": 2}, "layer", ["tensor / model parallelism of size 2"]),
    ({"sequence_parallel": 4}, "vr", ["sequence_parallel_size 4"]),
    ({"quantized": True}, "vr", ["zero_quantized_weights / zero_quantized_gradients (ZeRO++)"]),
    ({"zenflow": True}, "layer", ["ZenFlow"]),
    ({"deepcompile": True}, "vr", ["DeepCompile"]),
    ({"wrapper": "bf16_optimizer", "stage": 1, "bf16": True}, "layer",
     ["bf16 and data_types.grad_accum_dtype fp32 at zero_optimization.stage 1", "BF16_Optimizer"]),
    ({"autocast_dtype": "float16"}, "layer", ["torch_autocast dtype float16", "GradScaler"]),
    ({"wrapper": "SomethingNew"}, "vr", ["DeepSpeed optimizer wrapper SomethingNew"]),
    ({"stage": 0, "wrapper": "fp16_unfused", "fp16": True}, "layer",
     ["fp16 and zero_optimization.stage 0", "zero gradients while it is built"]),
    ({"managed_accumulation": False}, "vr", ["managed_gradient_accumulation false"]),
])
def test_each_refusal_names_the_setting_and_the_fix(change, kind, words):
    with pytest.raises(RouteRefused) as err:
        decide(replace(PLAIN, **change), kind)
    assert str(err.value).startswith("optimizer type 'VRLAMB' with ")
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("change,kind,route", [
    ({}, "vr", "ZeRO-2"), ({"stage": 1, "bf16": True}, "vr", "ZeRO-1 bf16"),
    ({"stage": 0, "wrapper": "none"}, "vr", "stage 0"),
    ({"stage": 0, "wrapper": "none", "autocast_dtype": "bfloat16"}, "vr", "stage 0"),
    ({"managed_accumulation": False}, "layer", "ZeRO-2"), ({"fp16": True}, "vr", "ZeRO-2 fp16"),
    ({"stage": 3, "wrapper": "zero3"}, "vr", "ZeRO-3"), ({"stage": 3, "wrapper": "zero3", "bf16": True}, "layer",
                                                        "ZeRO-3 bf16")])
def test_supported_routes(change, kind, route):
    assert decide(replace(PLAIN, **change), kind) == route


def test_small_k_advice():
    assert group_count_advice(PLAIN) is None  # k = 2 x 4 = 8
    advice = group_count_advice(replace(PLAIN, accumulation=1))
    assert "k = 2 data-parallel ranks x 1 gradient accumulation steps = 2 gradient groups" in advice


def _python(code: str, env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_every_patch_keeps_wrapped_and_unregister_undoes_it():
    proc = _python("""
import torch, vrgd_ds
from vrgd_ds.deepspeed import seam, unregister, register
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
from deepspeed.runtime.zero import utils as zero_utils
names = seam.patched()
assert len(names) == 15, names
classes = {'DeepSpeedEngine': DeepSpeedEngine, 'DeepSpeedZeroOptimizer': DeepSpeedZeroOptimizer,
           'DeepSpeedZeroOptimizer_Stage3': Stage3}
assert sum(n.startswith('DeepSpeedZeroOptimizer_Stage3.') for n in names) == 4, names
for n in names:
    cls, meth = n.split('.')
    f = getattr(classes[cls], meth)
    assert hasattr(f, '__wrapped__'), n
assert torch.optim.VRLAMB is vrgd_ds.VRLAMB and vrgd_ds.VRLAMB in zero_utils.ZERO_SUPPORTED_OPTIMIZERS
unregister()
assert seam.patched() == []
assert not hasattr(DeepSpeedEngine._configure_optimizer, '__wrapped__')
assert not hasattr(DeepSpeedZeroOptimizer.reduce_ipg_grads, '__wrapped__')
assert not hasattr(Stage3._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads, '__wrapped__')
assert not hasattr(torch.optim, 'VRLAMB') and vrgd_ds.VRLAMB not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS
register()
assert len(seam.patched()) == 15
print('OK')
""")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_untested_deepspeed_warns_patches_nothing_and_refuses_our_types():
    """With another DeepSpeed version, import vrgd_ds warns and patches nothing; a config
    selecting a vrgd-ds type then fails at initialize with the version message."""
    proc = _python("""
import warnings, deepspeed, torch
deepspeed.__version__ = '0.19.99'
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import vrgd_ds
from vrgd_ds.deepspeed import seam
assert seam.patched() == []
assert any('found DeepSpeed 0.19.99' in str(w.message) for w in caught), [str(w.message) for w in caught]
model = torch.nn.Linear(3, 2)
cfg = {'train_micro_batch_size_per_gpu': 2, 'gradient_clipping': 0.0,
       'optimizer': {'type': 'VRLAMB', 'params': {'lr': 0.01}}, 'zero_optimization': {'stage': 2}}
try:
    deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
except RuntimeError as e:
    print('REFUSED', e)
""", env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
          "MASTER_PORT": str(free_port())})
    assert "REFUSED optimizer type 'VRLAMB': vrgd-ds is tested with DeepSpeed 0.19.8" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "found DeepSpeed 0.19.99" in proc.stdout


def _repeat_cases():
    from test_deepspeed_zero import AUTOCAST, BF16, Case

    return {"autocast-s2": Case("VRLAMB", 2, extra=AUTOCAST, groups="decay"),
            "autocast-s1": Case("VRLAMB", 1, extra=AUTOCAST),
            "bf16-s2-overlap": Case("VRLAMB", 2, extra=BF16, zero={"overlap_comm": True})}


_FIRST_RUN: dict = {}


@pytest.mark.parametrize("repeat", range(8))
def test_mixed_dtype_routes_never_abort(tmp_path, repeat):
    """bf16 autocast gives DeepSpeed buckets of two dtypes, whose order used to differ
    between processes: 4 of 8 launches aborted in gloo. Eight launches, all finishing, all
    bitwise equal to each other."""
    cases = [c.worker_case(n, tmp_path) for n, c in _repeat_cases().items()]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "results.pt"
    proc = run_deepspeed("train_tiny.py", None, tmp_path, "--cases", tmp_path / "cases.json", "--out", out)
    assert proc.returncode == 0, tail(proc)
    res = torch.load(out)
    for name in res:
        assert "error" not in res[name], res[name]
    first = _FIRST_RUN.setdefault("results", res)
    for name in res:
        for a, b in zip(res[name]["params"], first[name]["params"]):
            assert torch.equal(a, b), name


def test_only_the_transport_abort_is_launched_again():
    """run_deepspeed launches once more only for gloo's bare transport abort; a collective
    mismatch (gloo's words, as a mismatched all_reduce prints them here) or a rank's Python
    exception followed by the same abort at exit fails at once."""
    def done(rc, err):
        return subprocess.CompletedProcess([], rc, "", err)

    bare = "[launch.py] exits with return code = -6\nterminate called without an active exception\n"
    mismatch = ("terminate called after throwing an instance of 'gloo::EnforceNotMet'\n  what():  [enforce fail at "
                "gloo/transport/tcp/pair.cc:456] op.preamble.length <= op.nbytes. 20 vs 12. Received data size "
                "doesn't match expected size. Is there a distributed collective mismatch in your code?\n")
    assert gloo_transport_abort(done(250, bare))
    assert not gloo_transport_abort(done(0, bare))
    assert not gloo_transport_abort(done(250, mismatch))
    assert not gloo_transport_abort(done(250, bare + mismatch))
    assert not gloo_transport_abort(done(1, "RuntimeError: optimizer type 'VRLAMB' with ..."))
    raised = "Traceback (most recent call last):\n  ...\nValueError: gamma must be in (0, 1], got 1.5\n"
    assert not gloo_transport_abort(done(250, raised + bare))  # a rank's exception, then gloo at exit
    # where it happened, from Python's fault handler (what a real os.abort() prints)
    handler = ("Fatal Python error: Aborted\n\nCurrent thread 0x00007f (most recent call first):\n"
               "  <no Python frame>\n\nThread 0x00007e (most recent call first):\n"
               '  File "train_tiny.py", line 60 in train\n  File "train_tiny.py", line 170 in run_case\n\n'
               "Extension modules: torch\n")
    assert fault_stack(done(250, bare + handler)) == (
        'the aborting thread has no Python frame; another thread: File "train_tiny.py", line 60 in train '
        '<- File "train_tiny.py", line 170 in run_case')
    assert fault_stack(done(250, bare)) == "not printed"
    at_exit = "Fatal Python error: Aborted\n\nThread 0x00007f (most recent call first):\n  <no Python frame>\n\n"
    assert "at interpreter exit" in fault_stack(done(250, bare + at_exit))


@pytest.mark.slow
def test_whole_matrix_eight_times_without_an_abort(tmp_path):
    from test_deepspeed_zero import WORLD, _worker_cases

    (tmp_path / "cases.json").write_text(json.dumps(_worker_cases(tmp_path, WORLD)))
    for i in range(8):
        proc = run_deepspeed("train_tiny.py", None, tmp_path, "--cases", tmp_path / "cases.json",
                             "--out", tmp_path / f"r{i}.pt")
        assert proc.returncode == 0, (i, tail(proc))


def test_a_layer_redone_in_float64_on_one_rank_is_redone_by_all(tmp_path):
    """A layer whose fp32 GSNR sum overflows (zero variance, |gbar| = 1e3) and that only rank 1
    holds under ZeRO-1/2: every rank must join its float64 layer sums (one collective), or
    the ranks' collectives mismatch (before the fix: gloo's "collective mismatch" abort at
    ZeRO-2). Stages 0, 1 and 2 all finish and equal the float64 reference."""
    from wide_layer import GAS, STEPS, batch, loss_fn, make_model

    from reference import Reference, max_rel_err

    out = tmp_path / "results.pt"
    proc = run_deepspeed("wide_layer.py", None, tmp_path, "--out", out)
    assert proc.returncode == 0, tail(proc)
    res = torch.load(out)
    model = make_model()
    hp = {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
    ref = Reference(list(model.parameters()), "lamb", gamma=0.1, beta3=0.9, **hp)
    want = ref.run(model, lambda out, _: loss_fn(out), lambda step: (batch(step), batch(step)), STEPS,
                   k=2 * GAS)
    assert float(want[-1][0] - make_model()[2].bias[0]) != 0.0
    for stage in (0, 1, 2):
        assert max_rel_err(res[stage]["params"], want) < 2e-5, stage
        redone = res[stage]["redone"]  # per rank: segments redone in float64, per call
        assert len(redone[0]) == len(redone[1]) == STEPS, (stage, redone)  # every rank, every step
        if stage:
            assert sum(redone[0]) == 0 and all(redone[1]), (stage, redone)  # rank 0 holds none of it
