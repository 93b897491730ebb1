"""The Megatron-core parity on one CUDA device with NCCL (1 rank, k = micro-batches).

Skipped where there is no CUDA device (CI, the CPU machines). Same cases and float64
reference as tests/test_megatron.py, without any CUDA redirection: Megatron runs as on a
GPU cluster, its gradient buffers and collectives on the device.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from megatron_cases import MCase, float64_reference, run_case, run_resume  # noqa: E402
from reference import max_rel_err  # noqa: E402
from spawn_ranks import spawn_ranks  # noqa: E402

ACCUM = 4  # one rank: k = 4 micro-batch groups
GPU_CASES = {
    "vrlamb-do0-ov0": MCase("vrlamb", distributed=False, overlap=False, accum=ACCUM),
    "vrlamb-do0-ov1": MCase("vrlamb", distributed=False, overlap=True, accum=ACCUM),
    "vrlamb-do1-ov0": MCase("vrlamb", distributed=True, overlap=False, accum=ACCUM),
    "vrlamb-do1-ov1": MCase("vrlamb", distributed=True, overlap=True, accum=ACCUM),
    "vrlamb-do1-ov1-clip": MCase("vrlamb", distributed=True, overlap=True, accum=ACCUM, clip=0.05),
    "lamb-do1-ov1": MCase("lamb", distributed=True, overlap=True, accum=ACCUM),
    "lars-do1-ov1": MCase("lars", distributed=True, overlap=True, accum=ACCUM),
    "vrlars-do1-ov1": MCase("vrlars", distributed=True, overlap=True, accum=ACCUM),
    "vradam-do1-ov1": MCase("vradam", distributed=True, overlap=True, accum=ACCUM),
    "vrlamb-do1-ov1-bf16": MCase("vrlamb", distributed=True, overlap=True, accum=ACCUM, extra={"bf16": True}),
    "vrlamb-do1-ov1-bf16grads": MCase("vrlamb", distributed=True, overlap=True, accum=ACCUM,
                                      extra={"bf16": True, "grad_reduce_in_fp32": False}),
    "vrlamb-do1-ov1-fp16": MCase("vrlamb", distributed=True, overlap=True, accum=ACCUM, extra={"fp16": True}),
}


RESUME_GPU = ("vrlamb-do1-ov1", "vrlamb-do0-ov1", "vrlamb-do1-ov1-bf16", "vrlamb-do1-ov1-fp16")


def worker(rank, init_file, out_dir):
    from pathlib import Path
    import traceback

    from megatron.core import parallel_state

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    parallel_state.initialize_model_parallel(1, 1)
    try:
        results = {cid: run_case(0, case, device="cuda") for cid, case in GPU_CASES.items()}
        results["resume"] = run_resume(0, out_dir, {cid: GPU_CASES[cid] for cid in RESUME_GPU}, device="cuda")
        results["resume sharded"] = run_resume(0, out_dir, {cid: GPU_CASES[cid] for cid in RESUME_GPU},
                                               device="cuda", sharded=True)
        results["device"] = torch.cuda.get_device_name(0)
    except Exception:
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / "rank0.pt")
        raise
    torch.save(results, Path(out_dir) / "rank0.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory):
    return spawn_ranks(worker, 1, tmp_path_factory.mktemp("megatron_gpu"), attempts=1)[0]


@pytest.mark.parametrize("cid", list(GPU_CASES))
def test_gpu_matches_float64_reference(gpu_results, cid):
    case = GPU_CASES[cid]
    err = max_rel_err(gpu_results[cid]["params"], float64_reference(case.optimizer, case.accum, case.clip))
    print(f"{gpu_results['device']}: {cid} max relative error {err:.2e}")
    if os.environ.get("MEGATRON_GPU_REPORT"):
        with open(os.environ["MEGATRON_GPU_REPORT"], "a") as f:
            f.write(f"{gpu_results['device']}\t{cid}\t{err:.3e}\n")
    assert err < (3e-2 if case.low_precision else 2e-5), f"{cid}: {err:.2e}"
    if case.optimizer.startswith("vr"):
        assert gpu_results[cid]["k"] == case.accum


@pytest.mark.parametrize("cid", RESUME_GPU)
def test_gpu_save_and_load_optimizer_resume_bitwise(gpu_results, cid):
    """save_optimizer / load_optimizer (one file, and sharded) on the device (NCCL, the real loss
    scaler's CUDA state):
    the resumed run's 2 steps equal the uninterrupted run's, bit for bit."""
    for kind in ("resume", "resume sharded"):  # one file; a sharded folder
        got = gpu_results[kind][cid]
        torch.testing.assert_close(got["b"], got["a"], rtol=0, atol=0)
