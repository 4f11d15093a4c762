"""Which weights a PEFT `.nemo` holds, and the base `.nemo` it refers to.

A PEFT `.nemo` stores only the LoRA adapters and the projector; its config names the full `.nemo` it was
trained from (`peft.base_nemo_path`) and that file's SHA-256 (`peft.base_nemo_sha256`). The `.nemo`
connector (saving a subset, checking the base before NeMo instantiates anything) and the model's restore
(`models/peft.py`) share these pieces, so they live below both.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from contextlib import contextmanager

from nemo_neva.checkpoint.nemo_layout import WEIGHTS_DIR
from nemo_neva.checkpoint.untrusted import UnsafeCheckpointError, check_nemo_archive  # a ValueError NeMo passes on
from nemo_neva.modules.lora import ADAPTER_PARAMS, lora_settings


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def is_peft_key(key: str) -> bool:
    """What a PEFT .nemo stores: adapters and the projector (keys of `model.sharded_state_dict('model.')`), with
    a tiled model's `image_newline` (it learns with the projector)."""
    return is_adapter_key(key) or key.startswith("model.projector.") or key == "model.image_newline"


def checkpoint_subset(model, sharded_state_dict: dict) -> dict:
    """The part of the model a .nemo stores: everything, or for a PEFT model adapters + projector."""
    if lora_settings(model.cfg) is None:
        return sharded_state_dict
    if not model.cfg.peft.get("base_nemo_path"):
        raise ValueError("this PEFT model has no base .nemo (model.peft.base_nemo_path); start PEFT training "
                         "from a full .nemo (examples/neva_peft.py), or merge the adapters first")
    return {k: v for k, v in sharded_state_dict.items() if is_peft_key(k)}


_SHA_CACHE: dict = {}


def sha256_of(path: str) -> str:
    """SHA-256 of a file (remembered per path, size and mtime: a restore checks the base twice)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def check_base_reference(cfg) -> None:
    """A PEFT config's base .nemo exists and is the file the adapters were trained on (else a clear error).
    Called by our connector before NeMo instantiates anything, and again before the base is loaded."""
    peft = cfg.get("peft") or {}
    path = peft.get("base_nemo_path")
    if lora_settings(cfg) is None or not path:
        return
    if not os.path.isfile(path):
        raise UnsafeCheckpointError(f"the PEFT .nemo's base {path!r} (model.peft.base_nemo_path) does not exist; "
                                "pass its new location with an override config (scripts/merge_lora.py: --base-nemo)")
    sha256 = peft.get("base_nemo_sha256")
    if not sha256:
        raise UnsafeCheckpointError("the PEFT .nemo records no model.peft.base_nemo_sha256; refusing an "
                                    "unverified base")
    actual = sha256_of(path)
    if actual != sha256:
        raise UnsafeCheckpointError(f"base .nemo {path} has SHA-256 {actual}, but the adapters were trained on "
                         f"{sha256}: it is not the same base model")


@contextmanager
def base_weights_dir(path: str):
    """The base .nemo's `model_weights/` extracted into a temporary folder (archive checked first)."""
    check_nemo_archive(path)
    tmp = tempfile.mkdtemp(prefix="neva_peft_base_")
    try:
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar.getmembers()
                       if os.path.normpath(m.name).split(os.sep)[0] == WEIGHTS_DIR]
            tar.extractall(tmp, members=members, filter="data")
        yield os.path.join(tmp, WEIGHTS_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
