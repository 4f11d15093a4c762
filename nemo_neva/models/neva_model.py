"""MegatronNevaModel: a NeMo ModelPT around the NeVA network. This file builds it (resolved config ->
tokenizer and image processor, modules, weights, freezing); the rest of the ModelPT contract is in three mixins:
neva_restore.py (save / restore), training/neva_step.py (forward, loss, steps, optimizer), neva_data.py
(datasets, loaders, skip reports)."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from lightning.pytorch import Trainer
from megatron.core import parallel_state
from nemo.core import ModelPT
from omegaconf import DictConfig, OmegaConf

from nemo_neva import pretrained
from nemo_neva.cli import resolve_path
from nemo_neva.models import peft
from nemo_neva.models.model_config import resolve_model_config
from nemo_neva.models.neva_data import NevaDataMixin
from nemo_neva.models.neva_restore import NevaRestoreMixin
from nemo_neva.training.neva_step import NevaStepMixin, StepState
from nemo_neva.modules.language_model import (
    build_gpt,
    build_transformer_config,
    padded_vocab_size,
    params_dtype,
)
from nemo_neva.modules.neva_module import NevaModule
from nemo_neva.modules.projector import build_projector
from nemo_neva.modules.vision import VisionTower, build_image_processor, load_vision_config, tokens_per_image
from nemo_neva.parallel.init import ensure_parallel, require_parallel

log = logging.getLogger(__name__)


def _no_init_weights(skip: bool):
    """transformers' switch that leaves a new model's weights uninitialised (they are loaded right after);
    a no-op when `skip` is False or this transformers has no such switch."""
    import contextlib

    if skip:
        try:
            from transformers.initialization import no_init_weights

            return no_init_weights()
        except ImportError:
            pass
    return contextlib.nullcontext()


def _precision_dtype(trainer: Optional[Trainer]) -> torch.dtype:
    if trainer is None:
        return torch.float32
    precision = str(trainer.precision)
    return params_dtype("bf16" if precision in ("bf16", "bf16-true") else "fp32")


class MegatronNevaModel(NevaRestoreMixin, NevaStepMixin, NevaDataMixin, ModelPT):
    """NeVA: HF CLIP/SigLIP tower (frozen) + projector + megatron-core GPTModel.

    Built in this order: the config resolved (`model_config.resolve_model_config`), the parallel layout checked
    (set up and seeded by the caller: `nemo_neva.build_model`, `parallel.init.setup_parallel`), the network built
    from the config (`_build`), its weights loaded; data loaders come when Lightning asks (`setup`)."""

    def __init__(self, cfg: DictConfig, trainer: Optional[Trainer] = None, weights_loaded_after: bool = False):
        """`weights_loaded_after`: the caller overwrites every weight right after (the HF LLaVA converter), so
        the network skips its random initialisation, as it does for a .nemo restore and a pretrained LM."""
        self._weights_restored = False
        self._weights_loaded_after = weights_loaded_after
        self.step_state = StepState()
        try:
            restoring = self._is_model_being_restored()
            cfg, lm_source = resolve_model_config(cfg, restoring=restoring)
            if restoring:
                # a no-op after MegatronNevaModel.restore_from's set-up; NeMo's generic ModelPT.restore_from
                # builds the model from the archive's config with no hook before it, so it is set up here
                ensure_parallel(cfg)
            else:
                require_parallel(cfg)  # starts nothing: a fresh model's layout is its caller's (build_model)
            super().__init__(cfg=cfg, trainer=trainer)
            self._build(trainer, lm_source)
        except BaseException:
            # NeMo keeps "a model is being restored" in process-global state and only clears it after a
            # successful load: clear it, or every later fresh model would take itself for a restore.
            self._set_model_restore_state(is_being_restored=False)
            raise

    # ------------------------------------------------------------------ construction
    def _build(self, trainer: Optional[Trainer], lm_source: Optional[pretrained.LMSource]):
        """The network from the resolved config, then its weights: a .nemo's, a pretrained LM's, or random
        ones (drawn from the RNGs as the caller seeded them: `setup_parallel` seeds them with `model.seed`);
        then PEFT adapters and freezing."""
        cfg = self.cfg
        self.automatic_optimization = False  # megatron-core schedules + optimizer do the stepping
        restore_dir = self._restore_folder()
        self.tokenizer, self.image_processor, vision_config = self._load_hf_side(
            cfg, restore_dir, getattr(lm_source, "tokenizer", None))
        self.vision_config = vision_config
        venc = cfg.mm_cfg.vision_encoder
        drop_cls, kind = venc.get("drop_cls", True), cfg.mm_cfg.mm_mlp_adapter_type
        # refuses a projector that cannot take this tower's features, before anything is built
        per_image = tokens_per_image(vision_config, drop_cls, kind)
        self.tiling = self._build_tiling(cfg, vision_config, per_image)
        self.frame_pool = self._build_frame_pool(cfg, vision_config)
        counts = (per_image, tokens_per_image(vision_config, drop_cls, kind, self.frame_pool))
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no '<image>' token; add it as a special token")
        self.dtype_ = _precision_dtype(trainer)
        # A random init that the loading below overwrites is skipped: the LM's when every LM weight is loaded
        # (.nemo, pretrained LM, converter), the vision tower's when it is loaded too (.nemo, converter).
        all_loaded = bool(restore_dir) or self._weights_loaded_after
        self.model = self._build_module(cfg, vision_config, counts, from_pretrained=None if restore_dir else
                                        resolve_path(venc.get("from_pretrained")),
                                        lm_loaded=all_loaded or lm_source is not None, tower_loaded=all_loaded)
        if lm_source is not None:  # each rank reads its own shard of the pretrained LM
            lm_source.load(self.model.language_model, cfg)
        peft.apply(self.model, cfg)  # LoRA adapters (model.peft.*), before freezing and loading weights
        self._apply_freeze(cfg)
        if restore_dir:
            from nemo.utils.app_state import AppState

            peft.restore_weights(self, restore_dir, AppState().model_restore_path)

    def setup(self, stage: Optional[str] = None):
        """Lightning's hook before fit / validate: the loaders of `model.data` are built here, not by the
        constructor (a model built for generation or export reads no data)."""
        super().setup(stage)
        data = self.cfg.get("data")
        if data is None:
            return
        if stage == "fit" and self._train_dl is None and data.get("data_path"):
            self.setup_training_data(data)  # and the validation loader, with validation_data_path
        elif stage == "validate" and not self._validation_dl and data.get("validation_data_path"):
            self.setup_validation_data(data)

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

    def _build_module(self, cfg, vision_config, counts: tuple[int, int], from_pretrained, lm_loaded: bool = False,
                      tower_loaded: bool = False) -> NevaModule:
        """`counts`: placeholder tokens of one image and of one video frame (`modules.vision.tokens_per_image`)."""
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
        gpt = build_gpt(cfg, tconfig, vocab, pre_process=pre, post_process=post,
                        initialize=not lm_loaded).to(self.dtype_)
        tower = projector = None
        venc = cfg.mm_cfg.vision_encoder
        if pre:
            with _no_init_weights(tower_loaded and not from_pretrained):
                tower = VisionTower(vision_config, from_pretrained, venc.get("vision_select_layer", -2),
                                    venc.get("drop_cls", True)).to(self.dtype_)
            projector = build_projector(cfg.mm_cfg.mm_mlp_adapter_type, tower.hidden_size, cfg.hidden_size)
            projector.to(self.dtype_)
        return NevaModule(tconfig, gpt, tower, projector, self.image_token_id, venc.get("freeze", True), self.tiling,
                          self.frame_pool, *counts)

    def _build_frame_pool(self, cfg, vision_config):
        """`model.mm_cfg.video.pool` as a `nemo_neva.modules.frame_pool.FramePool`, or None when off."""
        from nemo_neva.modules.frame_pool import frame_pool_from_cfg
        from nemo_neva.modules.vision import tower_features

        pool = frame_pool_from_cfg(cfg.mm_cfg, tower_features(vision_config,
                                                              cfg.mm_cfg.vision_encoder.get("drop_cls", True)))
        if pool is not None and self.tiling is not None:
            raise ValueError("model.mm_cfg.video.pool does not apply with model.mm_cfg.image_tiling (video samples "
                             "are not supported with tiling): set one of them")
        return pool

    def _build_tiling(self, cfg, vision_config, per_image: int):
        """`model.mm_cfg.image_tiling` (anyres) as a `nemo_neva.modules.tiling.Tiling`, or None when off;
        `per_image`: an untiled image's (a tile's) placeholder tokens."""
        from nemo_neva.modules.tiling import tiling_from_cfg

        tiling = tiling_from_cfg(cfg.mm_cfg.get("image_tiling"), vision_config, per_image)
        if tiling is not None and cfg.mm_cfg.get("mm_mlp_adapter_type") == "mlp_downsample":
            # anyres lays a tile's tokens out row by row; NeMo 1's merge emits them column block by column block
            raise ValueError("model.mm_cfg.mm_mlp_adapter_type=mlp_downsample (NeMo 1's block order) does not apply "
                             "with model.mm_cfg.image_tiling: use mlp2x_gelu, or turn tiling off")
        if tiling is not None and self.image_aspect_ratio != "square":
            raise ValueError(f"model.data.image_aspect_ratio={self.image_aspect_ratio!r} does not apply with "
                             "model.mm_cfg.image_tiling (tiles keep the aspect ratio; the base thumbnail is "
                             "stretched as LLaVA-NeXT does): leave it at 'square'")
        return tiling

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

    @property
    def processor(self):
        """The model's `nemo_neva.data.processor.NevaProcessor` (tokenizer, image preprocessing, placeholder
        counts, context check): built from the model's parts on first use, again only when one of them changes."""
        from nemo_neva.data.processor import NevaProcessor

        key = (id(self.tokenizer), id(self.image_processor), id(self.tiling), self.image_aspect_ratio,
               self.tokens_per_image, self.tokens_per_frame, int(self.cfg.encoder_seq_length))
        cached = self.__dict__.get("_processor_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_processor_cache"] = (key, NevaProcessor(
                self.tokenizer, self.image_processor, self.tokens_per_image, self.tokens_per_frame,
                self.image_aspect_ratio, self.tiling, int(self.cfg.encoder_seq_length)))
        return cached[1]

    # Thin delegations kept for the many callers (tests, the dataset builders) that ask the model.
    def preprocess_images(self, images) -> torch.Tensor:
        """`self.processor.preprocess_images`: PIL image(s) -> pixel values as the training data makes them."""
        return self.processor.preprocess_images(images)

    @property
    def pixel_processor(self):
        """`self.processor.pixel_processor`: the HF image processor `preprocess_images` runs."""
        return self.processor.pixel_processor

    def image_token_count(self, image) -> int:
        """`self.processor.image_token_count`: placeholder tokens one image (PIL) becomes."""
        return self.processor.image_token_count(image)

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens of one image (of one tile, for a tiled model: see `image_token_count`)."""
        return self.model.tokens_per_image

    @property
    def tokens_per_frame(self) -> int:
        """Placeholder tokens of one video frame: pooled by `model.mm_cfg.video.pool`, else an image's."""
        return self.model.tokens_per_frame

    # ------------------------------------------------------------------ inference
    @property
    def pads_in_cached_steps(self) -> bool:
        """Whether the network's core attention honours a padding mask in cached decode steps: ours
        (`SDPACoreAttention`, the local spec) does, Transformer Engine's drops it there. Generation batches
        prompts of different lengths only when it does (`nemo_neva.inference.model_protocol`)."""
        from nemo_neva.modules.layer_specs import SDPACoreAttention

        return any(isinstance(m, SDPACoreAttention) for m in self.model.modules())

    @torch.no_grad()
    def generate(self, images, prompts, config=None, **kwargs):
        """Answer text for each (image, prompt) under `config` (a `GenerationConfig`); see
        nemo_neva.inference.generate for the options."""
        from nemo_neva.inference.generate import generate

        return generate(self, images, prompts, config, **kwargs)
