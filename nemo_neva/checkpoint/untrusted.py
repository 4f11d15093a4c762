"""Checks for untrusted checkpoints: `.nemo` archives, extracted checkpoint folders, dist checkpoints.

Everything here refuses (raises `UnsafeCheckpointError`) instead of skipping silently. User images are checked
in `nemo_neva.data.image_io.open_user_image`.

- `check_nemo_archive`: every tar member must be a plain file or folder with a relative path that stays
  inside the extraction folder (no absolute path, no `..`, no symlink/hardlink/device/fifo member).
  NeMo 3's own extractor (`nemo.utils.tar_utils.safe_extract(skip_unsafe=True)`) only skips such members
  with a warning; we refuse the whole file.
- `check_extracted_folder`: no symlink and no special file anywhere under an extracted / pre-extracted folder.
- `check_model_config`: the packed config must name our class as `target` and carry no hydra
  `_target_` / `cls`+`params` instantiation keys.
- `load_weights_marker`: `model_weights.ckpt` is read with `torch.load(weights_only=True)` (explicit,
  so `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot turn it off) and must be our small marker.
- `check_dist_checkpoint`: megatron-core / torch DCP read `.metadata` with plain `pickle.load` and every
  non-tensor ("bytes") item with `torch.load(weights_only=False)`. Before they run, we parse `.metadata`
  with an allow-list unpickler, refuse unknown shapes of data, and re-read every bytes item (and
  `common.pt`) with `torch.load(weights_only=True)`. The later real load then only sees data that passed.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import stat
import tarfile
from pathlib import PurePosixPath
from typing import Any, Iterable, Optional, Union

from nemo_neva.checkpoint.nemo_layout import is_weights_marker

MODEL_TARGET = "nemo_neva.models.neva_model.MegatronNevaModel"


from nemo.core.classes.common import UnsafeTargetError


class UnsafeCheckpointError(UnsafeTargetError):
    """A `.nemo` file or checkpoint folder that was refused because loading it would not be safe.

    A ValueError. It subclasses NeMo's `UnsafeTargetError` because NeMo's `from_config_dict` re-raises that
    one as is; any other error from our constructor would make NeMo retry with the calling class and
    report a confusing error instead.
    """


# ---------------------------------------------------------------------------------------------- archives
def _open_tar(path: str) -> tarfile.TarFile:
    # Same formats NeMo accepts: uncompressed tar (current), gzip (old .nemo files).
    try:
        return tarfile.open(path, "r:")
    except tarfile.ReadError:
        try:
            return tarfile.open(path, "r:gz")
        except tarfile.ReadError as e:
            raise UnsafeCheckpointError(f"{path}: not a .nemo (tar) file: {e}") from e


def unsafe_member_reason(member: tarfile.TarInfo) -> Optional[str]:
    """Why this tar member must not be extracted, or None if it is a plain file/folder inside the target."""
    name = member.name
    if not name or "\x00" in name:
        return "empty or NUL-containing name"
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in posix.parts:
        return "'..' path component (would land outside the extraction folder)"
    if member.issym():
        return f"symbolic link (-> {member.linkname!r})"
    if member.islnk():
        return f"hard link (-> {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "device, fifo or other special file"
    return None


def check_nemo_archive(path: str) -> None:
    """Refuse a `.nemo` with any member that could land outside the extraction folder."""
    bad, seen = [], set()
    with _open_tar(path) as tar:
        for member in tar:
            reason = unsafe_member_reason(member)
            key = os.path.normpath(member.name)
            if reason is None and member.isfile() and key in seen:
                reason = "duplicate name (a later copy would replace the checked one)"
            seen.add(key)
            if reason:
                bad.append(f"{member.name!r}: {reason}")
    if bad:
        raise UnsafeCheckpointError(
            f"refusing to extract {path}: it has unsafe member(s): " + "; ".join(bad[:10])
            + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        )


def read_archive_member(path: str, name: str) -> bytes:
    """Bytes of one regular member (`name` or `./name`) of a checked archive, without extracting anything."""
    with _open_tar(path) as tar:
        for member in tar:
            if member.isfile() and os.path.normpath(member.name) == name:
                return tar.extractfile(member).read()
    raise UnsafeCheckpointError(f"{path} has no {name}")


def check_extracted_folder(folder: str) -> None:
    """Refuse a checkpoint folder holding symlinks or special files (they could point anywhere)."""
    bad = []
    if os.path.islink(folder):
        bad.append(f"{folder} itself is a symbolic link")
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = os.path.join(root, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                bad.append(f"{os.path.relpath(p, folder)!r}: symbolic link -> {os.readlink(p)!r}")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                bad.append(f"{os.path.relpath(p, folder)!r}: special file")
    if bad:
        raise UnsafeCheckpointError(f"refusing checkpoint folder {folder}: " + "; ".join(bad[:10]))


# ---------------------------------------------------------------------------------------------- config
def _find_key(node: Any, keys: Iterable[str], path: str = "") -> Optional[str]:
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, (dict, DictConfig)):
        for k in node.keys():
            if k in keys:
                return f"{path}{k}"
        for k in node.keys():
            found = _find_key(node[k], keys, f"{path}{k}.")
            if found:
                return found
    elif isinstance(node, (list, tuple, ListConfig)):
        for i, v in enumerate(node):
            found = _find_key(v, keys, f"{path}{i}.")
            if found:
                return found
    return None


def check_model_config(conf, require_target: bool = True) -> None:
    """The config must name `MegatronNevaModel` and carry nothing hydra would instantiate."""
    from omegaconf import DictConfig

    if not isinstance(conf, (dict, DictConfig)):
        raise UnsafeCheckpointError(f"model config is a {type(conf).__name__}, expected a mapping")
    if "model" in conf and isinstance(conf["model"], (dict, DictConfig)):
        conf = conf["model"]  # NeMo accepts a top-level config and uses its `model`
    target = conf.get("target")
    if target is None and not require_target:
        pass
    elif target != MODEL_TARGET:
        raise UnsafeCheckpointError(
            f"refusing model config: target {target!r} is not {MODEL_TARGET!r}; a NeVA .nemo only ever "
            "instantiates MegatronNevaModel"
        )
    if "params" in conf or "cls" in conf:
        raise UnsafeCheckpointError("refusing model config: hydra 0.x 'cls'/'params' instantiation keys present")
    found = _find_key(conf, ("_target_",))
    if found:
        raise UnsafeCheckpointError(f"refusing model config: '{found}' asks hydra to instantiate an object")


# ---------------------------------------------------------------------------------------------- torch.load
def load_weights_marker(path: str):
    """`model_weights.ckpt` with weights_only=True; it must be our marker (real weights are in model_weights/)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing {os.path.basename(path)}: it holds objects other than tensors and plain data ({e})"
        ) from e
    except Exception as e:  # truncated zip, not a torch file, ...
        raise UnsafeCheckpointError(f"refusing {os.path.basename(path)}: unreadable ({e})") from e
    if not is_weights_marker(obj):
        raise UnsafeCheckpointError(f"{os.path.basename(path)} is not a nemo_neva weights marker")
    return obj


