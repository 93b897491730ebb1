"""Shared fixtures of the test suite, and the test folders on sys.path (helpers: ds_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "ds_scripts")]


@pytest.fixture(scope="session")
def small_pretraining_data(tmp_path_factory) -> Path:
    """Phase-1 data (seq 128) from 10 documents of the shipped corpus, with a held-out split."""
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    data = tmp_path_factory.mktemp("small_data") / "data"
    prepare_pretraining_data([ROOT / "data" / "corpus" / "wikitext-2-valid.txt"],
                             ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt", data,
                             InstanceConfig(dupe_factor=1, max_documents=10, heldout_fraction=0.2))
    return data
