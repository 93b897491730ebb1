"""Batch-size schedules (pure logic): growth rules, rounding, the LR rule, state."""

import math

import pytest

from pretrain_bert.batch_schedule import BatchSchedule


def test_fixed_never_changes():
    s = BatchSchedule(None, start=64, unit=32)
    for step in range(5):
        assert s.batch_for(step) == 64
        s.consumed(64)
        assert not s.observe(step, 1e9)
    assert s.lr_factor() == 1.0 and s.changes == [[0, 64]]


def test_linear_warmup_grows_with_samples_in_units():
    s = BatchSchedule({"type": "linear_warmup", "max": 256, "warmup_samples": 640}, start=64, unit=32)
    seen = []
    for step in range(8):
        b = s.batch_for(step)
        seen.append(b)
        s.consumed(b)
    assert seen[0] == 64 and seen[-1] == 256 and seen == sorted(seen)
    assert all(b % 32 == 0 for b in seen)
    assert s.lr_factor() == pytest.approx(math.sqrt(256 / 64))


def test_gns_grows_when_the_noise_scale_passes_the_batch_and_stops_at_max():
    s = BatchSchedule({"type": "gns", "max": 256, "factor": 1.0, "growth": 2}, start=64, unit=32)
    assert not s.observe(3, 50.0)  # below the batch
    assert not s.observe(3, None)  # grad_sq <= 0: nothing to compare
    assert s.observe(4, 70.0) and s.batch == 128 and s.changes[-1] == [5, 128]
    assert s.observe(9, 300.0) and s.batch == 256
    assert not s.observe(10, 1e9) and s.batch == 256  # at max
    state = s.state_dict()
    other = BatchSchedule({"type": "gns", "max": 256}, start=64, unit=32)
    other.load_state_dict(state)
    assert other.batch == 256 and other.changes == s.changes


@pytest.mark.parametrize("spec,words", [
    ({"type": "cosine"}, "batch_schedule.type must be one of ('fixed', 'linear_warmup', 'gns'), got 'cosine'"),
    ({"type": "gns", "max": 100}, "batch_schedule.max must be a multiple of 32"),
    ({"type": "gns", "max": 32}, ">= train_batch_size 64, got 32"),
    ({"type": "gns", "max": 256, "growth": 1}, "batch_schedule.growth must be an integer >= 2, got 1"),
    ({"type": "gns", "max": 256, "factor": "2"}, "batch_schedule.factor must be a number >= 0, got '2'"),
    ({"type": "linear_warmup", "max": 256}, "needs 'warmup_samples'"),
    ({"type": "fixed", "max": 256}, "unknown key 'max'; allowed: type"),
])
def test_bad_specs_name_the_key(spec, words):
    with pytest.raises(ValueError, match=None) as err:
        BatchSchedule(spec, start=64, unit=32)
    assert words in str(err.value)


def test_checkpoint_of_another_kind_is_refused():
    s = BatchSchedule({"type": "gns", "max": 256}, start=64, unit=32)
    with pytest.raises(ValueError, match="the checkpoint's batch schedule is 'fixed'"):
        s.load_state_dict(BatchSchedule(None, 64, 32).state_dict())
