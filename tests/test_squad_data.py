"""SQuAD examples, windowed features and post-processing on the real subsets with the real vocab."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from pretrain_bert.squad.data import (
    DOC_STRIDE, MAX_QUERY_LENGTH, MAX_SEQ_LENGTH, SquadExample, features_to_tensors, load_examples,
    postprocess_predictions, prepare_eval_features, prepare_train_features, token_span, write_predictions,
)
from pretrain_bert.squad.metric import SquadFormatError, evaluate, evaluate_files
from pretrain_bert.tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT / "data" / "squad"
VOCAB = ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt"  # shipped with the project


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def train(tokenizer):
    loaded = load_examples(SQUAD / "train-v1.1-subset.json", training=True)
    assert (len(loaded.examples), loaded.skipped) == (3807, 0)
    # Eval windows of the same examples are the same windows, with offsets to decode spans.
    return (loaded.examples, prepare_train_features(loaded.examples, tokenizer),
            prepare_eval_features(loaded.examples, tokenizer))


@pytest.fixture(scope="module")
def dev(tokenizer):
    loaded = load_examples(SQUAD / "dev-v1.1-subset.json", training=False)
    assert (len(loaded.examples), loaded.skipped) == (359, 0)
    return loaded.examples, prepare_eval_features(loaded.examples, tokenizer)


def gold_char_span(example):
    return example.answer_starts[0], example.answer_starts[0] + len(example.answer_texts[0])


def test_tokenizer_from_vocab_file_or_folder(tokenizer, tmp_path):
    shutil.copy(VOCAB, tmp_path / "vocab.txt")
    from_folder = load_tokenizer(tmp_path)
    text = "The Methodist Church's 1968 union"
    assert tokenizer(text)["input_ids"] == from_folder(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == [
        "[CLS]", "the", "methodist", "church", "'", "s", "1968", "union", "[SEP]"]
    with pytest.raises(FileNotFoundError, match="no-such-vocab"):
        load_tokenizer(tmp_path / "no-such-vocab.txt")


def test_train_spans_decode_to_gold_answer_or_cls(train):
    examples, features, windows = train
    assert features["input_ids"] == windows["input_ids"]
    exact = answered = 0
    for i, (start, end) in enumerate(zip(features["start_positions"], features["end_positions"])):
        example = examples[features["example_index"][i]]
        offsets = windows["offset_mapping"][i]
        start_char, end_char = gold_char_span(example)
        context_chars = [off for off in offsets if off is not None]
        if (start, end) == (0, 0):
            assert context_chars[0][0] > start_char or context_chars[-1][1] < end_char
            continue
        answered += 1
        assert offsets[start] is not None and offsets[end] is not None and start <= end
        # the shortest token run covering the answer characters
        assert offsets[start][0] <= start_char < offsets[start][1]
        assert offsets[end][0] < end_char <= offsets[end][1]
        decoded = example.context[offsets[start][0]:offsets[end][1]]
        assert example.answer_texts[0] in decoded
        exact += decoded == example.answer_texts[0]
    assert answered >= len(examples)          # every example answered in at least one window
    assert exact / answered > 0.99, f"{exact}/{answered} spans decode to exactly the gold text"


def test_doc_stride_windows_cover_long_contexts(train, tokenizer):
    examples, _, windows = train
    by_example: dict[int, list[int]] = {}
    for i, index in enumerate(windows["example_index"]):
        by_example.setdefault(index, []).append(i)
    long_ones = {index: rows for index, rows in by_example.items() if len(rows) > 1}
    assert len(long_ones) >= 20 and max(map(len, long_ones.values())) >= 3
    for index, rows in long_ones.items():
        context = examples[index].context
        all_offsets = [tuple(off) for off in tokenizer(
            context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        spans = []
        for i in rows:
            assert sum(windows["attention_mask"][i]) <= MAX_SEQ_LENGTH
            window = [off for off in windows["offset_mapping"][i] if off is not None]
            first = all_offsets.index(window[0])
            assert all_offsets[first:first + len(window)] == window   # a contiguous slice
            spans.append((first, first + len(window)))
        assert spans[0][0] == 0 and spans[-1][1] == len(all_offsets)
        for (_, prev_end), (next_start, _) in zip(spans, spans[1:]):
            assert prev_end - next_start == DOC_STRIDE               # consecutive windows overlap


def test_long_question_truncated_to_max_query_length(tokenizer):
    question = " ".join(f"word{i}" for i in range(200)) + "?"
    example = SquadExample("q", "t", question, "A short context.", ("short",), (2,))
    features = prepare_eval_features([example], tokenizer)
    ids = features["input_ids"][0]
    question_ids = ids[1:ids.index(tokenizer.sep_token_id)]
    full = tokenizer(question, add_special_tokens=False)["input_ids"]
    assert len(full) > MAX_QUERY_LENGTH and question_ids == full[:MAX_QUERY_LENGTH]


def gold_logits(examples, features):
    """Logits with the max on the first gold answer's tokens in every window that holds it."""
    start = np.zeros((len(features["input_ids"]), MAX_SEQ_LENGTH), dtype=np.float32)
    end = np.zeros_like(start)
    spans = {}
    for i, offsets in enumerate(features["offset_mapping"]):
        example = examples[features["example_index"][i]]
        span = token_span(offsets, *gold_char_span(example))
        if span is not None:
            start[i, span[0]], end[i, span[1]] = 10.0, 10.0
            spans[example.id] = (offsets[span[0]][0], offsets[span[1]][1])
    return start, end, spans


