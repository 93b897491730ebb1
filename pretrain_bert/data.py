"""BERT pretraining instances with static masks, as google-research/bert and NVIDIA make them.

Text -> documents -> sentences is `pretrain_bert.corpus` (its docstring states the document
and sentence rules). This module tokenises the sentences and ports
`create_pretraining_data.py` (google-research/bert; NVIDIA DeepLearningExamples ships the same
file) onto token ids, draw for draw with one `random.Random(seed)`:

- documents are shuffled; each is cut into chunks of sentences filling `target_seq_length`
  (= seq_len - 3, or with probability `short_seq_prob` = 0.1 a uniform length in
  [2, seq_len - 3]); a chunk's first `a_end` sentences are segment A;
- with probability 0.5 (always, if the chunk is one sentence) segment B is a random
  stretch of another document (next_sentence_label 1) and the chunk's unused sentences are
  put back; otherwise B is the rest of the chunk (label 0, as HF `BertForPreTraining`);
- `truncate_seq_pair` trims the longer segment from a random end; the instance is
  ``[CLS] A [SEP] B [SEP]`` with token_type_ids 0 up to the first [SEP], 1 after;
- `min(max_predictions, max(1, round(len * 0.15)))` tokens (never [CLS]/[SEP]; whole words
  with `whole_word_mask`, off by default) are chosen; each becomes [MASK] with p 0.8, stays
  with p 0.1, or becomes a uniformly random vocabulary id with p 0.1 (any id, as the
  reference does); positions are sorted and 0-padded to `max_predictions`;
- the whole pass over the documents is repeated `dupe_factor` times, then all instances
  are shuffled.

One-sentence documents are kept, as in the reference: they yield A + random-B instances
and serve as random-B sources. They are counted in meta.json, and
`drop_single_sentence_documents` removes them (counted as skipped) instead.

Why static masks (masks drawn once here, `dupe_factor` different copies of each
document): the data is a pure function of (inputs, vocab, options, seed), so every rank
and every resumed run reads exactly the same examples in the same order, a run can be
repeated bit for bit, and it is what NVIDIA's phase-1/phase-2 recipe trains on. Dynamic
masking (RoBERTa) is available at load time: `DynamicMaskingCollator` restores the original
tokens from the stored positions/ids and draws new masks per batch.

Output directory layout::

    OUT/meta.json       options, vocab hash/ids, counts of documents/instances/skipped inputs
    OUT/train/          datasets.Dataset.save_to_disk, `num_shards` Arrow shards
    OUT/heldout/        same, from a `heldout_fraction` of the documents (split by document)

Columns (fixed length; int32 ids, int8 flags; loaded as int64 tensors): `input_ids`,
`token_type_ids`, `attention_mask` [seq_len, 0-padded]; `masked_lm_positions`,
`masked_lm_ids` [max_predictions, 0-padded as NVIDIA]; `next_sentence_label` (0 = real
next, 1 = random).

The output is built in a hidden sibling folder ``.OUT.partial-<host>-<pid>-*``, synced, and
renamed onto OUT only when complete, so a crash never leaves a complete-looking OUT; the next
preparation of OUT on that host deletes the partial folders of processes that are gone. An
existing OUT is refused unless `overwrite`. Test hook: the environment variable
``PRETRAIN_BERT_DATA_CRASH_AFTER=train|heldout`` kills the process (``os._exit(70)``, no
cleanup, like a SIGKILL) right after that split is written; ``train:raise`` raises instead.

CLI: ``python -m pretrain_bert.data --input PATH... --vocab VOCAB --out DIR --seq-len 128
--max-predictions 20 --dupe-factor 5 --seed 12345``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from pretrain_bert.corpus import UNK_MARKER, CorpusStats, read_documents
from pretrain_bert.instances import InstanceConfig, create_instances, vocab_ids
from pretrain_bert.pretraining_dataset import (  # noqa: F401  (the loading API, re-exported)
    COLUMNS, FORMAT, SPLITS, DynamicMaskingCollator, collate, load_meta, load_pretraining_data,
    masked_to_labels, remask, to_hf_inputs)
from pretrain_bert.runtime import fsync_dir, fsync_tree
from pretrain_bert.tokenization import load_tokenizer, vocab_sha256

CRASH_HOOK_ENV = "PRETRAIN_BERT_DATA_CRASH_AFTER"


# ---------------------------------------------------------------- tokenisation

def tokenize_documents(documents: Iterable[list[str]], tokenizer,
                       progress: bool = False) -> tuple[list[list[list[int]]], int]:
    """Sentences -> token ids; returns (documents, number of documents that came out empty).

    Special-token strings in the text (``[SEP]``, ``[MASK]``...) are tokenised as text, as
    by the reference tokenizer; only the corpus marker ``<unk>`` becomes [UNK].
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    unk = tokenizer.unk_token_id
    tokenized, empty = [], 0
    for document in tqdm(documents, desc="tokenise", unit="doc", disable=not progress):
        pieces, owners = [], []
        for index, sentence in enumerate(document):
            for part_index, part in enumerate(sentence.split(UNK_MARKER)):
                pieces.append(part)
                owners.append((index, part_index > 0))
        sentences: list[list[int]] = [[] for _ in document]
        for (index, after_unk), encoding in zip(owners, backend.encode_batch(pieces, add_special_tokens=False)):
            if after_unk:
                sentences[index].append(unk)
            sentences[index].extend(encoding.ids)
        sentences = [ids for ids in sentences if ids]
        if sentences:
            tokenized.append(sentences)
        else:
            empty += 1
    return tokenized, empty


