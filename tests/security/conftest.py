"""Shared pieces for the untrusted-input tests: one real tiny .nemo, tar rewriting, pickle payloads."""
import io
import os
import tarfile
import tempfile

import pytest


class Payload:
    """Unpickling this creates `path` (via builtins.open): the stand-in for arbitrary code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="session")
def tiny_nemo(tmp_path_factory):
    from nemo_neva import build_model
    from tests.model.helpers import tiny_model_cfg

    path = str(tmp_path_factory.mktemp("secnemo") / "tiny.nemo")
    build_model(tiny_model_cfg()).save_to(path)
    return path


def rewrite_nemo(src, dst, replace=None, extra=()):
    """Copy the tar `src` to `dst`; `replace` maps a member name ('model_config.yaml') to new bytes;
    `extra` is a list of (TarInfo, bytes-or-None) appended at the end."""
    replace = dict(replace or {})
    with tarfile.open(src, "r:") as tin, tarfile.open(dst, "w:") as tout:
        for m in tin:
            key = os.path.normpath(m.name)
            if key in replace:
                data = replace.pop(key)
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        assert not replace, f"members not found: {list(replace)}"
        for info, data in extra:
            if data is not None:
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def read_member(src, name):
    with tarfile.open(src, "r:") as tar:
        for m in tar:
            if os.path.normpath(m.name) == name:
                return tar.extractfile(m).read()
    raise KeyError(name)


@pytest.fixture
def jail(tmp_path, monkeypatch):
    """NeMo extracts into tempfile's folder: put that two levels below tmp_path, so a `../../x` member
    would land directly in tmp_path, where the test can look for it."""
    extract_root = tmp_path / "a" / "b"
    extract_root.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(extract_root))
    return tmp_path


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
