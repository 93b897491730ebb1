"""SQuAD v1.1 fine-tuning of a BERT checkpoint on DeepSpeed, then the official evaluation.

    deepspeed --num_gpus 2 pretrain_bert/squad/run.py --init-checkpoint runs/demo/phase2/hf \\
        --deepspeed-config configs/squad_tiny.json --output-dir runs/demo/squad

(`launch/run_squad.sh` wraps this.) `--init-checkpoint` is any local Hugging Face BERT folder:
our pretraining's `hf/` (a `BertForPreTraining`), a `BertModel`, a `BertForQuestionAnswering`.
The span head (`qa_outputs`) is initialised fresh from `--seed` unless the folder has one. The
tokenizer comes from the same folder, or from `--vocab` (a WordPiece vocab.txt).

The optimizer is whatever the DeepSpeed JSON names (the paper fine-tunes every pretrained model
with the same recipe): DeepSpeed's `AdamW` with `"torch_adam": true` in the shipped configs, or
any vrgd-ds name. `--lr` overrides the config's LR; the schedule is a linear warm-up over
`--warmup-proportion` of the steps, then linear decay to 0 (Google's and NVIDIA's run_squad).

Data order: one permutation of the training windows per epoch, seeded by (seed, epoch); each
global batch is split into ranks x micro-steps (micro-batch j of rank r is chunk j * W + r), and
the last incomplete global batch of an epoch is dropped (:class:`pretrain_bert.runtime.Batches`,
the same data order and seed formulas as pretraining). Evaluation: each rank runs every W-th
eval window, rank 0 gathers the logits, picks the best span per question (n-best over windows,
`squad.data.postprocess_predictions`) and scores it with the official metric.

Writes into `--output-dir` (rank 0): `predictions.json` ({question id: answer}), `results.json`
(exact_match, f1, counts, steps, losses, timings, the arguments), and with
`--max-eval-examples` `eval_dataset.json`, the predict file cut to the evaluated questions, so
`python -m pretrain_bert.squad.metric OUT/eval_dataset.json OUT/predictions.json` re-scores it.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import vrgd_ds  # noqa: F401  (registers the optimizers with DeepSpeed)
import deepspeed
import torch.distributed as dist

from pretrain_bert.runtime import (
    Batches, deepspeed_run, dropout_seed, on_device, param_groups, progress_bar, sum_over_ranks, write_json_atomic,
)
from pretrain_bert.squad import data as squad_data
from pretrain_bert.squad.metric import SquadFormatError, evaluate, load_json
from pretrain_bert.tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init-checkpoint", required=True, help="local Hugging Face BERT folder")
    ap.add_argument("--deepspeed-config", default=str(ROOT / "configs" / "squad_tiny.json"))
    ap.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: the checkpoint's tokenizer)")
    ap.add_argument("--train-file", default=str(ROOT / "data" / "squad" / "train-v1.1-subset.json"))
    ap.add_argument("--predict-file", default=str(ROOT / "data" / "squad" / "dev-v1.1-subset.json"))
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    ap.add_argument("--max-train-examples", type=int, default=None, help="first N training questions")
    ap.add_argument("--max-eval-examples", type=int, default=None, help="first N questions of --predict-file")
    ap.add_argument("--max-seq-length", type=int, default=squad_data.MAX_SEQ_LENGTH)
    ap.add_argument("--doc-stride", type=int, default=squad_data.DOC_STRIDE)
    ap.add_argument("--max-query-length", type=int, default=squad_data.MAX_QUERY_LENGTH)
    ap.add_argument("--n-best-size", type=int, default=squad_data.N_BEST_SIZE)
    ap.add_argument("--max-answer-length", type=int, default=squad_data.MAX_ANSWER_LENGTH)
    ap.add_argument("--lr", type=float, default=None, help="override the config's optimizer lr")
    ap.add_argument("--warmup-proportion", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eval-batch-size", type=int, default=32, help="eval windows per forward, per rank")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = ap.parse_args(argv)
    for name in ("max_steps", "max_train_examples", "max_eval_examples", "eval_batch_size",
                 "n_best_size", "max_answer_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.epochs > 0:
        ap.error(f"--epochs must be > 0, got {args.epochs}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        ap.error(f"--warmup-proportion must be in [0, 1), got {args.warmup_proportion}")
    if not 0 < args.doc_stride < args.max_seq_length:
        ap.error(f"--doc-stride must be in (0, --max-seq-length), got {args.doc_stride}")
    return args


# ----------------------------------------------------------------------------- inputs

def load_deepspeed_config(path, lr):
    config = load_json(path, "a DeepSpeed JSON config")  # SquadFormatError names the file
    if not isinstance(config, dict) or "optimizer" not in config:
        raise ValueError(f"{path}: a DeepSpeed config with an \"optimizer\" block expected")
    if "gradient_clipping" not in config:  # DeepSpeed would silently clip at 1.0
        raise ValueError(f"{path}: set \"gradient_clipping\" explicitly (0 for none)")
    if lr is not None:
        config["optimizer"].setdefault("params", {})["lr"] = lr
    return config


def load_bert_qa(init_checkpoint, seed):
    """BertForQuestionAnswering from a local BERT folder; a new span head is seeded by `seed`."""
    from transformers import AutoConfig, BertForQuestionAnswering

    path = Path(init_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--init-checkpoint {str(path)!r}: no such directory "
                                "(expected a save_pretrained BERT folder)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init-checkpoint {str(path)!r} has no config.json "
                                "(expected a save_pretrained BERT folder, e.g. a pretraining run's hf/)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != "bert":
        raise ValueError(f"--init-checkpoint {str(path)!r} holds a {config.model_type!r} model, "
                         "expected model_type 'bert'")
    torch.manual_seed(seed)  # the QA head is the only newly initialised module
    model = BertForQuestionAnswering.from_pretrained(path, local_files_only=True)
    return model.float()


def load_tokenizer_for(init_checkpoint, vocab, model_config):
    path = Path(vocab) if vocab else Path(init_checkpoint)
    if not vocab and not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"--init-checkpoint {str(path)!r} has no tokenizer.json or "
                                "vocab.txt; pass --vocab VOCAB.txt")
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"tokenizer from {str(path)!r} has {len(tokenizer)} entries, more than the "
                         f"model's vocab_size {model_config.vocab_size}")
    return tokenizer


def load_questions(path, limit, training):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such SQuAD file")
    loaded = squad_data.load_examples(path, training=training)
    examples = loaded.examples[:limit] if limit else loaded.examples
    if not examples:
        raise SquadFormatError(f"{path}: no usable questions")
    return examples, loaded.skipped


def restrict_dataset(dataset, question_ids):
    """The SQuAD dataset with only `question_ids` kept (empty paragraphs and articles dropped)."""
    keep, articles = set(question_ids), []
    for article in dataset["data"]:
        paragraphs = [dict(p, qas=[qa for qa in p["qas"] if qa["id"] in keep]) for p in article["paragraphs"]]
        paragraphs = [p for p in paragraphs if p["qas"]]
        if paragraphs:
            articles.append(dict(article, paragraphs=paragraphs))
    return dict(dataset, data=articles)


class Inputs(NamedTuple):
    config: dict                 # DeepSpeed config, --lr applied
    model: torch.nn.Module       # BertForQuestionAnswering, fp32
    train: list                  # SquadExample, file order
    train_skipped: int           # training questions whose answer is not at answer_start
    train_tensors: dict          # training windows: model inputs and start/end positions
    dev: list
    dev_features: dict           # eval windows with example ids and offsets


def load_inputs(args) -> Inputs:
    """Everything read from disk, checked before any process group exists (errors exit cleanly)."""
    config = load_deepspeed_config(args.deepspeed_config, args.lr)
    model = load_bert_qa(args.init_checkpoint, args.seed)
    if args.max_seq_length > model.config.max_position_embeddings:
        raise ValueError(f"--max-seq-length {args.max_seq_length} exceeds the model's "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    tokenizer = load_tokenizer_for(args.init_checkpoint, args.vocab, model.config)
    train, skipped = load_questions(args.train_file, args.max_train_examples, training=True)
    dev, _ = load_questions(args.predict_file, args.max_eval_examples, training=False)
    windows = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                   max_query_length=args.max_query_length)
    train_features = squad_data.prepare_train_features(train, tokenizer, **windows)
    dev_features = squad_data.prepare_eval_features(dev, tokenizer, **windows)
    return Inputs(config, model, train, skipped, squad_data.features_to_tensors(train_features), dev,
                  dev_features)


# ----------------------------------------------------------------------------- training

def linear_warmup_decay(optimizer, total_steps, warmup_proportion):
    """Linear warm-up over int(proportion * total) steps, then linear decay to 0 at total."""
    warmup = int(warmup_proportion * total_steps)

    def multiplier(step):  # 0-based optimizer step; the first step already has a non-zero LR
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / (total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def total_steps(config, windows, args):
    """Optimizer steps: --epochs over the windows (global batch by DeepSpeed's rules), capped by --max-steps."""
    from deepspeed.runtime.config import DeepSpeedConfig

    per_epoch = windows // DeepSpeedConfig(copy.deepcopy(config)).train_batch_size
    total = max(1, math.floor(args.epochs * per_epoch))
    return (min(total, args.max_steps) if args.max_steps else total), per_epoch


def train(engine, scheduler, batches, total, seed, show_progress):
    """`total` optimizer steps; returns the loss of each step, averaged over ranks and micro-steps."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gas = engine.gradient_accumulation_steps()
    progress = progress_bar(total, "fine-tune", "step", show_progress)
    losses = []
    engine.train()
    for step in range(total):
        lr = scheduler.get_last_lr()[0]
        torch.manual_seed(dropout_seed(seed, step, world, rank))  # dropout, per rank and step
        loss = torch.zeros((), dtype=torch.float64, device=engine.device)
        for micro in batches(step):
            out = engine(**on_device(micro, engine.device))
            engine.backward(out.loss)
            engine.step()
            loss += out.loss.detach().double()  # summed on the device: no host sync per micro-step
        loss = float(sum_over_ranks(loss, engine.device)) / (world * gas)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {step + 1}")
        losses.append(loss)
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            progress.update(1)
    if progress is not None:
        progress.close()
    return losses


@torch.no_grad()
def predict_logits(engine, features, batch_size, show_progress):
    """Start/end logits of every eval window, in window order, on rank 0 (None elsewhere)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = squad_data.features_to_tensors(features)
    mine = list(range(rank, len(features["example_id"]), world))
    progress = progress_bar(len(mine), "predict", "window", show_progress)
    seq = tensors["input_ids"].shape[1]
    starts, ends = [np.zeros((0, seq), np.float32)], [np.zeros((0, seq), np.float32)]
    engine.eval()
    for i in range(0, len(mine), batch_size):
        rows = torch.tensor(mine[i:i + batch_size])
        out = engine(**on_device({k: v[rows] for k, v in tensors.items()}, engine.device))
        starts.append(out.start_logits.float().cpu().numpy())
        ends.append(out.end_logits.float().cpu().numpy())
        if progress is not None:
            progress.update(len(rows))
    if progress is not None:
        progress.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, (mine, np.concatenate(starts), np.concatenate(ends)))
    if rank != 0:
        return None
    start_logits = np.zeros((len(features["example_id"]), seq), np.float32)
    end_logits = np.zeros_like(start_logits)
    for rows, s, e in gathered:
        start_logits[rows], end_logits[rows] = s, e
    return start_logits, end_logits


