"""The SQuAD v1.1 metric against the official scores of five real leaderboard submissions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain_bert.squad.metric import (
    SquadFormatError, evaluate, evaluate_files, exact_match_score, f1_score, normalize_answer,
)

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT / "data" / "squad"
DEV = SQUAD / "dev-v1.1-subset.json"

# Official evaluate-v1.1 output on dev-v1.1-subset.json (data/squad/README.md).
OFFICIAL = {
    "bert-ensemble": (91.36490250696379, 94.57401929546779),
    "slqa-plus-ensemble": (86.90807799442896, 92.23268866940191),
    "r-net-plus-ensemble": (86.0724233983287, 91.05630519279546),
    "match-lstm-ensemble": (75.4874651810585, 83.79110412954425),
    "logistic-regression-baseline": (49.02506963788301, 60.82351089221389),
}


@pytest.mark.parametrize("system", sorted(OFFICIAL))
def test_official_scores_reproduced_exactly(system):
    result = evaluate_files(DEV, SQUAD / "predictions" / f"{system}.json")
    assert (result["exact_match"], result["f1"]) == OFFICIAL[system]
    assert (result["total"], result["missing"]) == (359, 0)


def test_cli_prints_official_json(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain_bert.squad.metric", str(DEV),
         str(SQUAD / "predictions" / "bert-ensemble.json"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    em, f1 = OFFICIAL["bert-ensemble"]
    assert json.loads(proc.stdout) == {"exact_match": em, "f1": f1}
    assert json.loads(out.read_text()) == {"exact_match": em, "f1": f1, "total": 359, "missing": 0}


def test_cli_bad_file_exits_with_message(tmp_path):
    bad = tmp_path / "preds.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "pretrain_bert.squad.metric", str(DEV), str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "not valid JSON" in proc.stderr
    # a non-string gold answer: one line naming the question, no traceback
    dataset = _write(tmp_path, "dev.json", {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "c", "qas": [{"id": "q1", "question": "?", "answers": [{"text": None, "answer_start": 0}]}]}]}]})
    preds = _write(tmp_path, "ok.json", {"q1": "c"})
    proc = subprocess.run([sys.executable, "-m", "pretrain_bert.squad.metric", str(dataset), str(preds)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "question 'q1' answer 0: 'text' should be a string, got NoneType" in proc.stderr


@pytest.mark.parametrize("text, normalized", [
    ("The Cat", "cat"),
    ("  an   apple, a pear ", "apple pear"),
    ("theory of the atheist", "theory of atheist"),   # articles only as whole words
    ("U.S.-based", "usbased"),
    ("the.", ""),                                      # punctuation goes before articles
    ("A", ""),
    ("Ca$h\tflow\n", "cah flow"),
    ("Élan", "élan"),                                  # no accent folding in v1.1
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_cases():
    assert exact_match_score("The Eiffel Tower!", "eiffel tower")
    assert not exact_match_score("Eiffel", "eiffel tower")
    assert f1_score("x y y", "y y z") == pytest.approx(2 / 3)     # Counter overlap counts repeats
    assert f1_score("x y", "z") == 0
    assert f1_score("the", "a") == 0                               # both normalise to nothing
    assert f1_score("Denver Broncos", "the Denver Broncos") == 1.0


def test_max_over_gold_answers():
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": "q", "question": "?", "answers": [{"text": "red car", "answer_start": 0},
                                                 {"text": "car", "answer_start": 0}]}]}]}]}
    assert evaluate(data, {"q": "car"}) == {"exact_match": 100.0, "f1": 100.0, "total": 1, "missing": 0}


def test_missing_predictions_counted_as_zero(capsys):
    dataset = json.loads(DEV.read_text())
    full = json.loads((SQUAD / "predictions" / "bert-ensemble.json").read_text())
    dropped = sorted(full)[:10]
    partial = {qid: text for qid, text in full.items() if qid not in dropped}
    result = evaluate(dataset, partial)
    assert (result["total"], result["missing"]) == (359, 10)
    scored = evaluate(dataset, {**partial, **{qid: "" for qid in dropped}}, quiet=True)
    assert result["exact_match"] == scored["exact_match"] and result["f1"] == scored["f1"]
    err = capsys.readouterr().err
    assert all(f"Unanswered question {qid} will receive score 0." in err for qid in dropped)
    assert evaluate(dataset, {}, quiet=True) == {"exact_match": 0.0, "f1": 0.0, "total": 359,
                                                 "missing": 359}


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("dataset, message", [
    ("[1, 2", "not valid JSON"),
    ({"version": "1.1", "articles": []}, "no 'data' key"),
    ({"data": [{"title": "Force"}]}, "article 'Force' has no 'paragraphs' key"),
    ({"data": [{"title": "Force", "paragraphs": [{"context": "c"}]}]}, "paragraph 0 has no 'qas' key"),
    ({"data": [{"title": "Force", "paragraphs": [{"qas": [{"id": "q7", "question": "?"}]}]}]},
     "question 'q7' has no 'answers' key"),
    ({"data": [{"title": "Force", "paragraphs": [{"qas": [{"id": "q7", "answers": [{}]}]}]}]},
     "question 'q7' answer 0 has no 'text' key"),
    ({"data": [{"title": "Force", "paragraphs": [{"qas": [{"id": "q7", "answers": [{"text": 42}]}]}]}]},
     "question 'q7' answer 0: 'text' should be a string, got int (42)"),
    ({"data": [{"title": "Force", "paragraphs": [{"qas": [{"id": "q7", "answers": {"text": "x"}}]}]}]},
     "question 'q7': 'answers' should be a list, got dict"),
    ({"data": [{"title": "Force", "paragraphs": [{"qas": [{"id": 7, "answers": []}]}]}]},
     "question #0 has id 7 (int); ids must be strings"),
])
def test_bad_dataset_files_name_file_and_problem(tmp_path, dataset, message):
    path = _write(tmp_path, "dataset.json", dataset)
    preds = _write(tmp_path, "preds.json", {"q7": "x"})
    with pytest.raises(SquadFormatError) as err:
        evaluate_files(path, preds, quiet=True)
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("predictions, message", [
    ("oops", "not valid JSON"),
    (["a", "b"], "predictions should be a JSON object"),
    ({"5733be284776f41900661182": 3}, "prediction for '5733be284776f41900661182' should be a string"),
])
def test_bad_prediction_files_name_file_and_problem(tmp_path, predictions, message):
    path = _write(tmp_path, "preds.json", predictions)
    with pytest.raises(SquadFormatError) as err:
        evaluate_files(DEV, path, quiet=True)
    assert str(path) in str(err.value) and message in str(err.value)
