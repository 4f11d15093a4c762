"""What the command-line entry points (examples/, scripts/) share: config paths that work from any folder, and
user mistakes reported as one line instead of a stack trace."""
from __future__ import annotations

import functools
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path):
    """A relative path is taken from the working directory, else from the repository root.

    Lets the shipped configs name `data/...` whether a script runs from the repo root or elsewhere.
    """
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def user_errors(fn):
    """Config and input mistakes end the script with their message, not a stack trace.

    Set NEVA_DEBUG=1 to see the trace.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError, KeyError) as err:
            if os.environ.get("NEVA_DEBUG"):
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