def score(args, dev, dev_features, logits, out):
    """predictions.json and the official scores, on the evaluated questions only (rank 0)."""
    predictions = squad_data.postprocess_predictions(
        dev, dev_features, *logits, n_best_size=args.n_best_size, max_answer_length=args.max_answer_length)
    squad_data.write_predictions(out / "predictions.json", predictions)
    dataset = load_json(args.predict_file, "a SQuAD v1.1 dataset")
    restricted = {}
    if args.max_eval_examples:
        dataset = restrict_dataset(dataset, predictions)
        write_json_atomic(out / "eval_dataset.json", dataset)
        restricted["restricted_to"] = (f"the first {len(dev)} questions of {args.predict_file} "
                                       "(--max-eval-examples); eval_dataset.json holds them")
    metrics = evaluate(dataset, predictions, source=args.predict_file, quiet=True)
    return dict(exact_match=metrics["exact_match"], f1=metrics["f1"], **restricted,
                eval_examples=metrics["total"], eval_missing=metrics["missing"],
                eval_windows=len(dev_features["example_id"]), predict_file=args.predict_file)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    try:
        inputs = load_inputs(args)
    except (OSError, ValueError) as err:  # SquadFormatError is a ValueError
        print(f"run.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    with deepspeed_run() as (rank, world):
        fine_tune(args, inputs, rank, world)


def fine_tune(args, inputs, rank, world):
    """Train, predict, score; rank 0 writes predictions.json and results.json."""
    show_progress = rank == 0 and not args.no_progress
    out = Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    windows = len(inputs.train_tensors["input_ids"])
    total, per_epoch = total_steps(inputs.config, windows, args)
    engine, _, _, scheduler = deepspeed.initialize(
        model=inputs.model, model_parameters=param_groups(inputs.model), config=inputs.config,
        lr_scheduler=lambda opt: linear_warmup_decay(opt, total, args.warmup_proportion))
    tensors = inputs.train_tensors
    batches = Batches(windows, engine.train_batch_size(), world, rank, engine.gradient_accumulation_steps(),
                      args.seed, lambda rows: {k: v[rows] for k, v in tensors.items()},
                      unit="windows", remedy="use more training examples or a smaller batch")

    t0 = time.perf_counter()
    losses = train(engine, scheduler, batches, total, args.seed, show_progress)
    t1 = time.perf_counter()
    logits = predict_logits(engine, inputs.dev_features, args.eval_batch_size, show_progress)
    if rank == 0:
        result = score(args, inputs.dev, inputs.dev_features, logits, out)
        optimizer = inputs.config["optimizer"]
        result.update(
            train_examples=len(inputs.train), train_skipped=inputs.train_skipped, train_windows=windows,
            steps=total, epochs=total / per_epoch, global_batch=engine.train_batch_size(),
            world_size=world, optimizer=optimizer["type"], lr=optimizer.get("params", {}).get("lr"),
            train_loss_first=losses[0], train_loss_last=losses[-1],
            train_loss_last10=sum(losses[-10:]) / len(losses[-10:]),
            train_seconds=t1 - t0, eval_seconds=time.perf_counter() - t1,
            args={k: v for k, v in vars(args).items() if k != "local_rank"})
        write_json_atomic(out / "results.json", result)
        print(f"SQuAD v1.1, {result['eval_examples']} questions of {args.predict_file}: "
              f"F1 {result['f1']:.2f}, EM {result['exact_match']:.2f} "
              f"({total} steps, last loss {losses[-1]:.3f})", flush=True)


if __name__ == "__main__":
    main()