# ---------------------------------------------------------------- create_pretraining_data.py
# ---------------------------------------------------------------- writing

def instances_to_columns(instances: Sequence[tuple], config: InstanceConfig) -> dict[str, np.ndarray]:
    n, seq_len, max_pred = len(instances), config.seq_len, config.max_predictions
    columns = {
        "input_ids": np.zeros((n, seq_len), np.int32),
        "token_type_ids": np.zeros((n, seq_len), np.int8),
        "attention_mask": np.zeros((n, seq_len), np.int8),
        "masked_lm_positions": np.zeros((n, max_pred), np.int32),
        "masked_lm_ids": np.zeros((n, max_pred), np.int32),
        "next_sentence_label": np.zeros((n,), np.int8),
    }
    for row, (tokens, segment_ids, positions, labels, is_random_next) in enumerate(instances):
        columns["input_ids"][row, :len(tokens)] = tokens
        columns["token_type_ids"][row, :len(segment_ids)] = segment_ids
        columns["attention_mask"][row, :len(tokens)] = 1
        columns["masked_lm_positions"][row, :len(positions)] = positions
        columns["masked_lm_ids"][row, :len(labels)] = labels
        columns["next_sentence_label"][row] = int(is_random_next)
    return columns


def _features(config: InstanceConfig):
    import datasets

    def fixed(dtype: str, length: int):
        return datasets.Sequence(datasets.Value(dtype), length=length)
    return datasets.Features({
        "input_ids": fixed("int32", config.seq_len),
        "token_type_ids": fixed("int8", config.seq_len),
        "attention_mask": fixed("int8", config.seq_len),
        "masked_lm_positions": fixed("int32", config.max_predictions),
        "masked_lm_ids": fixed("int32", config.max_predictions),
        "next_sentence_label": datasets.Value("int8"),
    })


def save_split(columns: Mapping[str, np.ndarray], config: InstanceConfig, path: Path,
               num_shards: int, fingerprint: str) -> int:
    """Save as sharded Arrow with a fixed fingerprint (a random one would break byte-identity)."""
    import datasets

    table = datasets.Dataset.from_dict(dict(columns), features=_features(config))
    dataset = datasets.Dataset(table.data, info=table.info, fingerprint=fingerprint)
    shards = max(1, min(num_shards, len(dataset)))
    from datasets.utils import logging as ds_logging

    shown = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # our own bars say what preparation does
    try:
        dataset.save_to_disk(str(path), num_shards=shards)
    finally:
        if shown:
            ds_logging.enable_progress_bar()
    return shards


def _maybe_crash(stage: str) -> None:
    hook = os.environ.get(CRASH_HOOK_ENV, "")
    if hook == stage:
        os._exit(70)
    if hook == f"{stage}:raise":
        raise RuntimeError(f"{CRASH_HOOK_ENV}={hook}: injected failure after {stage!r}")


