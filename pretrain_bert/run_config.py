"""The ``"pretraining"`` block of a phase config, and the small pieces around it.

A phase config is DeepSpeed's JSON plus::

    "pretraining": {"phase": 1, "model": "tiny", "seq_len": 128, "max_predictions": 20,
                    "max_steps": 200, "warmup_proportion": 0.2843, "poly_power": 0.5,
                    "eval_every": 50, "eval_batches": 20, "checkpoint_every": 100, "seed": 42}

The block is removed before the rest goes to ``deepspeed.initialize``. Command-line flags
(``--max-steps``, ``--eval-every``, ...) override it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

DEFAULTS = {"phase": 1, "model": "tiny", "seq_len": 128, "max_predictions": 20, "max_steps": None,
            "warmup_proportion": 0.01, "poly_power": 0.5, "eval_every": 0, "eval_batches": 0,
            "checkpoint_every": 0, "log_every": 1, "seed": 42, "max_position_embeddings": 512}
OVERRIDES = ("max_steps", "eval_every", "checkpoint_every", "log_every", "seed")


def load(path: str | os.PathLike, args) -> tuple[dict, dict]:
    """(DeepSpeed config, run settings) from a phase config file and CLI overrides."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {str(path)!r} is not valid JSON: {e}") from None
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
    if not isinstance(run["max_steps"], int) or run["max_steps"] < 1:
        raise ValueError(f"pretraining.max_steps must be an integer >= 1, got {run['max_steps']!r}")
    if run["phase"] not in (1, 2):
        raise ValueError(f"pretraining.phase must be 1 or 2, got {run['phase']!r}")
    for key in ("eval_every", "eval_batches", "checkpoint_every"):
        if not isinstance(run[key], int) or run[key] < 0:
            raise ValueError(f"pretraining.{key} must be an integer >= 0, got {run[key]!r}")
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


def maybe_kill_for_test(step: int) -> None:
    """Test hook: PRETRAIN_BERT_KILL_AT_SAVE=N SIGKILLs every rank while saving step N's
    checkpoint, after DeepSpeed wrote its files and before it is marked complete."""
    if os.environ.get("PRETRAIN_BERT_KILL_AT_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
