"""Importers of other people's checkpoints: NeVA from a pretrained LM (`model.mm_cfg.llm.from_pretrained`).

  lm_config   HF causal-LM config.json -> NeVA LM keys (architectures, refusals, overrides, TP sizes)
  hf_lm       HF <-> megatron-core GPTModel tensor tables; per-rank streamed loading; export
  weights     memory-mapped safetensors (sharded index included), pickle refused unless trusted
  tokenizer   the LM's own tokenizer with `<image>` and template markers added
  mcore_gpt   a megatron-core GPTModel distributed checkpoint (Megatron-LM torch_dist, NeMo 1 mcore GPT)

`MegatronNevaModel` calls `resolve(cfg)` while constructing a fresh model (not when restoring a .nemo): the
checkpoint's LM shape is written into the config, weights and tokenizer are checked, and nothing heavy happens
before every check passed; after the network is built, `source.load(gpt)` fills the LM on each rank.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from nemo_neva.pretrained.weights import UnsupportedCheckpoint

log = logging.getLogger(__name__)

__all__ = ["resolve", "UnsupportedCheckpoint", "LMSource"]


class LMSource:
    """A pretrained LM: `keys` (its NeVA LM config keys), `hf` (what `model.hf` records), `tokenizer`
    (prepared, or None when model.tokenizer.path names another one), `load(gpt)`."""

    where: str
    tokenizer = None
    added_tokens: list = []
    tokenizer_size: int = 0

    def load(self, gpt) -> None:
        raise NotImplementedError


def from_pretrained_path(cfg) -> Optional[str]:
    from nemo_neva.cli import resolve_path

    llm = (cfg.get("mm_cfg") or {}).get("llm") or {}
    return resolve_path(llm.get("from_pretrained")) or None


def _open_source(folder: str, cfg) -> LMSource:
    from nemo_neva.pretrained import mcore_gpt
    from nemo_neva.pretrained.hf_causal_lm import HFCausalLM

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model.mm_cfg.llm.from_pretrained={folder!r} is not a local directory")
    if mcore_gpt.is_mcore_checkpoint(folder):
        return mcore_gpt.McoreGPT(folder)
    return HFCausalLM(folder, trust_pickle=bool(cfg.mm_cfg.llm.get("trust_pickle", False)))


def resolve(cfg) -> Optional[LMSource]:
    """For a fresh model with `model.mm_cfg.llm.from_pretrained`: fill the LM keys of `cfg` from the checkpoint
    (an explicit contradicting value is an error naming both), check TP against its heads, prepare the
    tokenizer and check every weight is there with the right shape. Returns the source to `load` from."""
    from omegaconf import open_dict

    from nemo_neva.pretrained.lm_config import apply_lm_keys, check_tp
    from nemo_neva.pretrained.tokenizer import prepare_tokenizer
    from nemo_neva.cli import resolve_path

    folder = from_pretrained_path(cfg)
    if not folder:
        return None
    source = _open_source(folder, cfg)
    check_tp(source.keys, int(cfg.get("tensor_model_parallel_size", 1)), source.where)
    with open_dict(cfg):
        apply_lm_keys(cfg, source.keys, source.where)
        tok_path = resolve_path((cfg.get("tokenizer") or {}).get("path")) or source.tokenizer_dir()
        template = (cfg.get("data") or {}).get("conv_template")
        tok, added, before = prepare_tokenizer(tok_path, source.vocab_size, template, source.where)
        source.tokenizer, source.added_tokens, source.tokenizer_size = tok, added, before
        cfg.hf = {**source.hf, "vocab_size": max(source.vocab_size, len(tok)),
                  "added_tokens": list(added), "source": folder}
    if added:
        log.info("added %s to the tokenizer of %s (embedding rows: mean of the existing ones)", added, folder)
    source.validate(cfg)
    return source