def _torch_load_plain(data: Union[str, bytes], what: str):
    import torch

    try:
        return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu",
                          weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refusing checkpoint: {what} holds non-tensor objects ({e})") from e
    except Exception as e:
        raise UnsafeCheckpointError(f"refusing checkpoint: {what} is unreadable ({e})") from e


# ---------------------------------------------------------------------------------------------- dist ckpt
_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "LoadPlan", "WriteItem", "WriteItemType",
                                             "TensorWriteData", "ReadItem", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice", "complex"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes torch DCP writes into `.metadata`; anything else (os.system, ...) is refused."""

    def find_class(self, module: str, name: str):
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if name in _DCP_MODULES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a checkpoint .metadata")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a checkpoint .metadata")


def _plain_file(folder: str, rel: str) -> str:
    if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
        raise UnsafeCheckpointError(f"refusing checkpoint: data file {rel!r} is not a plain name in {folder}")
    path = os.path.join(folder, rel)
    if os.path.islink(path) or not os.path.isfile(path):
        raise UnsafeCheckpointError(f"refusing checkpoint: data file {rel!r} is missing or not a regular file")
    return path


def check_dist_checkpoint(ckpt_dir: str) -> None:
    """Validate a megatron-core `torch_dist` checkpoint folder before megatron-core / torch DCP read it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    check_extracted_folder(ckpt_dir)
    try:
        with open(os.path.join(ckpt_dir, "metadata.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UnsafeCheckpointError(f"refusing checkpoint {ckpt_dir}: bad metadata.json ({e})") from e
    if not isinstance(config, dict) or config.get("sharded_backend") != "torch_dist" \
            or config.get("common_backend", "torch") != "torch":
        raise UnsafeCheckpointError(
            f"refusing checkpoint {ckpt_dir}: only the torch_dist/torch backends are loaded, got {config!r}")

    common = os.path.join(ckpt_dir, "common.pt")
    if os.path.lexists(common):
        _torch_load_plain(_plain_file(ckpt_dir, "common.pt"), "common.pt")

    meta_path = _plain_file(ckpt_dir, ".metadata")
    try:
        with open(meta_path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise UnsafeCheckpointError(f"refusing checkpoint {ckpt_dir}: .metadata rejected ({e})") from e
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict) \
            or not isinstance(meta.storage_data, dict):
        raise UnsafeCheckpointError(f"refusing checkpoint {ckpt_dir}: .metadata is not a DCP Metadata")
    bytes_fqns = set()
    for fqn, md in meta.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            bytes_fqns.add(fqn)
        elif not isinstance(md, TensorStorageMetadata):
            raise UnsafeCheckpointError(f"refusing checkpoint: entry {fqn!r} has unknown type {type(md).__name__}")
    for index, info in meta.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise UnsafeCheckpointError("refusing checkpoint: unexpected storage entry in .metadata")
        if info.transform_descriptors:
            raise UnsafeCheckpointError(f"refusing checkpoint: {index.fqn!r} uses storage transforms "
                                        f"{info.transform_descriptors!r} (nemo_neva never writes them)")
        path = _plain_file(ckpt_dir, info.relative_path)
        if index.fqn in bytes_fqns:
            # torch DCP would torch.load(weights_only=False) these bytes: check them the safe way first.
            try:
                offset, length = int(info.offset), int(info.length)
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(length)
            except (TypeError, ValueError, OSError) as e:
                raise UnsafeCheckpointError(f"refusing checkpoint: bad storage entry for {index.fqn!r} ({e})") from e
            _torch_load_plain(data, f"item {index.fqn!r}")
