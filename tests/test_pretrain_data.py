"""BERT pretraining data (pretrain_bert.data): the create_pretraining_data.py recipe on real text.

Real corpus (WikiText-2 valid, shipped in data/corpus) and the real BERT-base uncased vocab,
cut down with max_documents so each test takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain_bert.corpus import read_documents, split_sentences
from pretrain_bert.data import (COLUMNS, CRASH_HOOK_ENV, DynamicMaskingCollator, InstanceConfig,
                                collate, load_meta, load_pretraining_data,
                                prepare_pretraining_data, to_hf_inputs, tokenize_documents)
from pretrain_bert.tokenization import load_tokenizer, train_wordpiece

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus" / "wikitext-2-valid.txt"
VOCAB = ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt"
CLS, SEP, MASK = 101, 102, 103
SMALL = dict(seq_len=128, max_predictions=20, dupe_factor=2, seed=7, max_documents=8,
             heldout_fraction=0.2)


def prepare(out, inputs=(CORPUS,), vocab=VOCAB, num_shards=1, overwrite=False, **options):
    config = InstanceConfig(**{**SMALL, **options})
    return prepare_pretraining_data(list(inputs), vocab, out, config, num_shards, overwrite)


def columns(path, split="train"):
    return {name: np.asarray(load_pretraining_data(path, split)[name]) for name in COLUMNS}


def restore_originals(data):
    """input_ids with the original tokens put back at the masked positions."""
    ids = data["input_ids"].copy()
    for row, (positions, labels) in enumerate(zip(data["masked_lm_positions"], data["masked_lm_ids"])):
        valid = positions != 0
        ids[row, positions[valid]] = labels[valid]
    return ids


def tree_digest(path):
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pretrain_bert.data", "--no-progress", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "wt128"
    meta = prepare(out, num_shards=3)
    return out, meta, columns(out)


@pytest.fixture(scope="module")
def tokenized_documents():
    documents = read_documents([CORPUS], max_documents=SMALL["max_documents"])
    return tokenize_documents(documents, load_tokenizer(VOCAB))[0]


def test_layout_shapes_and_fixed_lengths(small):
    out, meta, data = small
    assert sorted(p.name for p in out.iterdir()) == ["heldout", "meta.json", "train"]
    assert len(list((out / "train").glob("*.arrow"))) == 3 == meta["num_shards"]["train"]
    assert load_meta(out) == meta
    assert meta["documents"] == 8 and meta["split_documents"] == {"train": 6, "heldout": 2}
    n = meta["instances"]["train"]
    assert n > 300 and meta["instances"]["heldout"] > 0
    for name, width in [("input_ids", 128), ("token_type_ids", 128), ("attention_mask", 128),
                        ("masked_lm_positions", 20), ("masked_lm_ids", 20)]:
        assert data[name].shape == (n, width), name
    assert data["next_sentence_label"].shape == (n,)
    batch = collate([load_pretraining_data(out)[i] for i in range(5)])
    assert list(batch) == list(COLUMNS)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == (5, 128) and batch["masked_lm_ids"].shape == (5, 20)


def test_cls_sep_token_type_ids_and_padding(small):
    _, _, data = small
    original = restore_originals(data)
    for ids, types, mask in zip(original, data["token_type_ids"], data["attention_mask"]):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        assert ids[0] == CLS and ids[length - 1] == SEP and not ids[length:].any()
        seps = np.flatnonzero(ids[:length] == SEP)
        assert len(seps) == 2 and seps[0] >= 2 and seps[1] - seps[0] >= 2   # A and B non-empty
        assert not types[:seps[0] + 1].any() and types[seps[0] + 1:length].all()
        assert not types[length:].any() and CLS not in ids[1:length]


def test_masking_rate_80_10_10_and_original_ids(small, tokenized_documents):
    _, _, data = small
    original = restore_originals(data)
    valid = data["masked_lm_positions"] != 0
    lengths = data["attention_mask"].sum(1)
    expected = np.minimum(20, np.maximum(1, np.round(lengths * 0.15)))
    np.testing.assert_array_equal(valid.sum(1), expected)   # the reference's num_to_predict
    assert abs(valid.sum() / lengths.sum() - 0.15) < 0.01
    for positions, row_valid in zip(data["masked_lm_positions"], valid):
        kept = positions[row_valid]
        assert (np.diff(kept) > 0).all() and row_valid[:row_valid.sum()].all()   # sorted, 0-padded
    rows = np.nonzero(valid)[0]
    positions = data["masked_lm_positions"][valid]
    labels, shown = data["masked_lm_ids"][valid], data["input_ids"][rows, positions]
    assert not np.isin(labels, [CLS, SEP, 0]).any()
    n = len(labels)
    assert n > 5000
    for share, target in [((shown == MASK).mean(), 0.8), ((shown == labels).mean(), 0.1),
                          (((shown != MASK) & (shown != labels)).mean(), 0.1)]:
        assert abs(share - target) < 4 * np.sqrt(target * (1 - target) / n) + 1e-3, (share, target)
    # Originals: segment A, with the masked ids put back, is a contiguous run of one document.
    docs = [" " + " ".join(str(t) for sentence in doc for t in sentence) + " "
            for doc in tokenized_documents]
    for ids in original[:200]:
        first_sep = int(np.flatnonzero(ids == SEP)[0])
        segment_a = " " + " ".join(str(t) for t in ids[1:first_sep]) + " "
        assert any(segment_a in doc for doc in docs)


def test_next_sentence_labels(small, tokenized_documents):
    out, meta, data = small
    labels = data["next_sentence_label"]
    assert set(np.unique(labels)) == {0, 1}
    assert 0.45 < labels.mean() < 0.6    # 0.5, plus chunks of one sentence, always random
    assert meta["random_next"]["train"] == int(labels.sum())
    docs = [" " + " ".join(str(t) for sentence in doc for t in sentence) + " "
            for doc in tokenized_documents]
    original = restore_originals(data)
    for ids, label in zip(original[:200], labels[:200]):
        seps = np.flatnonzero(ids == SEP)
        a = " " + " ".join(map(str, ids[1:seps[0]])) + " "
        b = " " + " ".join(map(str, ids[seps[0] + 1:seps[1]])) + " "
        if label == 0:   # B is the real continuation: same document, after A
            assert any(a in doc and b in doc for doc in docs)


def test_same_seed_byte_identical_different_seed_differs(small, tmp_path):
    out, _, _ = small
    prepare(tmp_path / "again", num_shards=3)
    assert tree_digest(tmp_path / "again") == tree_digest(out)
    prepare(tmp_path / "other", num_shards=3, seed=8)
    assert ((tmp_path / "other" / "train" / "data-00000-of-00003.arrow").read_bytes()
            != (out / "train" / "data-00000-of-00003.arrow").read_bytes())


def test_phase2_seq512_80_predictions(tmp_path):
    meta = prepare(tmp_path / "wt512", seq_len=512, max_predictions=80, dupe_factor=1,
                   max_documents=6)
    data = columns(tmp_path / "wt512")
    assert data["input_ids"].shape[1] == 512 and data["masked_lm_positions"].shape[1] == 80
    counts = (data["masked_lm_positions"] != 0).sum(1)
    assert counts.max() == round(512 * 0.15) and counts.max() <= 80   # 77 for a full row
    assert data["attention_mask"].sum(1).max() == 512
    assert meta["seq_len"] == 512 and meta["max_predictions"] == 80


def test_malformed_inputs_counted(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a_empty.txt").write_bytes(b"")
    (raw / "b_blank.txt").write_bytes(b"\n  \n\n")
    (raw / "c_bytes.txt").write_bytes(b"Good line one. Good line two.\n\xff\xfe broken \xc3\n"
                                      b"Another good line here.\n")
    (raw / "d_single.txt").write_text("Only one sentence in this document.\n\n"
                                      "Also a lone sentence.\n\nTwo sentences here. And a second.\n")
    meta = prepare(tmp_path / "out", inputs=[raw, CORPUS], max_documents=10)
    skipped = meta["skipped"]
    assert skipped["empty_files"] == 2
    assert skipped["non_utf8_lines"] == 1
    assert skipped["files_with_non_utf8"] == [str(raw / "c_bytes.txt")]
    assert meta["single_sentence_documents"] == 2 and skipped["single_sentence_documents"] == 0
    assert meta["files"] == 5 and meta["documents"] == 10
    dropped = prepare(tmp_path / "dropped", inputs=[raw, CORPUS], max_documents=10,
                      drop_single_sentence_documents=True)
    assert dropped["skipped"]["single_sentence_documents"] == 2 and dropped["documents"] == 8


def test_missing_paths_named(tmp_path):
    missing = tmp_path / "no_such_file.txt"
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        prepare(tmp_path / "out", inputs=[missing])
    with pytest.raises(FileNotFoundError, match="no_such_vocab.txt"):
        prepare(tmp_path / "out", vocab=tmp_path / "no_such_vocab.txt")
    result = run_cli("--input", missing, "--vocab", VOCAB, "--out", tmp_path / "out")
    assert result.returncode == 2 and "no_such_file.txt" in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_then_overwritten(small, tmp_path):
    out = tmp_path / "out"
    prepare(out, max_documents=3, dupe_factor=1)
    before = tree_digest(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(out, max_documents=3, dupe_factor=1, seed=99)
    assert tree_digest(out) == before
    prepare(out, max_documents=3, dupe_factor=1, seed=99, overwrite=True)
    assert tree_digest(out) != before and load_meta(out)["seed"] == 99
    assert [p.name for p in tmp_path.iterdir()] == ["out"]   # no temp or old folder left


def test_crash_mid_write_leaves_no_complete_output(tmp_path):
    out = tmp_path / "out"
    args = ["--input", CORPUS, "--vocab", VOCAB, "--out", out, "--max-documents", "3",
            "--dupe-factor", "1"]
    result = run_cli(*args, env_extra={CRASH_HOOK_ENV: "train"})   # os._exit after train/
    assert result.returncode == 70, result.stderr
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].name.startswith(".out.partial-")
    assert (partial[0] / "train").is_dir() and not (partial[0] / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_pretraining_data(out)
    # the next preparation on this host removes the dead process's partial folder
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_with_overwrite_keeps_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(out, max_documents=3, dupe_factor=1)
    before = tree_digest(out)
    monkeypatch.setenv(CRASH_HOOK_ENV, "heldout:raise")
    with pytest.raises(RuntimeError, match="injected"):
        prepare(out, max_documents=3, dupe_factor=1, seed=5, overwrite=True)
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hf_labels_and_dynamic_masking(small):
    out, _, _ = small
    rows = [load_pretraining_data(out)[i] for i in range(16)]
    batch = collate(rows)
    hf = to_hf_inputs(batch)
    assert set(hf) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"}
    valid = batch["masked_lm_positions"] != 0
    assert int((hf["labels"] != -100).sum()) == int(valid.sum())
    picked = hf["labels"].gather(1, batch["masked_lm_positions"])
    assert torch.equal(picked[valid], batch["masked_lm_ids"][valid])
    fresh = DynamicMaskingCollator(out, seed=0)(rows)
    assert torch.equal((fresh["masked_lm_positions"] != 0).sum(1), valid.sum(1))
    assert not torch.equal(fresh["masked_lm_positions"], batch["masked_lm_positions"])
    originals = torch.as_tensor(restore_originals({k: v.numpy() for k, v in batch.items()}))
    remade = torch.as_tensor(restore_originals({k: v.numpy() for k, v in fresh.items()}))
    assert torch.equal(originals, remade)
    again = DynamicMaskingCollator(out, seed=0)(rows)
    assert all(torch.equal(again[k], fresh[k]) for k in COLUMNS)


def test_document_and_sentence_rules():
    documents = list(read_documents([CORPUS]))
    assert len(documents) == 60                          # one per ` = Title = ` article
    assert not any(s.startswith("=") for doc in documents for s in doc)
    assert documents[0][1] == "It is closely related to the American lobster , H. americanus ."
    assert not any("@-@" in s or "@.@" in s for doc in documents for s in doc)
    assert split_sentences('He met Dr. Smith in the U.S. Army. Then "Yes!" she said. ok.') == [
        "He met Dr. Smith in the U.S. Army.", 'Then "Yes!" she said. ok.']


def test_wordpiece_trainer_makes_usable_vocab(tmp_path):
    vocab_file = train_wordpiece([CORPUS], vocab_size=3000, out_dir=tmp_path / "tok")
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 2000 < len(tokens) <= 3000 and any(t.startswith("##") for t in tokens)
    tokenizer = load_tokenizer(tmp_path / "tok")
    pieces = tokenizer.tokenize("The European Lobster is a species of lobster.")
    assert pieces[:2] == ["the", "european"] and "[UNK]" not in pieces
    meta = prepare(tmp_path / "out", vocab=vocab_file, max_documents=3, dupe_factor=1)
    assert meta["vocab"]["size"] == len(tokens) and meta["vocab"]["cls_id"] == 2
    data = columns(tmp_path / "out")
    assert (data["input_ids"][:, 0] == 2).all() and data["input_ids"].max() < len(tokens)


def test_whole_word_masking_masks_whole_words(tmp_path):
    prepare(tmp_path / "wwm", max_documents=4, dupe_factor=1, whole_word_mask=True)
    data = columns(tmp_path / "wwm")
    vocab = VOCAB.read_text(encoding="utf-8").splitlines()
    original = restore_originals(data)
    checked = 0
    for ids, positions in zip(original, data["masked_lm_positions"]):
        masked = set(positions[positions != 0].tolist())
        for position in masked:   # a masked word piece's neighbours of the same word are masked
            if vocab[ids[position]].startswith("##"):
                assert position - 1 in masked
                checked += 1
            if position + 1 < len(ids) and vocab[ids[position + 1]].startswith("##"):
                assert position + 1 in masked
    assert checked > 10
