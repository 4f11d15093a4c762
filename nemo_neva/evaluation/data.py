"""Reading an evaluation JSONL: one question per line, bad lines counted and skipped, never fatal.

Line format: {"image": path (relative to the image folder; optional for text-only questions),
"question": str, "answers": [str, ...] or "answer": str, "question_type" (or "category"): optional str,
"id": optional}.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger(__name__)


@dataclass
class EvalItem:
    id: str
    question: str
    answers: list
    question_type: str
    image: Optional[str]  # resolved path, or None for a text-only question


@dataclass
class EvalSet:
    items: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        log.warning("eval: skipping %s (%s%s)", where, reason, f": {detail}" if detail else "")


def _answers(rec: dict) -> Optional[list]:
    answers = rec.get("answers", rec.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return None
    return answers


def read_eval_file(path: str, image_folder: Optional[str] = None) -> EvalSet:
    """Parse `path`; image paths are resolved against `image_folder` (default: the file's folder)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval_file={path!r}: no such file")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    out = EvalSet()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.path.basename(path)}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                out.skip("bad_json", where, str(err))
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
                out.skip("no_question", where)
                continue
            answers = _answers(rec)
            if answers is None:
                out.skip("no_answers", where)
                continue
            image = rec.get("image")
            if image is not None and not isinstance(image, str):
                out.skip("bad_image_field", where)
                continue
            qtype = rec.get("question_type", rec.get("category")) or "all"
            out.items.append(EvalItem(id=str(rec.get("id", f"line{lineno}")), question=rec["question"],
                                      answers=answers, question_type=str(qtype),
                                      image=os.path.join(folder, image) if image else None))
    return out
