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

from megatron_cases import float64_reference, run_case  # noqa: E402
from reference import max_rel_err  # noqa: E402
from spawn_ranks import spawn_ranks  # noqa: E402

ACCUM = 4  # one rank: k = 4 micro-batch groups
GPU_CASES = {
    "vrlamb-do0-ov0": ("vrlamb", False, False, ACCUM, 0.0, {}),
    "vrlamb-do0-ov1": ("vrlamb", False, True, ACCUM, 0.0, {}),
    "vrlamb-do1-ov0": ("vrlamb", True, False, ACCUM, 0.0, {}),
    "vrlamb-do1-ov1": ("vrlamb", True, True, ACCUM, 0.0, {}),
    "vrlamb-do1-ov1-clip": ("vrlamb", True, True, ACCUM, 0.05, {}),
    "lamb-do1-ov1": ("lamb", True, True, ACCUM, 0.0, {}),
    "lars-do1-ov1": ("lars", True, True, ACCUM, 0.0, {}),
    "vrlars-do1-ov1": ("vrlars", True, True, ACCUM, 0.0, {}),
    "vradam-do1-ov1": ("vradam", True, True, ACCUM, 0.0, {}),
    "vrlamb-do1-ov1-bf16": ("vrlamb", True, True, ACCUM, 0.0, {"bf16": True}),
    "vrlamb-do1-ov1-bf16grads": ("vrlamb", True, True, ACCUM, 0.0, {"bf16": True, "grad_reduce_in_fp32": False}),
    "vrlamb-do1-ov1-fp16": ("vrlamb", True, True, ACCUM, 0.0, {"fp16": True}),
}


def worker(rank, init_file, out_dir):
    from pathlib import Path
    import traceback

    from megatron.core import parallel_state

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    parallel_state.initialize_model_parallel(1, 1)
    try:
        results = {cid: run_case(0, *spec, device="cuda") for cid, spec in GPU_CASES.items()}
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
    name, _, _, accum, clip, extra = GPU_CASES[cid]
    err = max_rel_err(gpu_results[cid]["params"], float64_reference(name, accum, clip))
    print(f"{gpu_results['device']}: {cid} max relative error {err:.2e}")
    if os.environ.get("MEGATRON_GPU_REPORT"):
        with open(os.environ["MEGATRON_GPU_REPORT"], "a") as f:
            f.write(f"{gpu_results['device']}\t{cid}\t{err:.3e}\n")
    assert err < (3e-2 if extra.get("bf16") or extra.get("fp16") else 2e-5), f"{cid}: {err:.2e}"
    if name.startswith("vr"):
        assert gpu_results[cid]["k"] == accum