def _export_hf_dataset(name: str, config_name: str | None, split: str, column: str,
                       row_is_document: bool, path: Path) -> Path:
    """Write a `datasets` dataset's text column to a file `read_documents` understands.

    Needs the network or the HF cache; not used by the tests. With `row_is_document` each row
    is followed by a blank line (Wikipedia: one article per row); without it rows are lines
    (the HF `wikitext` datasets, whose ` = Title = ` rows then start documents).
    """
    import datasets

    rows = datasets.load_dataset(name, config_name, split=split)
    with open(path, "w", encoding="utf-8") as handle:
        for text in rows[column]:
            handle.write(text.rstrip("\n") + ("\n\n" if row_is_document else "\n"))
    return path


def _split_documents(documents: list, fraction: float) -> tuple[list, list]:
    """(train, heldout): the first round(n * fraction) shuffled documents, at least one, are
    held out when fraction > 0 and at least one document is left for training."""
    if fraction == 0.0 or len(documents) < 2:
        return documents, []
    held = min(len(documents) - 1, max(1, round(len(documents) * fraction)))
    return documents[held:], documents[:held]


def build_splits(inputs: Sequence[str | Path], tokenizer, config: InstanceConfig,
                 progress: bool = False) -> tuple[dict[str, list[tuple]], dict]:
    """Read, tokenise, shuffle, split by document and create instances; returns counts too.

    With heldout_fraction 0 the train instances are drawn exactly as the reference draws them
    (one `random.Random(seed)` for the document shuffle and all instances).
    """
    stats = CorpusStats()
    documents, empty = tokenize_documents(
        read_documents(inputs, stats, config.detokenize_wikitext, config.max_documents),
        tokenizer, progress)
    single = sum(len(document) == 1 for document in documents)
    if config.drop_single_sentence_documents:
        documents = [document for document in documents if len(document) > 1]
    if not documents:
        raise ValueError(f"no usable documents in {[str(p) for p in inputs]}: "
                         f"{stats.files} files, {stats.empty_files} empty, "
                         f"{stats.non_utf8_lines} non-UTF-8 lines, {empty} tokenised to nothing")
    vocab = vocab_ids(tokenizer)
    rng = random.Random(config.seed)
    rng.shuffle(documents)
    train_docs, heldout_docs = _split_documents(documents, config.heldout_fraction)
    splits = {
        "train": create_instances(train_docs, config, vocab, rng, config.dupe_factor,
                                  "train instances", progress),
        "heldout": create_instances(heldout_docs, config, vocab,
                                    random.Random(f"heldout/{config.seed}"),
                                    config.heldout_dupe_factor, "heldout instances", progress),
    }
    counts = {
        "files": stats.files,
        "documents": len(documents),
        "sentences": sum(len(document) for document in documents),
        "tokens": sum(len(sentence) for document in documents for sentence in document),
        "single_sentence_documents": single,
        "split_documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
        "skipped": {
            "empty_files": stats.empty_files,
            "non_utf8_lines": stats.non_utf8_lines,
            "files_with_non_utf8": stats.files_with_non_utf8,
            "documents_without_tokens": empty,
            "single_sentence_documents": single if config.drop_single_sentence_documents else 0,
        },
    }
    return splits, counts


