"""Scoring generated answers against reference answers (exact match after light normalisation)."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Iterable

from nemo_neva.inference.prompting import build_prompt, stop_markers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def normalise(text: str) -> str:
    """Lower case, no punctuation or articles, number words as digits, single spaces."""
    words = _ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split()
    return " ".join(_NUMBERS.get(w, w) for w in words)


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    pred = normalise(prediction)
    return any(pred == normalise(a) for a in answers)


def evaluate_file(model, eval_jsonl: str, image_folder: str, template: str, max_new_tokens: int = 8) -> dict:
    """Greedy answers for every row ({image, question, answers, category}) -> accuracy overall and per category."""
    from PIL import Image

    stop_ids, stop_strings = stop_markers(model.tokenizer, template)
    hits, totals = Counter(), Counter()
    with open(eval_jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        image = Image.open(os.path.join(image_folder, row["image"])).convert("RGB") if row.get("image") else None
        prompt = build_prompt(template, row["question"], image is not None)
        answer = model.generate([image], [prompt], max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
                                stop_strings=stop_strings)[0]
        category = row.get("category", "all")
        totals[category] += 1
        hits[category] += exact_match(answer, row["answers"])
    result = {c: hits[c] / totals[c] for c in totals}
    result["overall"] = sum(hits.values()) / max(sum(totals.values()), 1)
    return result
