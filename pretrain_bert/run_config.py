"""The ``"pretraining"`` block of a phase config, as a typed :class:`PhaseConfig`.

A phase config is DeepSpeed's JSON plus::

    "pretraining": {"phase": 1, "model": "tiny", "seq_len": 128, "max_predictions": 20,
                    "max_steps": 200, "warmup_proportion": 0.2843, "poly_power": 0.5,
                    "eval_every": 50, "eval_batches": 20, "checkpoint_every": 100,
                    "keep_checkpoints": 3, "seed": 42}

The block is removed before the rest goes to ``deepspeed.initialize``. Command-line flags
(``--max-steps``, ``--eval-every``, ...) override it. Every key is a field of
:class:`PhaseConfig` and is checked for its type and range (the field's ``check``); an unknown
key names the allowed ones, a bad value gives "pretraining.KEY must be WHAT, got VALUE".
``keep_checkpoints``: how many complete checkpoints retention keeps (default 3, 0 keeps all).
``max_samples``: also stop once this many samples were seen (with ``max_samples`` the LR
schedule runs over samples, so runs with different batch schedules see the same LR at the
same sample). ``batch_schedule``: see :mod:`pretrain_bert.batch_schedule`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pretrain_bert.modeling import BERT_SIZES

OVERRIDES = ("max_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "seed")


def _integer(lo, what=None):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), what or f"an integer >= {lo}"


def _number(test, what):
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v)), f"a number {what}"


def _key(default, check):
    """A field with its default and ``check`` = (valid(value) -> bool, what a valid value is)."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class PhaseConfig:
    """One pretraining phase's settings (the ``"pretraining"`` block with defaults and overrides)."""

    phase: int = _key(1, ((lambda v: type(v) is int and v in (1, 2)), "1 or 2"))
    model: str = _key("tiny", ((lambda v: isinstance(v, str) and v in BERT_SIZES),
                               f"one of {', '.join(map(repr, BERT_SIZES))}"))
    seq_len: int = _key(128, _integer(1))
    max_predictions: int = _key(20, _integer(1))
    max_steps: int = _key(None, _integer(1))  # required: the default None is refused
    warmup_proportion: float = _key(0.01, _number(lambda v: 0 <= v < 1, "in [0, 1)"))
    poly_power: float = _key(0.5, _number(lambda v: v > 0, "> 0"))
    eval_every: int = _key(0, _integer(0))
    eval_batches: int = _key(0, _integer(0))
    checkpoint_every: int = _key(0, _integer(0))
    keep_checkpoints: int = _key(3, _integer(0, "an integer >= 0 (0 keeps every checkpoint)"))
    log_every: int = _key(1, _integer(1))
    seed: int = _key(42, _integer(0))
    max_position_embeddings: int = _key(512, _integer(1))
    max_samples: int = _key(0, _integer(0, "an integer >= 0 (0: stop at max_steps only)"))
    batch_schedule: dict | None = _key(None, ((lambda v: v is None or isinstance(v, dict)),
                                              "an object like {\"type\": \"gns\", \"max\": 1024} "
                                              "(see pretrain_bert.batch_schedule)"))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            valid, what = f.metadata["check"]
            value = getattr(self, f.name)
            if not valid(value):
                kind = "" if isinstance(value, (int, float)) and not isinstance(value, bool) else \
                    f" ({type(value).__name__})"
                raise ValueError(f"pretraining.{f.name} must be {what}, got {value!r}{kind}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"pretraining.seq_len {self.seq_len} exceeds pretraining.max_position_embeddings "
                             f"{self.max_position_embeddings}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_block(cls, block: dict, args=None, source: str = "the config") -> PhaseConfig:
        """The block's keys, then the non-None ``args`` attributes named in :data:`OVERRIDES`."""
        unknown = sorted(set(block) - set(cls.keys()))
        if unknown:
            raise ValueError(f"{source}: unknown pretraining key {unknown[0]!r}; allowed: {', '.join(cls.keys())}")
        overrides = {key: getattr(args, key) for key in OVERRIDES if getattr(args, key, None) is not None}
        return cls(**{**block, **overrides})

    def as_dict(self) -> dict:
        """The settings as a JSON-ready dict, keys in field order (run.json's ``"run"``)."""
        return dataclasses.asdict(self)

    def check_data(self, meta: dict, data: str) -> None:
        """Refuse data prepared for another sequence length or prediction count."""
        for key in ("seq_len", "max_predictions"):
            if meta["config"][key] != getattr(self, key):
                raise ValueError(f"--data {data!r} was prepared with {key} {meta['config'][key]}, but the config's "
                                 f"pretraining.{key} is {getattr(self, key)}; prepare data for this phase")


def load(path: str | os.PathLike, args) -> tuple[dict, PhaseConfig]:
    """(DeepSpeed config, phase settings) from a phase config file and CLI overrides."""
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
    return config, PhaseConfig.from_block(block, args, source=f"--config {str(path)!r}")
