"""The ``"pretraining"`` block of a phase config, and the small pieces around it.

A phase config is DeepSpeed's JSON plus::

    "pretraining": {"phase": 1, "model": "tiny", "seq_len": 128, "max_predictions": 20,
                    "max_steps": 200, "warmup_proportion": 0.2843, "poly_power": 0.5,
                    "eval_every": 50, "eval_batches": 20, "checkpoint_every": 100,
                    "keep_checkpoints": 3, "seed": 42}

The block is removed before the rest goes to ``deepspeed.initialize``. Command-line flags
(``--max-steps``, ``--eval-every``, ...) override it. Every key is checked for its type and
range (:data:`CHECKS`); the error names the key, what is allowed and the value given.
``keep_checkpoints``: how many complete checkpoints retention keeps (default 3, 0 keeps all).
``max_samples``: also stop once this many samples were seen (with ``max_samples`` the LR
schedule runs over samples, so runs with different batch schedules see the same LR at the
same sample). ``batch_schedule``: see :mod:`pretrain_bert.batch_schedule`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain_bert.modeling import BERT_SIZES

DEFAULTS = {"phase": 1, "model": "tiny", "seq_len": 128, "max_predictions": 20, "max_steps": None,
            "warmup_proportion": 0.01, "poly_power": 0.5, "eval_every": 0, "eval_batches": 0,
            "checkpoint_every": 0, "keep_checkpoints": 3, "log_every": 1, "seed": 42,
            "max_position_embeddings": 512, "max_samples": 0, "batch_schedule": None}
OVERRIDES = ("max_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "seed")


def _integer(lo):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def _number(test, what):
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v)), f"a number {what}"


# key: (check, what a valid value is); the message is "pretraining.KEY must be WHAT, got VALUE"
CHECKS = {
    "phase": ((lambda v: type(v) is int and v in (1, 2)), "1 or 2"),
    "model": ((lambda v: isinstance(v, str) and v in BERT_SIZES), f"one of {', '.join(map(repr, BERT_SIZES))}"),
    "seq_len": _integer(1), "max_predictions": _integer(1), "max_steps": _integer(1),
    "warmup_proportion": _number(lambda v: 0 <= v < 1, "in [0, 1)"),
    "poly_power": _number(lambda v: v > 0, "> 0"),
    "eval_every": _integer(0), "eval_batches": _integer(0), "checkpoint_every": _integer(0),
    "keep_checkpoints": (_integer(0)[0], "an integer >= 0 (0 keeps every checkpoint)"),
    "log_every": _integer(1), "seed": _integer(0), "max_position_embeddings": _integer(1),
    "max_samples": (_integer(0)[0], "an integer >= 0 (0: stop at max_steps only)"),
    "batch_schedule": ((lambda v: v is None or isinstance(v, dict)),
                       "an object like {\"type\": \"gns\", \"max\": 1024} (see pretrain_bert.batch_schedule)"),
}


def load(path: str | os.PathLike, args) -> tuple[dict, dict]:
    """(DeepSpeed config, run settings) from a phase config file and CLI overrides."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {str(path)!r} must hold a JSON object, got {type(config).__name__}")
    block = config.pop("pretraining", None)
    if not isinstance(block, dict):
        raise ValueError(f"--config {str(path)!r} has no \"pretraining\" block (phase, model, max_steps, ...)")
    unknown = sorted(set(block) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"--config {str(path)!r}: unknown pretraining key {unknown[0]!r}; "
                         f"allowed: {', '.join(DEFAULTS)}")
    run = {**DEFAULTS, **block}
    for key in OVERRIDES:
        value = getattr(args, key, None)
        if value is not None:
            run[key] = value
    for key, (valid, what) in CHECKS.items():
        if not valid(run[key]):
            kind = "" if isinstance(run[key], (int, float)) and not isinstance(run[key], bool) else \
                f" ({type(run[key]).__name__})"
            raise ValueError(f"pretraining.{key} must be {what}, got {run[key]!r}{kind}")
    if run["seq_len"] > run["max_position_embeddings"]:
        raise ValueError(f"pretraining.seq_len {run['seq_len']} exceeds pretraining.max_position_embeddings "
                         f"{run['max_position_embeddings']}")
    return config, run


def check_data(run: dict, meta: dict, data: str) -> None:
    for key in ("seq_len", "max_predictions"):
        if meta["config"][key] != run[key]:
            raise ValueError(f"--data {data!r} was prepared with {key} {meta['config'][key]}, but the config's "
                             f"pretraining.{key} is {run[key]}; prepare data for this phase")


def carry_optimizer_state(engine, init_checkpoint: str | os.PathLike) -> None:
    """Phase 1's final optimizer state (any world size) into this engine; fresh LR schedule."""
    from pretrain_bert.checkpointing import latest_complete
    from vrgd_ds.deepspeed.checkpoint import consolidate, load_consolidated

    ckpt_dir = Path(init_checkpoint).parent / "checkpoints"
    found = latest_complete(ckpt_dir)
    if found is None:
        raise FileNotFoundError(f"--carry-optimizer-state: no complete checkpoint in {ckpt_dir}")
    load_consolidated(engine, consolidate(ckpt_dir / found["tag"]), engine_state=False, hyperparameters=False)
