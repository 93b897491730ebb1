"""Smoke test of the MLM head benchmark (`python -m benchmarks.mlm_head --quick`)."""

import json
import math

from ds_helpers import run_module


def test_mlm_head_quick_outputs(tmp_path):
    out = tmp_path / "mlm_head"
    run_module("benchmarks.mlm_head", "--quick", "--out", out, timeout=300)

    res = json.loads((out / "mlm_head.json").read_text())
    for key in ("steps", "warmup", "vocab", "torch", "device", "threads", "speedup", "cases"):
        assert key in res, key
    assert res["steps"] == 2 and res["vocab"] == 30522
    assert set(res["speedup"]) == {"tiny seq128/p20", "tiny seq512/p80"}
    for case in res["cases"]:
        for key in ("size", "seq", "predictions", "masked_per_row", "batch", "params",
                    "stock_median_s", "masked_median_s", "speedup", "stock_samples_s", "masked_samples_s"):
            assert key in case, key
        assert case["size"] == "tiny"
        assert case["masked_per_row"] == round(0.15 * case["seq"]) <= case["predictions"]
        assert len(case["stock_samples_s"]) == len(case["masked_samples_s"]) == 2
        assert all(math.isfinite(t) and t > 0 for t in case["stock_samples_s"] + case["masked_samples_s"])
        assert math.isclose(case["speedup"], case["stock_median_s"] / case["masked_median_s"])
    png = out / "mlm_head.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
