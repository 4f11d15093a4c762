"""A megatron-core GPTModel distributed checkpoint as NeVA's language model.

What Megatron-LM `--ckpt-format torch_dist` writes and what a NeMo 1 mcore GPT `.nemo` holds (extracted):
a folder with `model_config.yaml` (NeMo-style model keys: num_layers, hidden_size, ...) and the dist checkpoint
in `model_weights/` (or in the folder itself). Its tensors are `GPTModel.sharded_state_dict()`'s, the names
NeVA's LM already uses, so megatron-core's own `dist_checkpointing.load` reshards them to this run's TP/PP
layout (every rank reads only its shard). The key prefix ("model." for NeMo, none for Megatron-LM) is found
from the checkpoint's metadata. The tokenizer is `model.tokenizer.path`, else the folder's `tokenizer/`.
"""
from __future__ import annotations

import os

from nemo_neva.pretrained import LMSource
from nemo_neva.pretrained.lm_config import LM_KEYS
from nemo_neva.pretrained.weights import UnsupportedCheckpoint

_EMBED = "embedding.word_embeddings.weight"
_DEFAULTS = {"num_query_groups": None, "kv_channels": None, "position_embedding_type": "learned_absolute",
             "rotary_base": 10000, "rotary_percentage": 1.0, "rope_scaling": None, "normalization": "LayerNorm",
             "layernorm_epsilon": 1e-5, "activation": "gelu", "bias": True, "qkv_bias": False,
             "share_embeddings_and_output_weights": True}


def _weights_dir(folder: str) -> str:
    inner = os.path.join(folder, "model_weights")
    return inner if os.path.isfile(os.path.join(inner, "metadata.json")) else folder


def is_mcore_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(_weights_dir(folder), "metadata.json"))


class McoreGPT(LMSource):
    def __init__(self, folder: str):
        from omegaconf import OmegaConf

        self.folder, self.weights_dir = folder, _weights_dir(folder)
        self.where = f"the megatron-core GPT checkpoint at {folder}"
        config_path = os.path.join(folder, "model_config.yaml")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{folder}: a megatron-core dist checkpoint needs its model config as "
                                    "model_config.yaml (NeMo-style keys: num_layers, hidden_size, ...) beside it")
        raw = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
        missing = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads") if k not in raw]
        if missing:
            raise UnsupportedCheckpoint(f"{config_path}: no {', '.join(missing)}")
        if "encoder_seq_length" not in raw and "max_position_embeddings" not in raw:
            raise UnsupportedCheckpoint(f"{config_path}: no encoder_seq_length / max_position_embeddings")
        raw.setdefault("encoder_seq_length", raw.get("max_position_embeddings"))
        self.keys = {k: raw.get(k, _DEFAULTS.get(k)) for k in LM_KEYS}
        self.keys["num_query_groups"] = self.keys["num_query_groups"] or self.keys["num_attention_heads"]
        self.keys["kv_channels"] = self.keys["kv_channels"] or self.keys["hidden_size"] // self.keys["num_attention_heads"]
        self.prefix, self.rows = self._find_embedding()
        self.vocab_size = self.rows
        self.hf = {"text_model_type": "mcore_gpt", "dtype": "float32"}

    def _find_embedding(self) -> tuple[str, int]:
        from megatron.core.dist_checkpointing import load_tensors_metadata

        meta = load_tensors_metadata(self.weights_dir)
        for key, tensor in meta.items():
            if key.endswith(_EMBED):
                return key[: -len(_EMBED)], int(tensor.global_shape[0])
        raise UnsupportedCheckpoint(f"{self.where}: no {_EMBED} in the checkpoint (not a GPTModel?)")

    def tokenizer_dir(self) -> str:
        path = os.path.join(self.folder, "tokenizer")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{self.where}: no tokenizer/ folder; set model.tokenizer.path")
        return path

    def validate(self, cfg) -> None:
        from nemo_neva.modules.language_model import padded_vocab_size

        rows = padded_vocab_size(max(len(self.tokenizer), self.rows), cfg.get("make_vocab_size_divisible_by", 128),
                                 cfg.get("tensor_model_parallel_size", 1))
        if rows != self.rows:
            raise UnsupportedCheckpoint(f"{self.where}: its embedding has {self.rows} rows but this model's padded "
                                        f"vocabulary has {rows} (tokenizer of {len(self.tokenizer)} tokens, "
                                        "make_vocab_size_divisible_by); use the checkpoint's tokenizer and padding")

    def load(self, gpt, cfg) -> None:
        """megatron-core's own load, resharded to this rank's TP/PP piece."""
        from nemo_neva.parallel.dist_ckpt import load_sharded

        sharded = gpt.sharded_state_dict(prefix=self.prefix)
        sharded = {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}
        state = load_sharded(sharded, self.weights_dir)
        state = {k[len(self.prefix):]: v for k, v in state.items()}
        missing, unexpected = gpt.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise UnsupportedCheckpoint(f"{self.where}: missing {missing[:4]}, unexpected {unexpected[:4]}")
