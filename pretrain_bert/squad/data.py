"""SQuAD v1.1 for BERT fine-tuning: examples, windowed features, n-best post-processing.

The approach of HF `examples/pytorch/question-answering` (`run_qa.py`, `utils_qa.py`), kept apart
from the training loop:

- examples: a local SQuAD v1.1 JSON file, or a `datasets` hub name such as "squad";
- features: question + context through a fast BERT tokenizer
  (:func:`pretrain_bert.tokenization.load_tokenizer`); a context longer than one window is
  split into overlapping windows (`doc_stride` tokens shared) with character offsets; training
  windows carry the answer's token span, or [CLS] for both ends when the window does not hold the
  whole answer; eval windows carry their example id and offsets (None off the context);
- post-processing: the n-best (start, end) pairs over all windows of an example, scored
  start + end logit; the answer is `context[start_char:end_char]`, an exact substring.

Questions are cut to `max_query_length` tokens first, as in the original BERT `run_squad.py`
(HF's `run_qa.py` does not): the cut is at a WordPiece boundary of the original string.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pretrain_bert.runtime import write_json_atomic
from pretrain_bert.squad.metric import SquadFormatError, check_predictions, iter_questions, load_json, require

logger = logging.getLogger(__name__)

MAX_SEQ_LENGTH = 384
DOC_STRIDE = 128
MAX_QUERY_LENGTH = 64
N_BEST_SIZE = 20
MAX_ANSWER_LENGTH = 30
MODEL_INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


@dataclass(frozen=True)
class SquadExample:
    id: str
    title: str
    question: str
    context: str
    answer_texts: tuple[str, ...]
    answer_starts: tuple[int, ...]     # character offsets into `context`


class LoadedExamples(NamedTuple):
    examples: list[SquadExample]
    skipped: int                       # training questions whose answer is not at answer_start


# ----------------------------------------------------------------------------- examples

def _make_example(qid, title, question, context, texts, starts, *, training: bool,
                  where: str) -> SquadExample | None:
    """A checked example; None for a training question whose first answer is not at its start."""
    if not isinstance(context, str) or not isinstance(question, str):
        raise SquadFormatError(f"{where}: 'context' and 'question' should be strings")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise SquadFormatError(f"{where}: answer text should be a string and answer_start an "
                                   f"int, got {text!r:.40} at {start!r}")
    if training:   # only the first answer is a training target (v1.1 train has exactly one)
        if not texts:
            return None
        if context[starts[0]:starts[0] + len(texts[0])] != texts[0] or not texts[0]:
            return None
    return SquadExample(str(qid), str(title), question, context, tuple(texts), tuple(starts))


def _collect(rows, *, training: bool, strict: bool, source: str) -> LoadedExamples:
    """Build examples from `(where, fields)` rows, counting (or, strict, raising on) bad answers."""
    examples, skipped_ids, seen = [], [], {}
    for where, fields in rows:
        qid = str(fields["qid"])
        if qid in seen:  # predictions are keyed by id: a second question would silently share the first's
            raise SquadFormatError(f"{where}: question id {qid!r} is used twice (first at {seen[qid]}); "
                                   "every question needs its own id")
        seen[qid] = where
        example = _make_example(**fields, training=training, where=where)
        if example is None:
            if strict:
                raise SquadFormatError(
                    f"{where}: answer {fields['texts'][:1]!r} is not found at answer_start "
                    f"{fields['starts'][:1]} of the context")
            skipped_ids.append(fields["qid"])
        else:
            examples.append(example)
    if skipped_ids:
        logger.warning("%s: skipped %d training questions whose answer text is not at answer_start "
                       "(first ids: %s)", source, len(skipped_ids), ", ".join(skipped_ids[:5]))
    return LoadedExamples(examples, len(skipped_ids))


def _file_rows(path: str, dataset):
    for title, paragraph, qa in iter_questions(dataset, path):
        loc = f"article {title!r} question {qa['id']!r}"
        texts, starts = [], []
        for i, answer in enumerate(qa["answers"]):
            texts.append(require(answer, "text", f"{loc} answer {i}", path))
            starts.append(require(answer, "answer_start", f"{loc} answer {i}", path))
        yield f"{path}: {loc}", dict(
            qid=qa["id"], title=title, texts=texts, starts=starts,
            question=require(qa, "question", loc, path), context=require(paragraph, "context", loc, path))


def _hub_rows(name: str, split: str, dataset):
    for row in dataset:
        yield f"{name}[{split}] question {row['id']!r}", dict(
            qid=row["id"], title=row.get("title", ""), question=row["question"],
            context=row["context"], texts=list(row["answers"]["text"]),
            starts=list(row["answers"]["answer_start"]))


def load_examples(source: str | os.PathLike, split: str = "validation", *, training: bool,
                  strict: bool = False) -> LoadedExamples:
    """SQuAD v1.1 examples from a local JSON file, or from `datasets.load_dataset(source, split)`.

    A missing key raises SquadFormatError (a ValueError) naming the file, article, question id
    and key. A training question whose answer text is not at its answer_start is skipped and
    counted in `.skipped` (logged), or raises with `strict=True`. Eval answers are not checked
    against answer_start: only their texts are scored.
    """
    path = Path(source)
    if path.is_file() or path.suffix == ".json":
        dataset = load_json(path, "a SQuAD v1.1 dataset {\"version\", \"data\": [...]}")
        return _collect(_file_rows(str(path), dataset), training=training, strict=strict,
                        source=str(path))
    import datasets

    hub = datasets.load_dataset(str(source), split=split)
    return _collect(_hub_rows(str(source), split, hub), training=training, strict=strict,
                    source=f"{source}[{split}]")


# ----------------------------------------------------------------------------- features

def truncate_question(question: str, tokenizer, max_query_length: int = MAX_QUERY_LENGTH) -> str:
    """`question` without leading spaces, cut after its `max_query_length`-th WordPiece token."""
    question = question.lstrip()
    offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_query_length:
        return question
    # WordPiece matches greedily from the left, so a prefix ending on a piece boundary
    # tokenises to the same first pieces.
    return question[:offsets[max_query_length - 1][1]]


def token_span(offsets: Sequence, start_char: int, end_char: int) -> tuple[int, int] | None:
    """The shortest run of context tokens covering characters [start_char, end_char).

    `offsets[i]` is token i's (start, end) characters, or None off the context. Returns None when
    the window's context does not hold the whole span.
    """
    context = [i for i, off in enumerate(offsets) if off is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return (start, end) if start <= end else None


def _windows(examples: Sequence[SquadExample], tokenizer, max_seq_length: int, doc_stride: int,
             max_query_length: int):
    """Tokenise question + context into overlapping windows; offsets kept for the context only."""
    questions = [truncate_question(ex.question, tokenizer, max_query_length) for ex in examples]
    encoded = tokenizer(
        questions, [ex.context for ex in examples], truncation="only_second",
        max_length=max_seq_length, stride=doc_stride, return_overflowing_tokens=True,
        return_offsets_mapping=True, padding="max_length")
    context_offsets = []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        sequence_ids = encoded.sequence_ids(i)
        context_offsets.append([tuple(off) if sequence_ids[k] == 1 else None
                                for k, off in enumerate(offsets)])
    return encoded, list(encoded["overflow_to_sample_mapping"]), context_offsets


def prepare_train_features(examples: Sequence[SquadExample], tokenizer, *,
                           max_seq_length: int = MAX_SEQ_LENGTH, doc_stride: int = DOC_STRIDE,
                           max_query_length: int = MAX_QUERY_LENGTH) -> dict[str, list]:
    """Training windows: model inputs plus `start_positions`/`end_positions` (CLS if absent).

    Each example's first answer is the target. Also returns `example_index` per window.
    """
    encoded, sample_map, context_offsets = _windows(
        examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    starts, ends = [], []
    for i, offsets in enumerate(context_offsets):
        example = examples[sample_map[i]]
        start_char = example.answer_starts[0]
        span = token_span(offsets, start_char, start_char + len(example.answer_texts[0]))
        cls_index = encoded["input_ids"][i].index(tokenizer.cls_token_id)
        start, end = span if span is not None else (cls_index, cls_index)
        starts.append(start)
        ends.append(end)
    features = {key: encoded[key] for key in MODEL_INPUT_KEYS}
    features.update(start_positions=starts, end_positions=ends, example_index=sample_map)
    return features


def prepare_eval_features(examples: Sequence[SquadExample], tokenizer, *,
                          max_seq_length: int = MAX_SEQ_LENGTH, doc_stride: int = DOC_STRIDE,
                          max_query_length: int = MAX_QUERY_LENGTH) -> dict[str, list]:
    """Eval windows: model inputs plus `example_id` and `offset_mapping` (None off the context)."""
    encoded, sample_map, context_offsets = _windows(
        examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    features = {key: encoded[key] for key in MODEL_INPUT_KEYS}
    features.update(example_id=[examples[i].id for i in sample_map], offset_mapping=context_offsets,
                    example_index=sample_map)
    return features


def features_to_tensors(features: dict[str, list], keys: Sequence[str] | None = None) -> dict:
    """The integer columns of `features` (model inputs, positions) as int64 torch tensors."""
    import torch

    if keys is None:
        keys = [k for k in (*MODEL_INPUT_KEYS, "start_positions", "end_positions") if k in features]
    return {key: torch.tensor(features[key], dtype=torch.long) for key in keys}


# ----------------------------------------------------------------------------- post-processing

class SpanCandidate(NamedTuple):
    text: str
    start_char: int
    end_char: int
    score: float          # start_logit + end_logit
    start_logit: float
    end_logit: float


def _window_candidates(context: str, offsets: Sequence, start_logits: np.ndarray,
                       end_logits: np.ndarray, n_best_size: int, max_answer_length: int):
    """Valid (start <= end, in context, not too long) pairs among one window's top logits."""
    top_starts = np.argsort(start_logits)[::-1][:n_best_size]
    top_ends = np.argsort(end_logits)[::-1][:n_best_size]
    for start in top_starts:
        for end in top_ends:
            if start >= len(offsets) or end >= len(offsets):
                continue
            if offsets[start] is None or offsets[end] is None:
                continue
            if end < start or end - start + 1 > max_answer_length:
                continue
            start_char, end_char = offsets[start][0], offsets[end][1]
            s, e = float(start_logits[start]), float(end_logits[end])
            yield SpanCandidate(context[start_char:end_char], start_char, end_char, s + e, s, e)


