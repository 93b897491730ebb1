"""Summary of a full pipeline run: pretraining phase 1 -> phase 2 -> SQuAD v1.1 fine-tune.

    python -m pretrain_bert.pipeline OUT [--wall-s SECONDS]

Reads OUT/phase1 and OUT/phase2 (``run_pretraining.py`` output folders) and
OUT/squad/results.json (:mod:`pretrain_bert.squad.run`), writes OUT/pipeline.json and prints the SQuAD
F1/EM. ``launch/pipeline_tiny.sh`` calls it as its last step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain_bert.runtime import write_json_atomic

SQUAD_KEYS = ("f1", "exact_match", "eval_examples", "eval_missing", "train_examples", "steps", "epochs",
              "global_batch", "world_size", "optimizer", "lr", "train_loss_first", "train_loss_last10",
              "train_seconds", "eval_seconds", "predict_file")


def final_eval(run_dir: Path) -> dict:
    """Last train record and last held-out evaluation of a ``run_pretraining.py`` folder."""
    from pretrain_bert.plot import read_metrics

    train, evals = read_metrics(run_dir)
    if not train:
        raise ValueError(f"{str(run_dir)!r}: metrics.jsonl has no training step")
    return {"steps": train[-1]["step"], "samples": train[-1]["samples"], "final_train_loss": train[-1]["loss"],
            **({k: evals[-1][k] for k in ("eval_mlm_loss", "eval_mlm_acc", "eval_nsp_acc", "eval_loss",
                                           "generalization_gap")} if evals else {})}


def summarise(out: Path, wall_s: float | None = None) -> dict:
    out = Path(out)
    results = out / "squad" / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{str(results)!r} is missing: did the SQuAD step of the pipeline run?")
    squad = json.loads(results.read_text())
    optimizer = json.loads((out / "phase1" / "run.json").read_text())["ds_config"]["optimizer"]["type"]
    summary = {"pretraining_optimizer": optimizer,
               "phase1": final_eval(out / "phase1"), "phase2": final_eval(out / "phase2"),
               "squad": {k: squad[k] for k in SQUAD_KEYS if k in squad},
               "model": str(out / "phase2" / "hf"), "predictions": str(out / "squad" / "predictions.json")}
    if wall_s is not None:
        summary["wall_s"] = round(wall_s, 1)
    write_json_atomic(out / "pipeline.json", summary, indent=1)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the pipeline's output folder")
    ap.add_argument("--wall-s", type=float, default=None, help="the pipeline's wall time, recorded as is")
    args = ap.parse_args(argv)
    try:
        s = summarise(Path(args.out), args.wall_s)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"pipeline summary: {e}")
    p1, p2, sq = s["phase1"], s["phase2"], s["squad"]
    print(f"[pipeline] {s['pretraining_optimizer']} pretraining: phase 1 {p1['steps']} steps, held-out MLM loss "
          f"{p1.get('eval_mlm_loss', float('nan')):.3f}; phase 2 {p2['steps']} steps, held-out MLM loss "
          f"{p2.get('eval_mlm_loss', float('nan')):.3f}")
    print(f"[pipeline] SQuAD v1.1 ({sq['eval_examples']} questions of {sq['predict_file']}): "
          f"F1 {sq['f1']:.2f}  EM {sq['exact_match']:.2f}")
    print(f"[pipeline] written {Path(args.out) / 'pipeline.json'}")


if __name__ == "__main__":
    main()