def test_predictions_are_exact_context_substrings(dev, tmp_path):
    examples, features = dev
    start, end, spans = gold_logits(examples, features)
    predictions = postprocess_predictions(examples, features, start, end)
    assert set(predictions) == {example.id for example in examples} == set(spans)
    for example in examples:
        start_char, end_char = spans[example.id]
        assert predictions[example.id] == example.context[start_char:end_char]

    result = evaluate(json.loads((SQUAD / "dev-v1.1-subset.json").read_text()), predictions)
    print(f"gold-logit predictions on the dev subset: {result}")
    assert result["missing"] == 0 and result["exact_match"] >= 95.0

    path = tmp_path / "predictions.json"
    write_predictions(path, predictions)
    assert json.loads(path.read_text()) == predictions
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.json"]      # no temporary left
    assert evaluate_files(SQUAD / "dev-v1.1-subset.json", path) == result


def test_postprocess_skips_invalid_spans(tokenizer):
    context = "alpha beta gamma delta " + " ".join(f"w{i}" for i in range(40))
    example = SquadExample("q", "t", "Which?", context, ("gamma",), (11,))
    features = prepare_eval_features([example], tokenizer)
    offsets = features["offset_mapping"][0]
    context_tokens = [i for i, off in enumerate(offsets) if off is not None]
    gamma = next(i for i in context_tokens if context[offsets[i][0]:offsets[i][1]] == "gamma")
    start, end = np.full((1, MAX_SEQ_LENGTH), -100.0), np.full((1, MAX_SEQ_LENGTH), -100.0)
    start[0, 0] = end[0, 0] = 100.0                              # [CLS]: not a context token
    start[0, gamma + 1], end[0, context_tokens[-1]] = 50.0, 50.0  # longer than 30 tokens
    end[0, gamma - 1] = 40.0                                     # ends before every high start
    start[0, gamma], end[0, gamma] = 5.0, 5.0                    # the only valid pair
    assert postprocess_predictions([example], features, start, end) == {"q": "gamma"}
    with pytest.raises(ValueError, match="one per window"):
        postprocess_predictions([example], features, start[:0], end)


def test_write_predictions_rejects_non_strings(tmp_path):
    with pytest.raises(SquadFormatError, match="'q1' should be a string"):
        write_predictions(tmp_path / "p.json", {"q1": 3})
    assert not list(tmp_path.iterdir())


def test_features_to_tensors(tokenizer):
    example = SquadExample("q", "t", "Which?", "alpha beta gamma", ("beta",), (6,))
    tensors = features_to_tensors(prepare_train_features([example], tokenizer))
    assert tensors["input_ids"].shape == (1, MAX_SEQ_LENGTH)
    assert (tensors["start_positions"].item(), tensors["end_positions"].item()) == (5, 5)


def squad_file(tmp_path, qa_fields=None, paragraph_fields=None, answer=None):
    qa = {"id": "q-bad", "question": "Where?", "answers": [answer or {"text": "Paris", "answer_start": 3}]}
    paragraph = {"context": "In Paris.", "qas": [qa]}
    for record, fields in ((qa, qa_fields), (paragraph, paragraph_fields)):
        for key, value in (fields or {}).items():
            if value is None:
                del record[key]
            else:
                record[key] = value
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Capitals", "paragraphs": [paragraph]}]}))
    return path


@pytest.mark.parametrize("kwargs, key", [
    ({"paragraph_fields": {"context": None}}, "'context'"),
    ({"qa_fields": {"question": None}}, "'question'"),
    ({"answer": {"text": "Paris"}}, "'answer_start'"),
    ({"qa_fields": {"answers": None}}, "'answers'"),
])
def test_missing_keys_name_file_article_question_and_key(tmp_path, kwargs, key):
    path = squad_file(tmp_path, **kwargs)
    with pytest.raises(ValueError) as err:
        load_examples(path, training=True)
    message = str(err.value)
    assert all(part in message for part in (str(path), "'Capitals'", "'q-bad'", key)), message


def test_answer_not_at_answer_start_is_counted_skip_or_strict_error(tmp_path, caplog):
    path = squad_file(tmp_path, answer={"text": "Paris", "answer_start": 0})
    with caplog.at_level(logging.WARNING):
        loaded = load_examples(path, training=True)
    assert (loaded.examples, loaded.skipped) == ([], 1)
    assert "skipped 1 training questions" in caplog.text and "q-bad" in caplog.text
    with pytest.raises(ValueError, match=r"q-bad.*not found at answer_start \[0\]"):
        load_examples(path, training=True, strict=True)
    # eval examples keep it: only the answer texts are scored
    assert load_examples(path, training=False).skipped == 0

    with pytest.raises(SquadFormatError, match="answer_start an int"):
        load_examples(squad_file(tmp_path, answer={"text": "Paris", "answer_start": "3"}), training=True)


def test_duplicate_question_ids_are_refused(tmp_path):
    path = squad_file(tmp_path)
    dataset = json.loads(path.read_text())
    paragraph = dataset["data"][0]["paragraphs"][0]
    paragraph["qas"].append(dict(paragraph["qas"][0], question="Which city?"))
    path.write_text(json.dumps(dataset))
    for training in (True, False):
        with pytest.raises(SquadFormatError, match=r"question id 'q-bad' is used twice \(first at .*squad.json"):
            load_examples(path, training=training)
