"""POPE-style yes/no scoring: the answer's first word decides; "yes" is the positive class.

A prediction whose first word is neither yes nor no is "unparseable": it is counted, is wrong for accuracy,
and on a "yes" question it is a missed positive (false negative); it is never a false positive.
"""
from __future__ import annotations

from typing import Iterable, Optional

from nemo_neva.evaluation.vqa import normalise_vqa


def yes_no(text: str) -> Optional[str]:
    """'yes' / 'no' from the first word after normalisation, else None."""
    words = normalise_vqa(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def yes_no_metrics(pairs: Iterable[tuple[str, str]]) -> dict:
    """(prediction, reference) pairs whose reference is yes/no -> precision, recall, F1, accuracy, yes-ratio."""
    tp = fp = fn = tn = unparseable = total = said_yes = 0
    for prediction, reference in pairs:
        ref, pred = yes_no(reference), yes_no(prediction)
        if ref is None:
            raise ValueError(f"reference {reference!r} is not a yes/no answer")
        total += 1
        said_yes += pred == "yes"
        unparseable += pred is None
        if ref == "yes":
            tp += pred == "yes"
            fn += pred != "yes"
        else:
            fp += pred == "yes"
            tn += pred == "no"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": total, "accuracy": (tp + tn) / total if total else 0.0, "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": said_yes / total if total else 0.0,
            "unparseable": unparseable, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
