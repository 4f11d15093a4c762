"""MegatronNevaModel: a NeMo ModelPT around the NeVA network (config -> modules, steps, save/restore)."""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch
from lightning.pytorch import Trainer
from megatron.core import parallel_state
from nemo.core import ModelPT
from nemo.core.classes.common import PretrainedModelInfo
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.nn.modules.module import _IncompatibleKeys

from nemo_neva import pretrained
from nemo_neva.checkpoint import nemo_connector, nemo_layout
from nemo_neva.cli import resolve_path
from nemo_neva.models import peft
from nemo_neva.modules.language_model import (
    build_gpt,
    build_transformer_config,
    padded_vocab_size,
    params_dtype,
)
from nemo_neva.modules.neva_module import NevaModule
from nemo_neva.modules.projector import build_projector
from nemo_neva.modules.vision import VisionTower, build_image_processor, load_vision_config, tokens_per_image
from nemo_neva.parallel.optimizer import build_megatron_ddp
from nemo_neva.parallel.schedule import run_forward_backward
from nemo_neva.training import megatron_step as mt

log = logging.getLogger(__name__)

_NO_TRAINER_SCHEDULE_STEPS = 1000



def _precision_dtype(trainer: Optional[Trainer]) -> torch.dtype:
    if trainer is None:
        return torch.float32
    precision = str(trainer.precision)
    return params_dtype("bf16" if precision in ("bf16", "bf16-true") else "fp32")


