"""Reading LLaVA-format annotation files: a JSON list, or JSONL (one object per line)."""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence, Union


def iter_records(data_path: Union[str, Sequence[str]]) -> Iterator[tuple[str, object, str | None]]:
    """Yield (fallback id, record or None, error or None) for every record of every file.

    A malformed JSONL line is yielded as an error (the caller skips and counts it); a JSON-list file
    that does not parse raises, since none of its samples would be usable.
    """
    paths = [data_path] if isinstance(data_path, (str, os.PathLike)) else list(data_path)
    for path in paths:
        name = os.path.basename(str(path))
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
            for i, rec in enumerate(records):
                yield f"{name}:{i}", rec, None
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{name}:{lineno}", json.loads(line), None
            except json.JSONDecodeError as e:
                yield f"{name}:{lineno}", None, f"line {lineno}: {e}"
