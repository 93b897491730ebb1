"""The official SQuAD v1.1 evaluation: exact match and token F1, max over the gold answers.

Same semantics as the official `evaluate-v1.1.py` (Rajpurkar et al., 2016):

- `normalize_answer`: lower-case, drop `string.punctuation`, drop the articles a/an/the as whole
  words, collapse whitespace, in that order;
- exact match: the normalised strings are equal; F1: `Counter` overlap of the normalised tokens;
- each question scores the max over its gold answers; a question with no prediction scores 0
  (the official script says so on stderr);
- totals are `100 * sum / number of questions`, summed in file order, so the floats match the
  official ones to the last digit.

CLI, printing the same JSON as the official script:

    python -m pretrain_bert.squad.metric dev-v1.1.json predictions.json [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Iterator, Mapping

from pretrain_bert.runtime import write_json_atomic

EXPECTED_VERSION = "1.1"
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class SquadFormatError(ValueError):
    """A file that is not valid JSON, not SQuAD-format, or not a predictions dict."""


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove articles, collapse whitespace (official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def load_json(path: str | os.PathLike, what: str):
    """Parse `path` as JSON; errors name the file and say it should be `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise SquadFormatError(f"{path}: not valid JSON ({err}); expected {what}") from err
    except UnicodeDecodeError as err:
        raise SquadFormatError(f"{path}: not UTF-8 text ({err}); expected {what}") from err


def require(record, key: str, where: str, source: str):
    """`record[key]`, or a SquadFormatError naming the file, the record and the missing key."""
    if not isinstance(record, Mapping):
        raise SquadFormatError(f"{source}: {where} should be a JSON object, got {type(record).__name__}")
    if key not in record:
        raise SquadFormatError(f"{source}: {where} has no {key!r} key (SQuAD format expected)")
    return record[key]


def squad_articles(dataset, source: str = "<dataset>") -> list:
    """The article list from a whole SQuAD file (`{"version", "data"}`) or the list itself."""
    if isinstance(dataset, Mapping):
        dataset = require(dataset, "data", "the top level", source)
    if not isinstance(dataset, list):
        raise SquadFormatError(
            f"{source}: SQuAD 'data' should be a list of articles, got {type(dataset).__name__}")
    return dataset


def iter_questions(dataset, source: str = "<dataset>") -> Iterator[tuple[str, dict, dict]]:
    """Yield `(title, paragraph, qa)` in file order, checking the keys every consumer needs."""
    for a, article in enumerate(squad_articles(dataset, source)):
        title = article.get("title", f"#{a}") if isinstance(article, Mapping) else f"#{a}"
        for p, paragraph in enumerate(require(article, "paragraphs", f"article {title!r}", source)):
            where = f"article {title!r} paragraph {p}"
            for q, qa in enumerate(require(paragraph, "qas", where, source)):
                qid = require(qa, "id", f"{where} question #{q}", source)
                if not isinstance(qid, str):
                    raise SquadFormatError(f"{source}: {where} question #{q} has id {qid!r} "
                                           f"({type(qid).__name__}); ids must be strings")
                answers = require(qa, "answers", f"{where} question {qid!r}", source)
                if not isinstance(answers, list):
                    raise SquadFormatError(f"{source}: {where} question {qid!r}: 'answers' should be a list, "
                                           f"got {type(answers).__name__}")
                yield title, paragraph, qa


def check_predictions(predictions, source: str = "<predictions>") -> dict:
    """Predictions must be `{question_id: answer_text}` with string keys and values."""
    if not isinstance(predictions, Mapping):
        raise SquadFormatError(
            f"{source}: predictions should be a JSON object {{question_id: answer_text}}, "
            f"got {type(predictions).__name__}")
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise SquadFormatError(
                f"{source}: prediction for {qid!r} should be a string, got {type(answer).__name__} "
                f"({answer!r:.60})")
    return dict(predictions)


def evaluate(dataset, predictions, *, source: str = "<dataset>", quiet: bool = False) -> dict:
    """Official SQuAD v1.1 scores of `predictions` ({id: text}) on `dataset` (file dict or articles).

    Returns `{"exact_match", "f1"}` (percent, as the official script) plus `"total"` questions and
    `"missing"`, the number without a prediction (each scored 0; announced on stderr unless quiet).
    """
    predictions = check_predictions(predictions)
    f1 = exact_match = total = missing = 0
    for _, _, qa in iter_questions(dataset, source):
        total += 1
        if qa["id"] not in predictions:
            missing += 1
            if not quiet:
                print(f"Unanswered question {qa['id']} will receive score 0.", file=sys.stderr)
            continue
        ground_truths = []
        for i, answer in enumerate(qa["answers"]):
            text = require(answer, "text", f"question {qa['id']!r} answer {i}", source)
            if not isinstance(text, str):
                raise SquadFormatError(f"{source}: question {qa['id']!r} answer {i}: 'text' should be a string, "
                                       f"got {type(text).__name__} ({text!r:.60})")
            ground_truths.append(text)
        if not ground_truths:
            raise SquadFormatError(f"{source}: question {qa['id']!r} has no gold answers")
        prediction = predictions[qa["id"]]
        exact_match += max(exact_match_score(prediction, gt) for gt in ground_truths)
        f1 += max(f1_score(prediction, gt) for gt in ground_truths)
    if total == 0:
        raise SquadFormatError(f"{source}: no questions found")
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total,
            "total": total, "missing": missing}


def evaluate_files(dataset_path: str | os.PathLike, predictions_path: str | os.PathLike,
                   *, quiet: bool = False) -> dict:
    """`evaluate` on a SQuAD JSON file and a predictions JSON file, with file-naming errors."""
    dataset = load_json(dataset_path, "a SQuAD v1.1 dataset {\"version\", \"data\": [...]}")
    version = dataset.get("version") if isinstance(dataset, Mapping) else None
    if version != EXPECTED_VERSION and not quiet:
        print(f"Evaluation expects v-{EXPECTED_VERSION}, but got dataset with v-{version}",
              file=sys.stderr)
    predictions = load_json(predictions_path, "a predictions object {question_id: answer_text}")
    check_predictions(predictions, str(predictions_path))
    return evaluate(dataset, predictions, source=str(dataset_path), quiet=quiet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Evaluation for SQuAD {EXPECTED_VERSION}")
    parser.add_argument("dataset_file", help="SQuAD v1.1 dataset JSON")
    parser.add_argument("prediction_file", help="predictions JSON {question_id: answer_text}")
    parser.add_argument("--out", help="also write the result (with counts) to this JSON file")
    args = parser.parse_args(argv)
    try:
        result = evaluate_files(args.dataset_file, args.prediction_file)
    except (OSError, SquadFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"exact_match": result["exact_match"], "f1": result["f1"]}))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