def prepare_pretraining_data(inputs: Sequence[str | Path], vocab: str | Path, out: str | Path,
                             config: InstanceConfig = InstanceConfig(), num_shards: int = 1,
                             overwrite: bool = False, progress: bool = False) -> dict:
    """Write OUT/{train,heldout}/ and OUT/meta.json atomically; return the meta dict."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} already exists; pass --overwrite "
                              "(overwrite=True) to replace it")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    tokenizer = load_tokenizer(vocab)
    splits, counts = build_splits(inputs, tokenizer, config, progress)
    meta = {
        "format": FORMAT,
        "config": dataclasses.asdict(config),
        "inputs": [str(path) for path in inputs],
        "vocab": {"path": str(vocab), "sha256": vocab_sha256(tokenizer), "size": len(tokenizer),
                  "pad_id": tokenizer.pad_token_id, "unk_id": tokenizer.unk_token_id,
                  "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id,
                  "mask_id": tokenizer.mask_token_id},
        "seq_len": config.seq_len,
        "max_predictions": config.max_predictions,
        "seed": config.seed,
        "columns": {name: feature for name, feature in _features(config).to_dict().items()},
        **counts,
        "instances": {},
        "random_next": {},
        "num_shards": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp = out.parent / f".{out.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()                               # (mkdtemp would make OUT mode 0700)
    try:
        fingerprint_base = json.dumps(meta, sort_keys=True)
        for split, instances in splits.items():
            columns = instances_to_columns(instances, config)
            fingerprint = hashlib.sha256(f"{fingerprint_base}/{split}".encode()).hexdigest()[:16]
            meta["num_shards"][split] = save_split(columns, config, tmp / split, num_shards,
                                                   fingerprint)
            meta["instances"][split] = len(instances)
            meta["random_next"][split] = int(columns["next_sentence_label"].sum())
            _maybe_crash(split)
        with open(tmp / "meta.json", "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
            handle.write("\n")
        fsync_tree(tmp)  # on disk before the rename makes it look complete
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _remove_dead_partials(out: Path) -> None:
    """Delete ``.OUT.partial-<this host>-<pid>-*`` folders whose process is gone (a killed run's)."""
    for partial in out.parent.glob(f".{glob.escape(out.name)}.partial-{glob.escape(socket.gethostname())}-*"):
        pid = partial.name.rsplit("-", 2)[-2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"output {str(out)!r} appeared while preparing; not replacing it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = InstanceConfig()
    parser = argparse.ArgumentParser(
        prog="python -m pretrain_bert.data",
        description="BERT pretraining data with static masks (create_pretraining_data.py recipe).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="text files or folders of *.txt")
    source.add_argument("--hf-dataset", help="a `datasets` dataset name (needs network or cache)")
    parser.add_argument("--hf-config", default=None)
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--hf-text-column", default="text")
    parser.add_argument("--hf-rows-are-lines", action="store_true",
                        help="rows are lines of one text (wikitext), not one document each")
    parser.add_argument("--vocab", required=True, help="vocab.txt or a tokenizer folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--max-predictions", type=int, default=defaults.max_predictions)
    parser.add_argument("--dupe-factor", type=int, default=defaults.dupe_factor)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--masked-lm-prob", type=float, default=defaults.masked_lm_prob)
    parser.add_argument("--short-seq-prob", type=float, default=defaults.short_seq_prob)
    parser.add_argument("--whole-word-mask", action="store_true")
    parser.add_argument("--heldout-fraction", type=float, default=defaults.heldout_fraction)
    parser.add_argument("--heldout-dupe-factor", type=int, default=defaults.heldout_dupe_factor)
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--drop-single-sentence-documents", action="store_true")
    parser.add_argument("--no-wikitext-detokenize", action="store_true")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = InstanceConfig(
        seq_len=args.seq_len, max_predictions=args.max_predictions, dupe_factor=args.dupe_factor,
        seed=args.seed, masked_lm_prob=args.masked_lm_prob, short_seq_prob=args.short_seq_prob,
        whole_word_mask=args.whole_word_mask, heldout_fraction=args.heldout_fraction,
        heldout_dupe_factor=args.heldout_dupe_factor, max_documents=args.max_documents,
        drop_single_sentence_documents=args.drop_single_sentence_documents,
        detokenize_wikitext=not args.no_wikitext_detokenize)
    if args.no_progress:
        import datasets
        datasets.disable_progress_bars()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        inputs = args.input or [_export_hf_dataset(
            args.hf_dataset, args.hf_config, args.hf_split, args.hf_text_column,
            not args.hf_rows_are_lines, Path(scratch) / "hf_dataset.txt")]
        meta = prepare_pretraining_data(inputs, args.vocab, args.out, config, args.num_shards,
                                        args.overwrite, progress=not args.no_progress)
    print(f"wrote {args.out}: {meta['documents']} documents, instances {meta['instances']}, "
          f"skipped {meta['skipped']} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