class MegatronNevaModel(ModelPT):
    """NeVA: HF CLIP/SigLIP tower (frozen) + projector + megatron-core GPTModel."""

    def __init__(self, cfg: DictConfig, trainer: Optional[Trainer] = None):
        self._weights_restored = False
        super().__init__(cfg=cfg, trainer=trainer)
        try:
            self._construct(trainer)
        except BaseException:
            # NeMo keeps "a model is being restored" in process-global state and only clears it after a
            # successful load: clear it, or every later fresh model would take itself for a restore.
            self._set_model_restore_state(is_being_restored=False)
            raise

    def _construct(self, trainer: Optional[Trainer]):
        from nemo_neva.parallel.init import ensure_distributed, initialize_model_parallel_from_cfg

        self.automatic_optimization = False  # megatron-core schedules + optimizer do the stepping
        self._ddp = None
        ensure_distributed()
        self._fit_layout_to_world()
        self._record_image_aspect_ratio()
        # model.mm_cfg.llm.from_pretrained: the LM's shape into the config, its tokenizer, weights checked
        self._lm_source = None if self._is_model_being_restored() else pretrained.resolve(self._cfg)
        cfg = self.cfg
        initialize_model_parallel_from_cfg(
            tp=cfg.get("tensor_model_parallel_size", 1),
            pp=cfg.get("pipeline_model_parallel_size", 1),
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.get("num_query_groups") or cfg.num_attention_heads,
            num_layers=cfg.num_layers,
            sequence_parallel=cfg.get("sequence_parallel", False),
            seed=cfg.get("seed", 1234),
        )
        restore_dir = self._restore_folder()
        self.tokenizer, self.image_processor, vision_config = self._load_hf_side(
            cfg, restore_dir, getattr(self._lm_source, "tokenizer", None))
        self.vision_config = vision_config
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no '<image>' token; add it as a special token")
        self.dtype_ = _precision_dtype(trainer)
        self.model = self._build_module(cfg, vision_config, from_pretrained=None if restore_dir else
                                        resolve_path(cfg.mm_cfg.vision_encoder.get("from_pretrained")))
        if self._lm_source is not None:  # each rank reads its own shard of the pretrained LM
            self._lm_source.load(self.model.language_model, cfg)
        peft.apply(self.model, cfg)  # LoRA adapters (model.peft.*), before freezing and loading weights
        self._apply_freeze(cfg)
        if restore_dir:
            from nemo.utils.app_state import AppState

            peft.restore_weights(self, restore_dir, AppState().model_restore_path)
        if trainer is not None and cfg.get("data") is not None and cfg.data.get("data_path"):
            self.setup_training_data(cfg.data)

    # ------------------------------------------------------------------ construction
    def _fit_layout_to_world(self):
        """A .nemo saved at TP/PP > 1 restores on a single process as TP=PP=1 (megatron-core reshards)."""
        import torch.distributed as dist

        tp = self._cfg.get("tensor_model_parallel_size", 1)
        pp = self._cfg.get("pipeline_model_parallel_size", 1)
        if self._is_model_being_restored() and dist.get_world_size() == 1 and tp * pp > 1:
            log.warning("restoring a TP=%d PP=%d checkpoint on one process: using TP=1 PP=1", tp, pp)
            with open_dict(self._cfg):
                self._cfg.tensor_model_parallel_size = 1
                self._cfg.pipeline_model_parallel_size = 1
                self._cfg.sequence_parallel = False

    def _record_image_aspect_ratio(self):
        """`model.data.image_aspect_ratio` always in the config (so in every .nemo written from it): the one
        preprocessing every image path uses (`preprocess_images`). An older .nemo without it restores with
        the default it was trained with (`square`)."""
        from nemo_neva.data.image_io import aspect_ratio_of

        mode = aspect_ratio_of(self._cfg)  # refuses an unknown mode before anything is built
        with open_dict(self._cfg):
            if self._cfg.get("data") is None:
                self._cfg.data = {}
            self._cfg.data.image_aspect_ratio = mode

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
        checked before NeMo extracts or instantiates anything (see nemo_neva.checkpoint.untrusted)."""
        if save_restore_connector is None:
            save_restore_connector = nemo_connector.NevaSaveRestoreConnector()
        try:
            return super().restore_from(restore_path, override_config_path=override_config_path,
                                        map_location=map_location, strict=strict, return_config=return_config,
                                        save_restore_connector=save_restore_connector, trainer=trainer,
                                        validate_access_integrity=validate_access_integrity)
        except BaseException:
            cls._set_model_restore_state(is_being_restored=False)  # see __init__
            raise

    @staticmethod
    def _load_hf_side(cfg, restore_dir, tokenizer=None):
        from transformers import AutoTokenizer

        venc = cfg.mm_cfg.vision_encoder
        if restore_dir:
            tok_path = os.path.join(restore_dir, "tokenizer")
            vision_config = load_vision_config(os.path.join(restore_dir, "vision_config"), None, None)
            processor = build_image_processor(vision_config, os.path.join(restore_dir, "image_processor"))
        else:
            tok_path = resolve_path(cfg.tokenizer.path)
            pretrained = resolve_path(venc.get("from_pretrained"))
            overrides = OmegaConf.to_container(venc.config, resolve=True) if venc.get("config") else None
            vision_config = load_vision_config(pretrained, venc.get("model_type", "clip"), overrides)
            processor = build_image_processor(vision_config, pretrained)
        if tokenizer is not None:  # the pretrained LM's, prepared (nemo_neva.pretrained)
            return tokenizer, processor, vision_config
        if not tok_path or not os.path.isdir(tok_path):
            raise FileNotFoundError(f"model.tokenizer.path={tok_path!r} is not a local tokenizer directory")
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        return tokenizer, processor, vision_config

    def _build_module(self, cfg, vision_config, from_pretrained) -> NevaModule:
        tconfig = build_transformer_config(cfg, self.dtype_)
        pre = parallel_state.is_pipeline_first_stage()
        post = parallel_state.is_pipeline_last_stage()
        rows = max(len(self.tokenizer), int((cfg.get("hf") or {}).get("vocab_size") or 0))  # HF may have spare rows
        vocab = padded_vocab_size(
            rows, cfg.get("make_vocab_size_divisible_by", 128), tconfig.tensor_model_parallel_size
        )
        # megatron-core creates its linear weights in params_dtype but norms and learned positions in fp32;
        # like megatron's Float16Module, keep every LM weight in the training dtype (fp32 masters live in the
        # optimizer).
        gpt = build_gpt(cfg, tconfig, vocab, pre_process=pre, post_process=post).to(self.dtype_)
        tower = projector = None
        venc = cfg.mm_cfg.vision_encoder
        self.tokens_per_image  # noqa: B018  (refuses a projector that cannot take this tower's features)
        if pre:
            tower = VisionTower(vision_config, from_pretrained, venc.get("vision_select_layer", -2),
                                venc.get("drop_cls", True)).to(self.dtype_)
            projector = build_projector(cfg.mm_cfg.mm_mlp_adapter_type, tower.hidden_size, cfg.hidden_size)
            projector.to(self.dtype_)
        return NevaModule(tconfig, gpt, tower, projector, self.image_token_id, venc.get("freeze", True))

    def _apply_freeze(self, cfg):
        """Stage 1 (`mm_cfg.llm.freeze`): only the projector learns. Vision frozen unless asked."""
        freeze_llm = cfg.mm_cfg.llm.get("freeze", False)
        for p in self.model.language_model.parameters():
            p.requires_grad_(not freeze_llm)
        if self.model.vision_tower is not None:
            freeze_vision = cfg.mm_cfg.vision_encoder.get("freeze", True)
            for p in self.model.vision_tower.parameters():
                p.requires_grad_(not freeze_vision)
            if freeze_vision:
                self.model.vision_tower.eval()
        peft.freeze(self.model, cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen tower stays in eval mode (no dropout) even while the rest trains.
        tower = getattr(getattr(self, "model", None), "vision_tower", None)
        if tower is not None and self.model.freeze_vision:
            tower.eval()
        return self

    @property
    def image_aspect_ratio(self) -> str:
        """square | pad | keep: how this model's images are fitted to the tower's input (`model.data`)."""
        from nemo_neva.data.image_io import aspect_ratio_of

        return aspect_ratio_of(self.cfg)

    def preprocess_images(self, images) -> torch.Tensor:
        """PIL image(s) -> pixel values [3,H,W] (a list: [N,3,H,W]) exactly as the training data makes them:
        the model's image processor and `image_aspect_ratio` (generation, evaluation, serving and the
        TensorRT-LLM check all come through here or `nemo_neva.data.image_io.preprocess`)."""
        from nemo_neva.data.image_io import preprocess

        return preprocess(images, self.image_processor, self.image_aspect_ratio)

    @property
    def tokens_per_image(self) -> int:
        return tokens_per_image(self.vision_config, self.cfg.mm_cfg.vision_encoder.get("drop_cls", True),
                                self.cfg.mm_cfg.mm_mlp_adapter_type)

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
                                             getattr(self, "_train_dl", None))
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
        if getattr(self, "_train_dl", None) is not None:
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

    # ------------------------------------------------------------------ forward / loss
    def forward(self, tokens, position_ids, images=None, attention_mask=None, labels=None):
        return self.model(tokens, position_ids, attention_mask=attention_mask, images=images, labels=labels)

    def _thd(self, batch) -> bool:
        """Packed rows go to the attention as THD + PackedSeqParams (cu_seqlens): TE's causal kernels
        ignore a dense mask, so packed samples would attend to each other, and the local spec's
        SDPACoreAttention then attends per sample, quadratic in each sample's length rather than the row's
        (so packing into long rows pays off on CPU too). `model.packed_thd = False` makes the local spec take
        the block-diagonal mask instead (tests compare the two)."""
        return batch.get("segment_ids") is not None and getattr(self, "packed_thd", True)

    def _packed_layout(self, mb: dict) -> dict:
        """THD for packed micro-batches. On the local spec with one pipeline stage and no sequence parallelism
        the rows' padding is left out as well (`to_thd(drop_padding=True)`): pipeline stages exchange
        fixed-shape activations and SP splits the sequence evenly over TP ranks, so those keep it, and so
        does TE (not measured here)."""
        if not self._thd(mb):
            return mb
        from nemo_neva.data.packing import to_thd

        cfg = self.cfg
        drop = (mb.get("row_tokens") is not None and not cfg.get("transformer_engine", False)
                and cfg.get("pipeline_model_parallel_size", 1) == 1 and not cfg.get("sequence_parallel", False))
        return to_thd(mb, drop_padding=drop)

    def loss_from_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked mean next-token loss; a batch with no trainable token gives a finite 0."""
        batch = self._packed_layout(batch)
        per_token = self.model(
            batch["tokens"], batch["position_ids"], attention_mask=batch.get("attention_mask"),
            images=batch.get("images"), labels=batch["labels"], num_images=batch.get("num_images"),
            packed_seq_params=batch.get("packed_seq_params"),
        )
        return mt.masked_mean_loss(per_token, batch["loss_mask"]), batch["loss_mask"].sum()

    def _forward_step(self, data_iterator, model):
        """megatron-core forward_step_func: one micro-batch -> (output, loss_func)."""
        mb = self._packed_layout(next(data_iterator))
        output = model(mb["tokens"], mb["position_ids"], attention_mask=mb.get("attention_mask"),
                       images=mb.get("images"), labels=mb["labels"], num_images=mb.get("num_images"),
                       packed_seq_params=mb.get("packed_seq_params"))

        def loss_func(per_token):
            # megatron-core's per-token path (config.calculate_per_token_loss, set with the DDP): the sum and
            # the token count; the schedule and finalize_model_grads divide by the global batch's tokens
            total, tokens = mt.masked_loss_sum(per_token, mb["loss_mask"])
            return total, tokens, {"loss": torch.stack([total.detach(), tokens.detach().float()])}

        return output, loss_func

    def _run_batch(self, batch, forward_only: bool) -> torch.Tensor:
        """One schedule pass over a data-parallel rank's batch -> [loss sum, loss tokens] of the global batch
        (every rank's micro-batches). Evaluation fills a last partial micro-batch with loss-free rows."""
        if self._ddp is None:  # validation before any training (trainer.validate): wrap without an optimizer,
            # outside Lightning's inference mode (DDP hooks the parameters' autograd and allocates grad buffers)
            with torch.inference_mode(False), torch.enable_grad():
                self._ddp = [build_megatron_ddp(self.model, {"calculate_per_token_loss": True})]
        microbatches = mt.split_microbatches(batch, self.cfg.micro_batch_size, pad=forward_only)
        seq, mbs = batch["tokens"].shape[1], self.cfg.micro_batch_size
        if self._thd(batch):
            seq, mbs = seq * mbs, 1  # THD: pipeline stages exchange [mbs*S, 1, H]
        losses = run_forward_backward(self._ddp, iter(microbatches), self._forward_step, len(microbatches),
                                      seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)
        return mt.reduce_loss_sums(losses)

    def forward_backward(self, batch) -> torch.Tensor:
        """Gradients of a data-parallel rank's batch, reduced over the data-parallel ranks (megatron-core DDP
        main_grad), without the optimizer step; returns the global batch's per-token mean loss."""
        self._ddp[0].zero_grad_buffer()
        return mt.per_token_mean(self._run_batch(batch, forward_only=False))

    def train_on_batch(self, batch, optimizer) -> torch.Tensor:
        """One optimizer step on a data-parallel rank's batch (split into micro-batches). The loss (returned,
        logged as `train_loss`) and its gradients are the mean over every loss token of the global batch."""
        optimizer.zero_grad()
        loss = self.forward_backward(batch)
        optimizer.step()
        return loss

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        start = time.perf_counter()
        loss = self.train_on_batch(batch, opt)
        elapsed = time.perf_counter() - start
        # packed tar shards: the checkpointed position is the trained batches', not the prefetched ones'
        mark_trained = getattr(getattr(self, "_train_dl", None), "mark_trained", None)
        if callable(mark_trained):
            mark_trained()
        bs = batch["tokens"].shape[0]
        adapter = opt.optimizer
        self.log("train_loss", loss, prog_bar=True, batch_size=bs)
        self.log("lr", float(adapter.param_groups[0]["lr"]), batch_size=bs)
        if adapter.last_grad_norm is not None:
            self.log("grad_norm", float(adapter.last_grad_norm), batch_size=bs)
        self.log("tokens_per_sec", batch["tokens"].numel() / max(elapsed, 1e-9), prog_bar=True, batch_size=bs)
        self.log("step_time", elapsed, batch_size=bs)
        self._log_data_skips(batch, bs)
        self._log_mfu(batch, elapsed, bs)
        if torch.cuda.is_available():  # read by scripts/gpu_smoke.sh
            self.log("peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30, batch_size=bs)
        return loss

    def _log_mfu(self, batch, elapsed: float, bs: int) -> None:
        """Model FLOPs/s of this device and their share of its peak (nemo_neva.perf.mfu says how both are got)."""
        from nemo_neva.perf import mfu

        if getattr(self, "_step_flops", None) is None:
            self._step_flops = mfu.step_flops_for(self)
            precision = mfu.training_precision(self.trainer.precision, self.cfg.get("fp8"))
            self._peak_flops, source = mfu.resolve_peak(self.cfg.get("peak_tflops"), precision,
                                                        self.trainer.strategy.root_device)
            log.info("MFU: peak %.1f TFLOP/s per device (%s)", self._peak_flops / 1e12, source)
        images = int(batch["num_images"].sum()) if "num_images" in batch else 0
        flops = self._step_flops(bs, batch["tokens"].shape[1], images) / max(elapsed, 1e-9)
        self.log("model_tflops_per_sec", flops / 1e12, batch_size=bs)
        self.log("mfu", flops / self._peak_flops, batch_size=bs)

    def on_validation_epoch_start(self):
        self._val_sums = None

    def validation_step(self, batch, batch_idx):
        sums = self._run_batch(batch, forward_only=True)
        previous = getattr(self, "_val_sums", None)
        self._val_sums = sums if previous is None else previous + sums
        return mt.per_token_mean(sums)

    def on_validation_epoch_end(self):
        """`val_loss`: the mean over every loss token of the whole validation set (all batches and ranks, the
        last partial batch included), as `train_loss` is over a global batch."""
        sums = getattr(self, "_val_sums", None)
        if sums is not None:
            self.log("val_loss", mt.per_token_mean(sums), prog_bar=True)
        self._val_sums = None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """megatron-core DDP + optimizer + LR schedule (see models/megatron_training.py)."""
        ddp, optimizer = mt.build_training(self.model, self.cfg.optim, self._schedule_steps())
        self._ddp = [ddp]  # a list, so the wrapper is not registered as a second copy of the weights
        return optimizer

    def _schedule_steps(self) -> int:
        """Optimizer steps the LR schedule decays over: `model.optim.sched.max_steps` when set, else the steps
        the trainer will run (`trainer.max_steps`, or `trainer.max_epochs` x optimizer steps per epoch, one per
        training batch, whichever ends first). A run with neither bound is refused."""
        sched = self.cfg.optim.get("sched") or {}
        if sched.get("max_steps"):
            return int(sched.get("max_steps"))
        trainer = self._trainer
        if trainer is None:  # building an optimizer outside a trainer (tests, benchmarks): no run to fit
            log.info("no trainer: the LR schedule decays over %d steps (set model.optim.sched.max_steps)",
                     _NO_TRAINER_SCHEDULE_STEPS)
            return _NO_TRAINER_SCHEDULE_STEPS
        return mt.schedule_steps(trainer)

    # ------------------------------------------------------------------ data
    def build_dataset(self, data_cfg, data_path=None):
        """data_path: a file, shards, a list (concatenated) or a weighted blend [w1, path1, w2, path2, ...]."""
        from nemo_neva.data.blend import BlendedNevaDataset, parse_blend
        from nemo_neva.data.energon import is_energon_path
        from nemo_neva.data.shards import ShardedNevaDataset

        path = data_path if data_path is not None else data_cfg.data_path
        path = OmegaConf.to_object(path) if OmegaConf.is_list(path) else path
        if isinstance(path, str) and is_energon_path(resolve_path(path)):  # data/energon.py (its own blends)
            return self._energon_source(data_cfg, resolve_path(path), validation=data_path is not None)
        paths, weights = parse_blend(path)
        if weights is None:  # one file / shard spec, or a list of them concatenated
            return self._build_source(data_cfg, path)
        sources = [self._build_source(data_cfg, p) for p in paths]
        sharded = [isinstance(s, ShardedNevaDataset) for s in sources]
        if all(sharded):  # streamed: the blend is one more shard order (data/blended_shards.py)
            from nemo_neva.data.blended_shards import BlendedShardedDataset

            return BlendedShardedDataset(sources, weights, names=[str(p) for p in paths])
        if any(sharded):
            raise ValueError("model.data.data_path: a blend mixes tar shards and JSON files; use one kind "
                             "(convert the JSON files with scripts/convert_llava_to_shards.py)")
        return BlendedNevaDataset(sources, weights, seed=self.cfg.get("seed", 1234), names=[str(p) for p in paths])

    def _build_source(self, data_cfg, path):
        from nemo_neva.data.dataset import NevaDataset
        from nemo_neva.data.shards import ShardedNevaDataset, is_shard_spec

        paths = [resolve_path(p) for p in path] if isinstance(path, (list, tuple)) else resolve_path(path)
        if isinstance(paths, str) and "{" in paths:  # a shard pattern: resolve its folder
            paths = os.path.join(resolve_path(os.path.dirname(paths)) or "", os.path.basename(paths))
        if is_shard_spec(paths):  # tar shards from scripts/convert_llava_to_shards.py: streamed
            return ShardedNevaDataset(
                paths, self.tokenizer, self.image_processor,
                template=data_cfg.get("conv_template", "plain"),
                image_aspect_ratio=self.image_aspect_ratio,
                seq_length=data_cfg.get("seq_length") or self.cfg.encoder_seq_length,
                num_image_tokens=self.tokens_per_image, strict=data_cfg.get("strict", False),
                dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(), seed=self.cfg.get("seed", 1234),
                shuffle_buffer=data_cfg.get("shuffle_buffer", 1000),
            )
        return NevaDataset(
            data_path=paths,
            image_folder=resolve_path(data_cfg.get("image_folder")),
            tokenizer=self.tokenizer,
            image_processor=self.image_processor,
            template=data_cfg.get("conv_template", "plain"),
            image_aspect_ratio=self.image_aspect_ratio,
            seq_length=data_cfg.get("seq_length") or self.cfg.encoder_seq_length,
            num_image_tokens=self.tokens_per_image,
            strict=data_cfg.get("strict", False),
        )

    def _energon_source(self, data_cfg, path, validation=False):
        from nemo_neva.data.energon import build_source

        return build_source(data_cfg, path, tokenizer=self.tokenizer, image_processor=self.image_processor,
                            seq_length=data_cfg.get("seq_length") or self.cfg.encoder_seq_length,
                            num_image_tokens=self.tokens_per_image, seed=self.cfg.get("seed", 1234),
                            dp_rank=parallel_state.get_data_parallel_rank(),
                            dp_size=parallel_state.get_data_parallel_world_size(),
                            dp_group=parallel_state.get_data_parallel_group(),
                            split_part=data_cfg.get("energon_val_split", "val") if validation else "train")

    def _loader(self, dataset, data_cfg, shuffle):
        """Each data-parallel rank loads global_batch_size / dp rows per step (its micro-batches).

        With `data.packed_sequence`, a row holds several samples (first-fit-decreasing to seq_length),
        isolated by THD cu_seqlens in the attention (`_thd`), with positions restarting per sample.
        """
        from nemo_neva.checkpoint.data_position import ResumableDistributedSampler
        from nemo_neva.data.collate import NevaCollator
        from nemo_neva.data.packing import PackedCollator, PackedNevaDataset
        from nemo_neva.data.shards import ShardedLoader, ShardedNevaDataset

        dp = parallel_state.get_data_parallel_world_size()
        mt.num_microbatches(self.cfg.global_batch_size, self.cfg.micro_batch_size, dp)
        per_rank = self.cfg.global_batch_size // dp
        if getattr(dataset, "energon_source", False):  # Energon's loader, one per DP rank (data/energon.py)
            return dataset.loader(per_rank, training=shuffle)
        if isinstance(dataset, ShardedNevaDataset):  # order, dp split and epochs live in the dataset
            dataset.shuffle = dataset.drop_remainder = shuffle
            if not shuffle and dataset.total % dp:  # ranks would run different numbers of steps (and hang)
                raise ValueError(f"model.data.validation_data_path: tar shards of {dataset.total} samples on {dp} "
                                 f"data-parallel ranks; validating every sample once needs a multiple of {dp} "
                                 "(or use a JSON/JSONL validation file, which any rank count takes)")
            if data_cfg.get("packed_sequence", False):  # packed windows of the stream (data/packed_shards.py)
                from nemo_neva.data.packed_shards import PackedShardDataset, PackedShardLoader

                seq = data_cfg.get("seq_length") or self.cfg.encoder_seq_length
                return PackedShardLoader(
                    PackedShardDataset(dataset, seq, window=data_cfg.get("pack_window", 1000)), batch_size=per_rank,
                    num_workers=data_cfg.get("num_workers", 0), drop_last=shuffle,
                    collate_fn=PackedCollator(self.tokenizer.pad_token_id, seq_length=seq,
                                              skip_source=dataset.take_new_skips))
            collate = NevaCollator(self.tokenizer.pad_token_id, skip_source=dataset.take_new_skips)
            return ShardedLoader(dataset, batch_size=per_rank, num_workers=data_cfg.get("num_workers", 0),
                                 collate_fn=collate, drop_last=shuffle)
        if data_cfg.get("packed_sequence", False):
            seq = data_cfg.get("seq_length") or self.cfg.encoder_seq_length
            dataset = PackedNevaDataset(dataset, seq)
            collate = PackedCollator(self.tokenizer.pad_token_id, seq_length=seq, skip_source=dataset.take_new_skips)
        else:
            collate = NevaCollator(self.tokenizer.pad_token_id, skip_source=dataset.take_new_skips)
        if shuffle:
            sampler = ResumableDistributedSampler(  # training: passes follow the global step (exact resume)
                dataset, num_replicas=dp, rank=parallel_state.get_data_parallel_rank(), shuffle=True,
                seed=self.cfg.get("seed", 1234), drop_last=True, batch_size=per_rank,
                consumed_fn=self._consumed_samples,
            )
        else:  # evaluation: every sample once, the same number of steps on every rank (data/eval_sampling.py)
            from nemo_neva.data.eval_sampling import EvalBlanks, EvalSampler

            sampler = EvalSampler(len(dataset), dp, parallel_state.get_data_parallel_rank())
            dataset = EvalBlanks(dataset, blank=[] if isinstance(dataset, PackedNevaDataset) else None)
        return torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, num_workers=data_cfg.get("num_workers", 0),
            collate_fn=collate, drop_last=shuffle,
        )

    def _consumed_samples(self) -> int:
        trainer = self._trainer
        return trainer.global_step * self.cfg.global_batch_size if trainer is not None else 0

    def setup_training_data(self, train_data_config):
        from nemo_neva.data.skip_tally import SkipTally

        self._train_ds = self.build_dataset(train_data_config)
        self._train_dl = self._loader(self._train_ds, train_data_config, shuffle=True)
        self._skip_tally = SkipTally(getattr(self._train_ds, "prescan_skips", None))
        if train_data_config.get("validation_data_path"):
            self.setup_validation_data(train_data_config)

    def setup_validation_data(self, val_data_config):
        self._validation_ds = self.build_dataset(val_data_config, val_data_config.validation_data_path)
        self._validation_dl = self._loader(self._validation_ds, val_data_config, shuffle=False)

    def _log_data_skips(self, batch, bs: int) -> None:
        """`data_skipped`: samples skipped so far (before training + while loading, every DP rank's
        DataLoader workers included); gathered over DP only on logging steps (same step on every rank)."""
        tally = getattr(self, "_skip_tally", None)
        if tally is None:
            return
        tally.add(batch)
        every = max(getattr(self._trainer, "log_every_n_steps", 1) or 1, 1) if self._trainer is not None else 1
        if self.global_step % every == 0:
            total = tally.global_counts(parallel_state.get_data_parallel_group())
            self.log("data_skipped", float(sum(total.values())), batch_size=bs)

    def on_train_epoch_end(self):
        summary = getattr(getattr(self, "_train_ds", None), "summary", None)
        if callable(summary):
            log.info("data: %s", summary())
        self._report_skips("so far")

    def on_train_end(self):
        self._report_skips("in training")

    def _report_skips(self, when: str) -> None:
        """Skip totals by reason over all DP ranks and workers; a warning with the fix when many are lost."""
        from nemo_neva.data.skip_tally import skip_report

        tally = getattr(self, "_skip_tally", None)
        if tally is None:
            return
        counts = tally.global_counts(parallel_state.get_data_parallel_group())
        line, loud = skip_report(counts, getattr(getattr(self, "_train_ds", None), "total", None))
        if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
            (log.warning if loud else log.info)("data %s: %s", when, line)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, images, prompts, **kwargs):
        """Answer text for each (image, prompt); see nemo_neva.inference.generate for the options."""
        from nemo_neva.inference.generate import generate

        return generate(self, images, prompts, **kwargs)
