"""A JSONL file of generation requests: one `{"image": path, "prompt": text}` (or `{"video": path, ...}`)
object per line.

`image` / `video` are optional (at most one of them); a relative path is resolved against the JSONL file's folder (so a folder of images and
its prompt file can be moved together). A line that cannot be used is not fatal: it becomes a `Skipped`
entry with its line number and reason, and the caller reports it (and keeps its place in the output).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class PromptRequest:
    line: int
    record: dict  # the line's object, as written (echoed into the output)
    prompt: str
    image_path: Optional[str]  # resolved
    video_path: Optional[str] = None  # resolved


@dataclass
class Skipped:
    line: int
    reason: str
    record: dict = field(default_factory=dict)


def read_prompts_file(path: str) -> list[Union[PromptRequest, Skipped]]:
    """Every non-blank line, in order, as a request or as a skip with its reason."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts_file={path}: no such file")
    base = os.path.dirname(os.path.abspath(path))
    out: list[Union[PromptRequest, Skipped]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                out.append(_parse(number, line, base))
    return out


def _parse(number: int, line: str, base: str) -> Union[PromptRequest, Skipped]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return Skipped(number, f"not valid JSON ({err.msg})")
    if not isinstance(record, dict):
        return Skipped(number, f"expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return Skipped(number, "'prompt' must be a non-empty string", record)
    paths = {}
    for key in ("image", "video"):
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            return Skipped(number, f"'{key}' must be a path string (or absent)", record)
        paths[key] = value if value is None or os.path.isabs(value) else os.path.join(base, value)
    if paths["image"] is not None and paths["video"] is not None:
        return Skipped(number, "give 'image' or 'video', not both", record)
    return PromptRequest(number, record, prompt, paths["image"], paths["video"])