def nbest_predictions(examples: Sequence[SquadExample], features: dict[str, list], start_logits,
                      end_logits, *, n_best_size: int = N_BEST_SIZE,
                      max_answer_length: int = MAX_ANSWER_LENGTH) -> dict[str, list[SpanCandidate]]:
    """{example id: its best `n_best_size` spans over all its windows, best first}.

    `features` is `prepare_eval_features` output; the logits are [num_windows, seq_len] arrays in
    the same window order.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    num_windows = len(features["example_id"])
    if start_logits.shape[0] != num_windows or end_logits.shape[0] != num_windows:
        raise ValueError(f"logits have {start_logits.shape[0]} / {end_logits.shape[0]} rows, "
                         f"expected one per window ({num_windows})")
    by_id = {example.id: example for example in examples}
    candidates: dict[str, list[SpanCandidate]] = {example.id: [] for example in examples}
    for i, example_id in enumerate(features["example_id"]):
        if example_id not in by_id:
            raise ValueError(f"window {i} belongs to example {example_id!r}, not among the examples")
        candidates[example_id].extend(_window_candidates(
            by_id[example_id].context, features["offset_mapping"][i], start_logits[i],
            end_logits[i], n_best_size, max_answer_length))
    return {qid: sorted(spans, key=lambda c: c.score, reverse=True)[:n_best_size]
            for qid, spans in candidates.items()}


def postprocess_predictions(examples: Sequence[SquadExample], features: dict[str, list],
                            start_logits, end_logits, *, n_best_size: int = N_BEST_SIZE,
                            max_answer_length: int = MAX_ANSWER_LENGTH) -> dict[str, str]:
    """{example id: best answer text} in the official predictions.json format ("" if no span)."""
    nbest = nbest_predictions(examples, features, start_logits, end_logits,
                              n_best_size=n_best_size, max_answer_length=max_answer_length)
    return {qid: spans[0].text if spans else "" for qid, spans in nbest.items()}


def write_predictions(path: str | os.PathLike, predictions: dict[str, str]) -> None:
    """Write {id: answer} as predictions.json, atomically (:func:`pretrain_bert.runtime.write_json_atomic`)."""
    write_json_atomic(path, check_predictions(predictions, str(path)))
