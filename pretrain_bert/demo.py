"""The main job's default: prepare data, BERT phase 1, phase 2, on the shipped corpus.

    python -m pretrain_bert.demo [--optimizer vrlamb|lamb] [--ranks 2] [--out runs/demo-...]

1. Data: the shipped WikiText-2 validation text (data/corpus/) with BERT's uncased vocab
   (data/vocab/), prepared once for seq 128 / 20 predictions and seq 512 / 80 predictions
   under runs/data/ (reused while the options are the same);
2. phase 1: `deepspeed --num_gpus 2 pretrain_bert/run_pretraining.py` with
   configs/bert_tiny_phase1_<optimizer>.json (global batch 64, seq 128);
3. phase 2 from phase 1's weights: configs/bert_tiny_phase2_<optimizer>.json (global
   batch 32, seq 512: the "mixed batch" of the paper in miniature);
4. loss.png (both phases on one step axis) and summary.json in the run folder.

Output: one progress bar per phase; DeepSpeed's INFO log is off unless ``--verbose``.

On CPU (DS_ACCELERATOR=cpu, gloo) with 2 ranks it takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vrgd_ds.deepspeed.launching import LockTimeout, launch_env, local_launch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus" / "wikitext-2-valid.txt"
VOCAB = ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt"
PHASES = {1: (128, 20), 2: (512, 80)}


def prepare(seq_len, max_predictions, data_root: Path) -> Path:
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data
    from pretrain_bert.pretraining_dataset import load_meta

    out = data_root / f"wikitext2-valid-{seq_len}"
    config = InstanceConfig(seq_len=seq_len, max_predictions=max_predictions, dupe_factor=5, seed=12345,
                            heldout_fraction=0.1)
    if (out / "meta.json").is_file():
        meta = load_meta(out)
        if meta["config"] == json.loads(json.dumps(config.__dict__)) and meta["inputs"] == [str(CORPUS)]:
            print(f"[demo] reusing {out}")
            return out
        print(f"[demo] {out} was prepared with other options; preparing again")
    print(f"[demo] preparing {out} (seq {seq_len}, {max_predictions} predictions)")
    prepare_pretraining_data([CORPUS], VOCAB, out, config, overwrite=True, progress=True)
    return out


# DeepSpeed calls torch's deprecated all_gather_into_tensor on every step: one FutureWarning per rank
QUIET_WARNINGS = "ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning"


def launch(ranks: int, args: list[str], verbose: bool = False) -> None:
    env = launch_env(pythonpath=ROOT)
    launcher_args = []
    if not verbose:  # DeepSpeed's launcher logs pages of INFO lines around the progress bar
        launcher_args = ["--log_level", "error"]
        env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), QUIET_WARNINGS) if w)
    try:  # a stale build lock or a hung build of DeepSpeed's CPU op fails here, named, not in the ranks
        with local_launch(ROOT / "pretrain_bert" / "run_pretraining.py", args, ranks, env,
                          launcher_args=launcher_args) as (cmd, env):
            if verbose:
                print("[demo] " + " ".join(cmd), flush=True)
            proc = subprocess.run(cmd, env=env)
    except (LockTimeout, RuntimeError) as err:
        sys.exit(f"[demo] {err}")
    if proc.returncode != 0:
        sys.exit(f"[demo] the launch failed with exit code {proc.returncode}"
                 + ("" if verbose else " (--verbose shows DeepSpeed's own log)"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=("vrlamb", "lamb"), default="vrlamb")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=None, help="run folder (default: runs/demo-<time>)")
    ap.add_argument("--data-root", default=str(ROOT / "runs" / "data"))
    ap.add_argument("--phase1-steps", type=int, default=None, help="override the config's max_steps")
    ap.add_argument("--phase2-steps", type=int, default=None)
    ap.add_argument("--verbose", action="store_true", help="DeepSpeed's INFO log and the launch commands")
    args = ap.parse_args(argv)
    out = Path(args.out or ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S"))
    if out.exists() and any(out.iterdir()):
        sys.exit(f"[demo] {out} exists and is not empty; choose another --out")
    t0 = time.time()
    data = {p: prepare(*PHASES[p], Path(args.data_root)) for p in PHASES}
    steps = {1: args.phase1_steps, 2: args.phase2_steps}
    for phase in PHASES:
        extra = ["--max-steps", str(steps[phase])] if steps[phase] else []
        if phase == 2:
            extra += ["--init-checkpoint", str(out / "phase1" / "hf")]
        print(f"[demo] phase {phase}: {args.ranks} ranks, configs/bert_tiny_phase{phase}_{args.optimizer}.json, "
              f"seq {PHASES[phase][0]} -> {out / f'phase{phase}'}", flush=True)
        launch(args.ranks, ["--config", str(ROOT / "configs" / f"bert_tiny_phase{phase}_{args.optimizer}.json"),
                            "--data", str(data[phase]), "--output-dir", str(out / f"phase{phase}"), *extra],
               args.verbose)
    from pretrain_bert.pipeline import final_eval
    from pretrain_bert.plot import plot

    plot([out / "phase1", out / "phase2"], out / "loss.png", labels=["phase 1", "phase 2"], phases=True)
    summary = {"optimizer": args.optimizer, "ranks": args.ranks, "wall_s": round(time.time() - t0, 1),
               **{f"phase{p}": final_eval(out / f"phase{p}") for p in PHASES}, "model": str(out / "phase2" / "hf")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"[demo] done in {summary['wall_s']:.0f} s: {out}/loss.png, {out}/summary.json; "
          f"the pretrained model is {out}/phase2/hf (BertForPreTraining.from_pretrained loads it)")


if __name__ == "__main__":
    main()
