"""Parameter-efficient finetuning (`model.peft.*`): LoRA on the LM, base weights and vision frozen.

A PEFT `.nemo` holds only the adapter and projector weights. Its config names the full `.nemo` it was
trained from (`peft.base_nemo_path`) with that file's SHA-256 (`peft.base_nemo_sha256`), recorded when
training started from it. Restoring a PEFT `.nemo` loads the base's weights first (after checking the
checksum and the archive, as for any untrusted `.nemo`), then the adapters and projector on top.
`scripts/merge_lora.py` folds the adapters into the base weights and writes a full `.nemo`.

    model.peft.peft_scheme        lora | null (no PEFT)
    model.peft.lora.{rank,alpha,dropout,target_modules}
    model.peft.train_projector    the projector learns too (true) or stays as in the base (false)
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from typing import Optional

from omegaconf import open_dict

from nemo_neva.models import lora

log = logging.getLogger(__name__)

SCHEMES = ("lora",)


def lora_settings(cfg) -> Optional[dict]:
    """The validated LoRA settings of `model` config `cfg`, or None without PEFT."""
    peft = cfg.get("peft")
    scheme = peft.get("peft_scheme") if peft else None
    if scheme is None or str(scheme).lower() in ("none", "null", ""):
        return None
    if scheme not in SCHEMES:
        raise ValueError(f"model.peft.peft_scheme={scheme!r}; supported: {', '.join(SCHEMES)} (or null)")
    lc = peft.get("lora") or {}
    return {
        "rank": int(lc.get("rank", 8)),
        "alpha": float(lc.get("alpha", 16)),
        "dropout": float(lc.get("dropout", 0.0)),
        "targets": list(lc.get("target_modules") or lora.TARGETS),
    }


def apply(module, cfg) -> None:
    """Wrap the LM's targeted linear layers of NevaModule `module` with LoRA adapters (if PEFT is on)."""
    settings = lora_settings(cfg)
    if settings is None:
        return
    gpt = module.language_model
    n = lora.wrap_linear_layers(gpt, gpt.config, settings["targets"], settings["rank"], settings["alpha"],
                                settings["dropout"], seed=cfg.get("seed", 1234))
    if n == 0:
        raise ValueError(f"model.peft.lora.target_modules={settings['targets']} matched no layer")


def freeze(module, cfg) -> None:
    """PEFT: only the adapters (and the projector, with `peft.train_projector`) learn."""
    if lora_settings(cfg) is None:
        return
    if not cfg.mm_cfg.llm.get("freeze", True):
        log.info("PEFT: the LM's base weights stay frozen (model.mm_cfg.llm.freeze=false is ignored)")
    for name, p in module.language_model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in lora.ADAPTER_PARAMS)
    if module.projector is not None:
        for p in module.projector.parameters():
            p.requires_grad_(bool(cfg.peft.get("train_projector", True)))


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in lora.ADAPTER_PARAMS


def is_peft_key(key: str) -> bool:
    """What a PEFT .nemo stores: adapters and the projector (keys of `model.sharded_state_dict('model.')`)."""
    return is_adapter_key(key) or key.startswith("model.projector.")


def checkpoint_subset(model, sharded_state_dict: dict) -> dict:
    """The part of the model a .nemo stores: everything, or for a PEFT model adapters + projector."""
    if lora_settings(model.cfg) is None:
        return sharded_state_dict
    if not model.cfg.peft.get("base_nemo_path"):
        raise ValueError("this PEFT model has no base .nemo (model.peft.base_nemo_path); start PEFT training "
                         "from a full .nemo (examples/neva_peft.py), or merge the adapters first")
    return {k: v for k, v in sharded_state_dict.items() if is_peft_key(k)}


# ------------------------------------------------------------------------------------------ restore
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
    from nemo_neva.security import UnsafeCheckpointError  # a ValueError that NeMo's restore passes on as is

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


def restore_weights(model, restore_dir: str, archive: Optional[str]) -> None:
    """Load the weights of the .nemo being restored into `model`.

    * no PEFT: all weights from the archive;
    * PEFT config, full archive (starting PEFT from a stage-1/2 .nemo): base weights from it, adapters keep
      their initialisation (B = 0), and the archive is recorded as the base;
    * PEFT archive (its config names a base): base weights from the base .nemo, then adapters + projector.
    """
    from nemo_neva.models.save_restore import WEIGHTS_DIR

    own = os.path.join(restore_dir, WEIGHTS_DIR)
    if lora_settings(model.cfg) is None:
        model._load_dist_weights(own)
        return
    peft = model.cfg.peft
    if peft.get("base_nemo_path"):
        check_base_reference(model.cfg)
        with base_weights_dir(peft.base_nemo_path) as base_dir:
            model._load_dist_weights(base_dir, keep=lambda k: not is_adapter_key(k))
        model._load_dist_weights(own, keep=is_peft_key)
        return
    model._load_dist_weights(own, keep=lambda k: not is_adapter_key(k))
    if not archive or not os.path.isfile(archive):
        raise ValueError("PEFT training must start from a .nemo file (it becomes the adapters' base), "
                         f"got {archive!r}")
    with open_dict(model.cfg):
        peft.base_nemo_path = os.path.abspath(archive)
        peft.base_nemo_sha256 = sha256_of(archive)


@contextmanager
def base_weights_dir(path: str):
    """The base .nemo's `model_weights/` extracted into a temporary folder (archive checked first)."""
    from nemo_neva import security
    from nemo_neva.models.save_restore import WEIGHTS_DIR

    security.check_nemo_archive(path)
    tmp = tempfile.mkdtemp(prefix="neva_peft_base_")
    try:
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar.getmembers()
                       if os.path.normpath(m.name).split(os.sep)[0] == WEIGHTS_DIR]
            tar.extractall(tmp, members=members, filter="data")
        yield os.path.join(tmp, WEIGHTS_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ merge
def merge(model) -> int:
    """Fold the adapters into the base weights; the model becomes a plain (non-PEFT) NeVA model."""
    if lora_settings(model.cfg) is None:
        raise ValueError("this model has no LoRA adapters (model.peft.peft_scheme is not lora)")
    n = lora.merge_and_unwrap(model.model)
    with open_dict(model.cfg):
        model.cfg.pop("peft")
    return n
