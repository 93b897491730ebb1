"""DeepSpeed routes on one CUDA device (NCCL, 1 rank, 4 micro-batches), against the
float64 reference: parameters for fp32 routes, the per-layer GSNR for bf16 / fp16 (real
loss scaler) / bf16 autocast routes, computed from group gradients made with the same
CUDA kernels and the route's own rounding of the mean gradient; the gradient noise scale
(ALGORITHM.md section 7, model and per layer) of our LAMB measured at stages 0-2 (the
``vrgd_noise_scale`` key) and of VRLAMB's telemetry, against the same groups' float64 values.

    python -m benchmarks.gpu_check --out results/gpu

Without CUDA it says so and exits 0 (the CPU routes are the test suite's). Writes
``deepspeed_gpu.json``: per case the error and its bound, and pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "ds_scripts")]


def cases():
    from test_deepspeed_zero import AUTOCAST, BF16, FP16, GNS_FIRST, Case

    parity = {f"{o}-s{s}-a4": Case(o, s, 4, world=1) for o, s in (
        ("VRLAMB", 2), ("VRLAMB", 1), ("VRLAMB", 0), ("NVLAMB", 2), ("VRSGD", 2))}
    parity["VRLAMB-s2-a4-decay-clip"] = Case("VRLAMB", 2, 4, world=1, groups="decay", clip=0.05)
    # the device syncs of one whole step, vrgd_ds's and DeepSpeed's (torch.cuda.set_sync_debug_mode)
    parity.update({f"{o}-s{s}-a4-syncs": Case(o, s, 4, world=1, count_reads=True)
                   for o, s in (("VRLAMB", 2), ("VRLAMB", 0), ("NVLAMB", 2))})
    gsnr = {f"VRLAMB-s{s}-a4-{route}-gsnr": Case("VRLAMB", s, 4, world=1, vr={"telemetry_interval": 1},
                                                 extra=extra, steps=1)
            for s, route, extra in ((2, "fp32", {}), (2, "bf16", BF16), (1, "bf16", BF16), (2, "fp16", FP16),
                                    (2, "autocast", AUTOCAST), (0, "autocast", AUTOCAST))}
    # measure-only noise scale of a non-VR optimizer, measured on the first step
    noise = {f"NVLAMB-s{s}-a4-noise": Case("NVLAMB", s, 4, world=1, extra=GNS_FIRST) for s in (2, 1, 0)}
    return parity, gsnr, noise


def noise_rel_err(rec: dict, groups: list, b: int, names: list[str]) -> float:
    """Largest relative error of the noise record (model and per layer) against section 7 on
    the explicit group gradients; inf where one side has a value and the other none."""
    from test_deepspeed_zero import exact_noise

    model, layers = exact_noise(groups, b)
    worst = 0.0
    for got, want in [(rec, model), *((rec["layers"][n], w) for n, w in zip(names, layers))]:
        for key, v in want.items():
            if (v is None) != (got[key] is None):
                return float("inf")
            if v is not None:
                worst = max(worst, abs(got[key] / v - 1))
    return worst


def run(out: Path, device: str, only: str = "") -> dict:
    from reference import max_rel_err
    from test_deepspeed_zero import GSNR_ROUTES, expected_gsnr_means, make_model, reference

    parity, gsnr, noise = ({n: c for n, c in group.items() if only in n} for group in cases())
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    specs = [c.worker_case(n, work) for n, c in {**parity, **gsnr, **noise}.items()]
    (work / "cases.json").write_text(json.dumps(specs))
    env = dict(os.environ, DS_ACCELERATOR=device, PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29533",
           str(ROOT / "tests" / "ds_scripts" / "train_tiny.py"), "--cases", str(work / "cases.json"),
           "--out", str(work / "results.pt")]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    (out / "deepspeed_gpu.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
    if proc.returncode != 0:
        return {"launch_failed": proc.returncode}
    res = torch.load(work / "results.pt")
    report = {}
    for name, case in parity.items():
        r = res[name]
        if "error" in r:
            report[name] = {"error": r["error"], "ok": False}
            continue
        err = max_rel_err(r["params"], reference(case))
        report[name] = {"max_rel_err": err, "bound": 2e-5, "ok": err < 2e-5}
        if "reads" in r:  # syncs are reported, not judged: the CPU test holds the expected counts
            report[name]["syncs"] = r["reads"]
    for name, case in gsnr.items():
        r = res[name]
        if "error" in r:
            report[name] = {"error": r["error"], "ok": False}
            continue
        expected = expected_gsnr_means(case.stage, GSNR_ROUTES[name.split("-")[3]], world=1, gas=4, device=device)
        rel = {n: r["telemetry"]["layers"][n]["gsnr_mean"] / v - 1 for n, v in expected.items()}
        worst = max(abs(x) for x in rel.values())
        report[name] = {"gsnr_rel_err": rel, "bound": 2e-5, "ok": worst < 2e-5}
    # (reported as, the run whose record it is, its case): VRLAMB's noise scale is in the
    # telemetry record of its fp32 GSNR case
    checks = [(n, n, c) for n, c in noise.items()]
    checks += [(n + "-noise", n, c) for n, c in gsnr.items() if n == "VRLAMB-s2-a4-fp32-gsnr"]
    names = [n for n, _ in make_model().named_parameters()]
    for name, run_name, case in checks:
        r = res[run_name]
        if "error" in r:
            report[name] = {"error": r["error"], "ok": False}
            continue
        history = []  # the first step's group gradients, made with the engine's device kernels
        reference(replace(case, steps=1), history=history, device=device)
        err = noise_rel_err(r["telemetry"], history[0], b=48 // case.gas, names=names)
        report[name] = {"noise_rel_err": err, "b_simple": r["telemetry"]["b_simple"], "bound": 2e-5,
                        "ok": err < 2e-5}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs the same cases here (a trial of the script)")
    ap.add_argument("--only", default="", help="only the cases whose name contains this (e.g. 'noise')")
    args = ap.parse_args(argv)
    names = [n for group in cases() for n in group]
    if not any(args.only in n for n in names):
        ap.error(f"--only {args.only!r} matches no case; the cases are: {', '.join(names)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped (the CPU routes are covered by the test suite)")
        return 0
    import deepspeed

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
              "cases": run(out, args.device, args.only)}
    (out / "deepspeed_gpu.json").write_text(json.dumps(report, indent=2))
    if "launch_failed" in report["cases"]:
        print(f"gpu_check: the DeepSpeed launch failed (see {out / 'deepspeed_gpu.log'})")
        return 1
    for name, r in report["cases"].items():
        worst = r.get("max_rel_err", r.get("noise_rel_err", max(map(abs, r.get("gsnr_rel_err", {0: 0}).values()))))
        print(f"{name:<34} {'ok  ' if r['ok'] else 'FAIL'} {r.get('error', f'{worst:.2e}')}")
    return 0 if all(r["ok"] for r in report["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
