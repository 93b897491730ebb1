"""VR-LAMB on megatron.core's own GPTModel with Megatron's distributed checkpointing: resumed
bit for bit, and resharded from tensor-parallel 2 x data-parallel 2 to 4 data-parallel ranks
(``tests/megatron_gpt_cases.py``: SwiGLU factories, stacked layers, padded vocabulary)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_gpt_cases import WORLD, check_resharded  # noqa: E402
from spawn_ranks import spawn_ranks  # noqa: E402


@pytest.fixture(scope="module")
def gpt_results(tmp_path_factory):
    from megatron_gpt_cases import worker

    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("megatron_gpt"))


def test_gpt_resumes_bitwise(gpt_results):
    for r in gpt_results:
        assert any("linear_fc1" in n for n in r["a"])
        torch.testing.assert_close(r["b"], r["a"], rtol=0, atol=0)


def test_gpt_checkpoint_loads_without_tensor_parallelism(gpt_results):
    """At tensor-parallel size 1 the optimizer's fp32 weights, put together from the 2
    tensor-parallel ranks' chunks (SwiGLU's rows moved, each layer along the stacked axis),
    are the weights Megatron's own model loading put together; the 2 steps after it equal the
    unbroken tensor-parallel run's (loaded into this layout by Megatron) to float32 rounding."""
    for r in gpt_results:
        assert any("linear_fc1.weight" in k for k in r["loaded model"])
        check_resharded(r["loaded model"], r["loaded"], r["tp1"], r["tp1 a"])
