"""`.nemo` layout for NeVA: config + HF side files + a megatron-core distributed checkpoint.

    model_config.yaml        the model config (NeMo reads it to pick the class)
    model_weights/           megatron-core dist checkpoint of `model.sharded_state_dict()`; any TP/PP
                             layout can load it (resharding is megatron-core's)
    model_weights.ckpt       a small marker so NeMo's generic connector finds "weights"; the real
                             load already happened in the model constructor, from model_weights/
    tokenizer/, image_processor/, vision_config/   Hugging Face files

NeMo 3's default connector refuses model parallel saves and writes one pickle; NeMo 1's Megatron
connector (which wrote a dist checkpoint folder) is gone, hence this one.

Restoring through this connector (`MegatronNevaModel.restore_from` uses it) first checks the archive and
its config without extracting anything (see `nemo_neva.checkpoint.untrusted`): unsafe tar members and a config whose
`target` is not MegatronNevaModel are refused before NeMo extracts or instantiates anything.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from nemo.core.connectors.save_restore_connector import SaveRestoreConnector
from omegaconf import DictConfig, OmegaConf

from nemo_neva.checkpoint import peft_files, untrusted
from nemo_neva.checkpoint.nemo_layout import WEIGHTS_DIR, WEIGHTS_MARKER


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _shared_tmpdir(parent: str) -> str:
    """A temporary folder created by rank 0 and known to all ranks (assumes a shared filesystem)."""
    path = [tempfile.mkdtemp(prefix=".neva_save_", dir=parent) if _rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(path, src=0)
    return path[0]


class NevaSaveRestoreConnector(SaveRestoreConnector):
    def __init__(self, before_build=None):
        """`before_build(conf)`: called on a restore with the checked model config, before NeMo builds the model
        from it (MegatronNevaModel.restore_from passes its parallel set-up: this package cannot import models/)."""
        super().__init__()
        self.before_build = before_build

    def save_to(self, model, save_path: str):
        from nemo_neva.parallel.dist_ckpt import save_sharded

        parent = os.path.dirname(os.path.abspath(save_path))
        if _rank() == 0:
            os.makedirs(parent, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        tmpdir = _shared_tmpdir(parent)
        try:
            # a PEFT model stores only its adapters + projector
            state = peft_files.checkpoint_subset(model, model.model.sharded_state_dict(prefix="model."))
            save_sharded(state, os.path.join(tmpdir, WEIGHTS_DIR))
            if _rank() == 0:
                model.to_config_file(path2yaml_file=os.path.join(tmpdir, self.model_config_yaml))
                model.save_hf_files(tmpdir)
                torch.save(WEIGHTS_MARKER, os.path.join(tmpdir, self.model_weights_ckpt))
                # Write next to the target and rename, so a crash never leaves a half-written .nemo.
                partial = save_path + ".partial"
                self._make_nemo_file_from_folder(filename=partial, source_dir=tmpdir)
                os.replace(partial, save_path)
        finally:
            if dist.is_initialized():
                dist.barrier()
            if _rank() == 0:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return save_path

    # ------------------------------------------------------------------ restore (untrusted input)
    def _check_before_restore(self, restore_path: str, override_config_path) -> DictConfig:
        """The model config the restore builds from (the archive's, or the override), checked."""
        extracted = self.model_extracted_dir
        if extracted is not None and os.path.isdir(extracted):
            untrusted.check_extracted_folder(extracted)
            conf = OmegaConf.load(os.path.join(extracted, self.model_config_yaml))
        else:
            untrusted.check_nemo_archive(restore_path)
            conf = OmegaConf.create(untrusted.read_archive_member(restore_path, self.model_config_yaml).decode())
        if override_config_path is not None:
            conf = override_config_path if isinstance(override_config_path, DictConfig) \
                else OmegaConf.load(override_config_path)
        untrusted.check_model_config(conf)
        peft_files.check_base_reference(conf)  # a PEFT .nemo's base: present and the same file (SHA-256)
        return conf.model if "model" in conf else conf  # NeMo builds from a top-level config's `model`

    def load_config_and_state_dict(self, calling_cls, restore_path, override_config_path=None, map_location=None,
                                   strict=True, return_config=False, *args, **kwargs):
        conf = self._check_before_restore(restore_path, override_config_path)
        if self.before_build is not None and not return_config:
            self.before_build(conf)
        return super().load_config_and_state_dict(calling_cls, restore_path, override_config_path, map_location,
                                                  strict, return_config, *args, **kwargs)

    @staticmethod
    def _load_state_dict_from_disk(model_weights, map_location="cpu"):
        return untrusted.load_weights_marker(model_weights)  # weights_only=True, and it must be our marker
