"""Reading an evaluation JSONL: one question per line, bad lines counted and skipped, never fatal.

Line format: {"image": path or list of paths (relative to the image folder; optional for text-only
questions), "video": path or list of paths (relative to the video folder; optional), "question": str,
"answers": [str, ...] or "answer": str, "question_type" (or "category"): optional str, "id": optional}.
Images and videos take the question's `<image>` / `<video>` tags in order; untagged ones go first, as in
training (see evaluation/run.py).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

log = logging.getLogger(__name__)


@dataclass
class EvalItem:
    id: str
    question: str
    answers: list
    question_type: str
    image: Union[str, list, None]  # resolved path, or a list of them, or None
    video: Union[str, list, None] = None  # resolved path(s) of the question's video(s), or None


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


def _paths(value, folder: str):
    """A record's "image"/"video" value -> resolved path(s) (as given: one or a list), None when absent;
    False when it is neither a path nor a non-empty list of paths."""
    if value is None:
        return None
    if isinstance(value, str) and value:
        return os.path.join(folder, value)
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return [os.path.join(folder, v) for v in value]
    return False


def read_eval_file(path: str, image_folder: Optional[str] = None, video_folder: Optional[str] = None) -> EvalSet:
    """Parse `path`; image paths are resolved against `image_folder` (default: the file's folder), video paths
    against `video_folder` (default: the image folder)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval_file={path!r}: no such file")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    video_folder = video_folder if video_folder is not None else folder
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
            image, video = _paths(rec.get("image"), folder), _paths(rec.get("video"), video_folder)
            if image is False or video is False:
                out.skip("bad_image_field" if image is False else "bad_video_field", where)
                continue
            qtype = rec.get("question_type", rec.get("category")) or "all"
            out.items.append(EvalItem(id=str(rec.get("id", f"line{lineno}")), question=rec["question"],
                                      answers=answers, question_type=str(qtype),
                                      image=image, video=video))
    return out
