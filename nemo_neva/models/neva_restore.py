"""MegatronNevaModel's save / restore side: the `.nemo` (written by our connector, restored through NeMo with
its untrusted-input checks first) and the weights of resumable training checkpoints."""
from __future__ import annotations

import logging
import os
from typing import Optional

from lightning.pytorch import Trainer
from nemo.core.classes.common import PretrainedModelInfo
from torch.nn.modules.module import _IncompatibleKeys

from nemo_neva.checkpoint import nemo_connector, nemo_layout
from nemo_neva.models import peft

log = logging.getLogger(__name__)


def _set_up_layout(conf) -> None:
    """This process's parallel layout for the config a .nemo restores from (a restore is an entry point)."""
    from nemo_neva.models.model_config import resolve_model_config
    from nemo_neva.parallel.init import ensure_parallel

    ensure_parallel(resolve_model_config(conf, restoring=True).cfg)


class NevaRestoreMixin:
    """`.nemo` save / restore and training-checkpoint weights of MegatronNevaModel (a mixin of it)."""

    def _restore_folder(self) -> Optional[str]:
        if not self._is_model_being_restored():
            return None
        from nemo.utils.app_state import AppState

        folder = AppState().nemo_file_folder
        if folder and os.path.isdir(os.path.join(folder, nemo_layout.WEIGHTS_DIR)):
            self._check_restore_source(folder, AppState().model_restore_path)
            return folder
        raise FileNotFoundError(
            f"this .nemo has no {nemo_layout.WEIGHTS_DIR}/ folder: it was not written by nemo_neva"
        )

    def _check_restore_source(self, folder: str, archive: Optional[str]) -> None:
        """Untrusted-input checks both restore routes share (ours and NeMo's generic ModelPT.restore_from):
        NeMo's extractor only *skips* unsafe tar members, so re-scan the archive and refuse; refuse
        symlinks/special files in the folder, a foreign config target, and a weights marker that is not
        plain data (read with weights_only=True before NeMo's own torch.load of it)."""
        from nemo_neva.checkpoint import untrusted as security

        if archive and os.path.isfile(archive):
            security.check_nemo_archive(archive)
        security.check_extracted_folder(folder)
        security.check_model_config(self._cfg)
        security.load_weights_marker(os.path.join(folder, nemo_layout.MARKER_FILE))

    @classmethod
    def restore_from(cls, restore_path: str, override_config_path=None, map_location=None, strict: bool = True,
                     return_config: bool = False, save_restore_connector=None, trainer: Optional[Trainer] = None,
                     validate_access_integrity: bool = True):
        """NeMo's restore_from with our connector by default: the archive and its config `target` are
        checked before NeMo extracts or instantiates anything (see nemo_neva.checkpoint.untrusted). Before the
        model is built, this process's parallel layout is set up for the config it restores (its archive's or
        `override_config_path`), unless it runs that layout already: a restore is an entry point."""
        if save_restore_connector is None:
            save_restore_connector = nemo_connector.NevaSaveRestoreConnector(before_build=_set_up_layout)
        try:
            return super().restore_from(restore_path, override_config_path=override_config_path,
                                        map_location=map_location, strict=strict, return_config=return_config,
                                        save_restore_connector=save_restore_connector, trainer=trainer,
                                        validate_access_integrity=validate_access_integrity)
        except BaseException:
            cls._set_model_restore_state(is_being_restored=False)  # see __init__
            raise

    # ------------------------------------------------------------------ save / restore
    def save_hf_files(self, folder: str):
        self.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        self.image_processor.save_pretrained(os.path.join(folder, "image_processor"))
        self.vision_config.save_pretrained(os.path.join(folder, "vision_config"))

    def save_to(self, save_path: str):
        """Write a `.nemo` (all ranks must call this: the weights are a distributed checkpoint)."""
        # Always our connector: NeMo's restore_from resets the instance's connector to its default one.
        return nemo_connector.NevaSaveRestoreConnector().save_to(self, str(save_path))

    def _load_dist_weights(self, ckpt_dir: str, keep=None):
        """Load `model_weights/`; `keep(key)` limits it to part of the model (PEFT: base or adapters)."""
        from nemo_neva.checkpoint.untrusted import check_dist_checkpoint
        from nemo_neva.parallel.dist_ckpt import load_sharded

        check_dist_checkpoint(ckpt_dir)  # megatron-core/torch DCP unpickle parts of it: validate them first
        sharded = self.model.sharded_state_dict(prefix="model.")
        if keep is not None:
            sharded = {k: v for k, v in sharded.items() if keep(k)}
        self.load_checkpoint_weights(load_sharded(sharded, ckpt_dir), keep)
        self._weights_restored = True

    # ------------------------------------------------------------------ training checkpoints (resume)
    def checkpoint_sharded_state(self, is_loading: bool) -> dict:
        """Weights + optimizer state as megatron-core sharded state dicts (see nemo_neva.checkpoint.training_checkpoint)."""
        from nemo_neva.checkpoint.training_checkpoint import optimizer_sharded_state

        model_sd = self.model.sharded_state_dict(prefix="model.")
        keep = self._checkpoint_keep()
        if keep is not None:
            model_sd = {k: v for k, v in model_sd.items() if keep(k)}
        megatron_opt = self.optimizers(use_pl_optimizer=False).megatron_optimizer
        opt_sd = optimizer_sharded_state(megatron_opt, model_sd, is_loading)
        return {"model": model_sd, "optimizer": opt_sd}

    def _checkpoint_keep(self):
        """PEFT on a base .nemo: training checkpoints hold adapters + projector only (as its .nemo does); the
        frozen base is the base .nemo's, which the PEFT run loads (checksum-verified) before it resumes."""
        if peft.lora_settings(self.cfg) is not None and self.cfg.peft.get("base_nemo_path"):
            return peft.is_peft_key
        return None

    def load_checkpoint_weights(self, state: dict, keep=None) -> None:
        keep = keep or self._checkpoint_keep()
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state") and (keep is None or keep("model." + k))]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model: missing={missing} unexpected={unexpected}")

    def on_save_checkpoint(self, checkpoint):
        from nemo_neva.checkpoint.data_position import data_state

        checkpoint["neva_data"] = data_state(self.trainer.global_step, self.cfg.global_batch_size,
                                             self._train_dl)
        if self._checkpoint_keep() is not None:
            checkpoint["neva_peft_base_sha256"] = self.cfg.peft.base_nemo_sha256

    def on_load_checkpoint(self, checkpoint):
        from nemo_neva.checkpoint.data_position import restore_data_position

        # Lightning saves mid-epoch checkpoints before counting the step's batch, so its logging step would
        # trail global_step by one after a resume: one step per batch here, so they are equal.
        saved_base = checkpoint.get("neva_peft_base_sha256")
        if saved_base is not None and saved_base != self.cfg.peft.get("base_nemo_sha256"):
            raise ValueError(f"this training checkpoint's adapters were trained on the base .nemo with SHA-256 "
                             f"{saved_base}, but model.restore_from_path is now {self.cfg.peft.base_nemo_path} "
                             f"(SHA-256 {self.cfg.peft.get('base_nemo_sha256')}); resume with the same base")
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epoch_loop = fit_loop.get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in epoch_loop and "global_step" in checkpoint:
            epoch_loop["_batches_that_stepped"] = checkpoint["global_step"]
        # For the same reason its batch counter restarts one batch back (it resets `ready` to `completed`),
        # so the resumed epoch's batch_idx would trail the uninterrupted run's; the saved batch was trained.
        for progress in fit_loop.get("epoch_loop.batch_progress", {}).values():
            if isinstance(progress, dict) and progress.get("processed", 0) > progress.get("completed", 0):
                progress["completed"] = progress["processed"]
        if self._train_dl is not None:
            restore_data_position(self._train_dl, checkpoint.get("neva_data"), self.cfg.global_batch_size)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if nemo_layout.is_weights_marker(state_dict):
            # NeMo's connector hands us the marker; the weights were loaded from model_weights/ already.
            if not self._weights_restored:
                raise RuntimeError("the .nemo weights were not restored from its model_weights/ folder")
            return _IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def list_available_models(cls) -> Optional[PretrainedModelInfo]:
        return None
