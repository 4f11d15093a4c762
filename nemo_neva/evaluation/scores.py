"""Metrics over a list of predictions: overall, yes/no (POPE-style), and per question type."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

from nemo_neva.evaluation.vqa import normalise_vqa, vqa_accuracy
from nemo_neva.evaluation.yes_no import yes_no, yes_no_metrics

METRICS = ("vqa", "exact_match", "yes_no")


def exact_match_vqa(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    pred = normalise_vqa(prediction)
    return float(any(pred == normalise_vqa(a) for a in answers))


def check_metrics(metrics: Iterable[str]) -> list:
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics={metrics}: choose from {list(METRICS)}")
    return metrics


def _score_group(rows: list, metrics: list) -> dict:
    out = {"n": len(rows)}
    if "vqa" in metrics:
        out["vqa"] = sum(vqa_accuracy(r["prediction"], r["answers"]) for r in rows) / len(rows)
    if "exact_match" in metrics:
        out["exact_match"] = sum(exact_match_vqa(r["prediction"], r["answers"]) for r in rows) / len(rows)
    if "yes_no" in metrics:
        # Only questions whose (first) reference is yes/no take part.
        yn = [(r["prediction"], r["answers"][0]) for r in rows if yes_no(r["answers"][0]) is not None]
        if yn:
            out["yes_no"] = yes_no_metrics(yn)
    return out


def score(rows: list, metrics: Iterable[str] = METRICS) -> dict:
    """rows: {"prediction", "answers", "question_type"} -> {"overall": {...}, "by_question_type": {...}}."""
    metrics = check_metrics(metrics)
    if not rows:
        return {"overall": {"n": 0}, "by_question_type": {}}
    groups = defaultdict(list)
    for r in rows:
        groups[r["question_type"]].append(r)
    return {"overall": _score_group(rows, metrics),
            "by_question_type": {t: _score_group(g, metrics) for t, g in sorted(groups.items())}}
