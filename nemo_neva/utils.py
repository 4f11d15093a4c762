"""Small shared helpers."""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path):
    """A relative path is taken from the working directory, else from the repository root.

    Lets the shipped configs name `data/...` whether a script runs from the repo root or elsewhere.
    """
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path
