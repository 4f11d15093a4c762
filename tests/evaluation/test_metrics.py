"""Metrics against hand-computed cases (VQAv2 normalisation and accuracy, POPE yes/no, per-type scores)."""
import json

import pytest

from nemo_neva.evaluation.data import read_eval_file
from nemo_neva.evaluation.scores import check_metrics, exact_match_vqa, score
from nemo_neva.evaluation.vqa import normalise_vqa, vqa_accuracy
from nemo_neva.evaluation.yes_no import yes_no, yes_no_metrics


@pytest.mark.parametrize("raw,expected", [
    ("The Red, circle!", "red circle"),
    ("Two dogs", "2 dogs"),
    ("3.5", "3.5"),                       # decimal point kept
    ("It costs 1,000.", "it costs 1000"),  # thousands comma dropped, final period gone
    ("end. 7.25 left", "end 7.25 left"),
    ("dont", "don't"), ("Don't", "don't"), ("Don\u2019t", "don't"),
    ("'yes'", "yes"),                     # quote marks are not apostrophes inside a word
    ("the dog's ball", "dog's ball"),
    ("t-shirt", "t shirt"),
    ("An apple and a pear", "apple and pear"),
    ("none", "0"), ("  Ten\tcats\n", "10 cats"),
])
def test_vqa_normalisation(raw, expected):
    assert normalise_vqa(raw) == expected


def test_vqa_accuracy_ten_annotators_leave_one_out():
    refs = ["2"] * 2 + ["3"] * 8
    # "two" matches 2 refs: leaving out one of them (2 of 10 subsets) -> 1/3, else 2/3 -> (2/3 + 16/3) / 10.
    # approx() here and below: its default 1e-6 relative, for the rounding of these float fractions only
    assert vqa_accuracy("two", refs) == pytest.approx(0.6)
    assert vqa_accuracy("Three.", refs) == pytest.approx(1.0)
    assert vqa_accuracy("four", refs) == 0.0
    # Exactly 3 matches: 3 subsets keep 2 of them (2/3), 7 keep all 3 (1) -> 0.9.
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_few_references():
    assert vqa_accuracy("Left.", ["left"]) == 1.0
    assert vqa_accuracy("left", ["left", "on the left"]) == 0.5   # 1 of min(3, 2) references agree
    assert vqa_accuracy("one", ["1", "one"]) == 1.0
    assert vqa_accuracy("x", ["x", "y", "z", "w"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_exact_match():
    assert exact_match_vqa("On the left.", ["right", "on the left"]) == 1.0
    assert exact_match_vqa("left side", ["left"]) == 0.0


def test_yes_no_first_word_and_pope_counts():
    assert yes_no("Yes, it is.") == "yes" and yes_no("NO") == "no" and yes_no("I think yes") is None
    pairs = [("Yes, it is", "yes"), ("no", "yes"), ("maybe", "yes"), ("yes", "no"), ("No.", "no"), ("nope", "no")]
    m = yes_no_metrics(pairs)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["unparseable"]) == (1, 2, 1, 1, 2)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4) and m["accuracy"] == pytest.approx(2 / 6)
    assert m["yes_ratio"] == pytest.approx(2 / 6) and m["n"] == 6
    with pytest.raises(ValueError):
        yes_no_metrics([("yes", "blue")])


def test_score_overall_and_by_question_type():
    rows = [
        {"prediction": "red", "answers": ["red"], "question_type": "colour"},
        {"prediction": "blue", "answers": ["green"], "question_type": "colour"},
        {"prediction": "yes", "answers": ["yes"], "question_type": "exists"},
        {"prediction": "yes", "answers": ["no"], "question_type": "exists"},
    ]
    s = score(rows, ["vqa", "exact_match", "yes_no"])
    assert s["overall"]["n"] == 4 and s["overall"]["exact_match"] == 0.5 and s["overall"]["vqa"] == 0.5
    assert s["overall"]["yes_no"]["n"] == 2 and s["overall"]["yes_no"]["precision"] == 0.5
    assert s["by_question_type"]["colour"] == {"n": 2, "vqa": 0.5, "exact_match": 0.5}  # no yes/no questions
    assert s["by_question_type"]["exists"]["yes_no"]["yes_ratio"] == 1.0
    assert set(score(rows, ["exact_match"])["overall"]) == {"n", "exact_match"}
    with pytest.raises(ValueError):
        check_metrics(["bleu"])


def test_read_eval_file_counts_bad_lines(tmp_path):
    lines = [
        json.dumps({"image": "a.png", "question": "Q1?", "answers": ["x"], "question_type": "t"}),
        "{not json",
        json.dumps({"image": "b.png", "question": "Q2?", "answer": "y", "category": "c"}),
        json.dumps({"image": "c.png", "question": "Q3?"}),               # no answers
        json.dumps({"image": "d.png", "answers": ["z"]}),               # no question
        json.dumps({"question": "text only?", "answers": ["w"]}),
        "",
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    s = read_eval_file(str(path))
    assert [i.question for i in s.items] == ["Q1?", "Q2?", "text only?"]
    assert [i.question_type for i in s.items] == ["t", "c", "all"]
    assert s.items[1].answers == ["y"] and s.items[0].image == str(tmp_path / "a.png") and s.items[2].image is None
    assert dict(s.skipped) == {"bad_json": 1, "no_answers": 1, "no_question": 1}
    with pytest.raises(FileNotFoundError):
        read_eval_file(str(tmp_path / "missing.jsonl"))
