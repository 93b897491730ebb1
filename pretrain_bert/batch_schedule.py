"""Global batch-size schedules: ``fixed``, ``linear_warmup`` and ``gns`` (grow the batch
when the measured critical batch size passes it).

In the ``"pretraining"`` block of a phase config:

    "batch_schedule": {"type": "fixed"}                                    (default)
    "batch_schedule": {"type": "linear_warmup", "max": 1024, "warmup_samples": 50000}
    "batch_schedule": {"type": "gns", "max": 1024, "factor": 1.0, "growth": 2}

The batch starts at DeepSpeed's ``train_batch_size`` and changes only through the number
of gradient-accumulation micro-steps, so it is always a multiple of
``train_micro_batch_size_per_gpu`` x ranks (``unit``).

- ``linear_warmup``, the literature's baseline: the batch grows linearly with the samples
  seen, from the start batch to ``max`` over ``warmup_samples``, rounded down to a unit.
- ``gns``: after every noise-scale measurement (a VR optimizer's telemetry, or DeepSpeed's
  ``vrgd_noise_scale`` measure-only key), if ``b_simple_ema`` > ``factor`` x the current
  batch, the batch is multiplied by ``growth`` (rounded down to a unit), up to ``max``.

The learning rate follows docs/algorithm.md section 5: the optimizer's lr is the one for
the start batch B0, and at batch B it is multiplied by sqrt(B / B0) (:meth:`lr_factor`).
The schedule's state (current batch, samples seen, the steps where it changed) goes into
the checkpoints, so a resumed run takes the same batches.
"""

from __future__ import annotations

import math

TYPES = ("fixed", "linear_warmup", "gns")
FIELDS = {"fixed": (), "linear_warmup": ("max", "warmup_samples"), "gns": ("max", "factor", "growth")}
DEFAULTS = {"factor": 1.0, "growth": 2}


def _positive(spec: dict, key: str, kind=int, minimum=1):
    value = spec[key]
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) and value >= minimum
    if not ok:
        raise ValueError(f"pretraining.batch_schedule.{key} must be {'a number' if kind is float else 'an integer'} "
                         f">= {minimum}, got {value!r}")
    return kind(value)


class BatchSchedule:
    def __init__(self, spec: dict | None, start: int, unit: int):
        spec = dict(spec or {"type": "fixed"})
        kind = spec.pop("type", None)
        if kind not in TYPES:
            raise ValueError(f"pretraining.batch_schedule.type must be one of {TYPES}, got {kind!r}")
        unknown = sorted(set(spec) - set(FIELDS[kind]))
        if unknown:
            raise ValueError(f"pretraining.batch_schedule ({kind}): unknown key {unknown[0]!r}; allowed: "
                             f"{', '.join(('type',) + FIELDS[kind]) }")
        missing = [k for k in FIELDS[kind] if k not in spec and k not in DEFAULTS]
        if missing:
            raise ValueError(f"pretraining.batch_schedule ({kind}) needs {missing[0]!r}")
        spec = {**{k: v for k, v in DEFAULTS.items() if k in FIELDS[kind]}, **spec}
        if start % unit:
            raise ValueError(f"train_batch_size {start} is not a multiple of micro-batch x ranks = {unit}")
        self.kind, self.start, self.unit = kind, start, unit
        self.max = _positive(spec, "max") if "max" in spec else start
        if self.max < start or self.max % unit:
            raise ValueError(f"pretraining.batch_schedule.max must be a multiple of {unit} (micro-batch x ranks) "
                             f"and >= train_batch_size {start}, got {self.max}")
        self.warmup_samples = _positive(spec, "warmup_samples") if kind == "linear_warmup" else None
        self.factor = _positive(spec, "factor", float, 0) if kind == "gns" else None
        self.growth = _positive(spec, "growth", minimum=2) if kind == "gns" else None
        self.batch, self.samples, self.changes = start, 0, [[0, start]]

    def _units(self, batch: float) -> int:
        return max(self.unit, min(self.max, int(batch // self.unit) * self.unit))

    def batch_for(self, step: int) -> int:
        """The global batch of ``step`` (called once per step, before it)."""
        if self.kind == "linear_warmup":
            frac = min(1.0, self.samples / self.warmup_samples)
            self._set(step, self._units(self.start + (self.max - self.start) * frac))
        return self.batch

    def observe(self, step: int, b_simple_ema: float | None) -> bool:
        """After a noise-scale measurement at ``step``: grow the batch (gns). Returns whether it grew."""
        if self.kind != "gns" or b_simple_ema is None or self.batch >= self.max:
            return False
        if b_simple_ema > self.factor * self.batch:
            return self._set(step + 1, self._units(self.batch * self.growth))
        return False

    def _set(self, step: int, batch: int) -> bool:
        if batch == self.batch:
            return False
        self.batch = batch
        self.changes.append([step, batch])
        return True

    def consumed(self, batch: int) -> None:
        self.samples += batch

    def lr_factor(self) -> float:
        """sqrt(B / B0): the square-root LR scaling of docs/algorithm.md section 5."""
        return math.sqrt(self.batch / self.start)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "batch": self.batch, "samples": self.samples, "changes": [list(c) for c in self.changes]}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"the checkpoint's batch schedule is {state['kind']!r}, the config's {self.kind!r}")
        self.batch, self.samples, self.changes = int(state["batch"]), int(state["samples"]), [list(c) for c in state["changes"]]


class SampleStream:
    """Sample position -> instance, a pure function of (seed, position): one seeded permutation
    per pass over the data, passes back to back, so a batch of any size starting anywhere is
    defined (the fixed-batch runs keep :class:`pretrain_bert.runtime.Batches`; the same permutations)."""

    def __init__(self, dataset, seed: int):
        if len(dataset) == 0:
            raise ValueError("the training data is empty")
        self.data, self.seed = dataset, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        from pretrain_bert.runtime import epoch_permutation

        if epoch not in self._perms:
            self._perms = {epoch: epoch_permutation(len(self.data), self.seed, epoch).tolist()}
        return self._perms[epoch]

    def epoch(self, position: int) -> int:
        return position // len(self.data)

    def indices(self, start: int, count: int) -> list[int]:
        n = len(self.data)
        return [self._perm(p // n)[p % n] for p in range(start, start + count)]

    def micro_batches(self, start: int, batch: int, world: int, accumulation: int, rank: int, collate) -> list:
        """This rank's micro-batches of the global batch at ``start``: chunk j * world + rank of
        the world x accumulation equal chunks (the split the tests' reference uses)."""
        idx = self.indices(start, batch)
        size = batch // (world * accumulation)
        chunks = [idx[c * size:(c + 1) * size] for c in range(world * accumulation)]
        return [collate([self.data[i] for i in chunks[j * world + rank]]) for j in range(accumulation)]


def lr_multiplier(schedule: BatchSchedule, run) -> float:
    """The LR multiplier of the coming step when the batch can change: NVIDIA's poly warm-up
    over samples (a "step" of the start batch B0 as the unit) times sqrt(B / B0). ``run``: the
    phase's :class:`pretrain_bert.run_config.PhaseConfig`."""
    from pretrain_bert.schedule import poly_warmup

    unit = schedule.start
    total = run.max_samples / unit if run.max_samples else run.max_steps
    return poly_warmup(schedule.samples / unit, total, run.warmup_proportion, run.poly_power) \
        * schedule.lr_factor()
