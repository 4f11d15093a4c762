"""A local Hugging Face causal-LM folder (config.json + safetensors, sharded or not) as NeVA's language model."""
from __future__ import annotations

from nemo_neva.pretrained import LMSource, hf_lm, lm_config
from nemo_neva.pretrained.weights import open_weights


class HFCausalLM(LMSource):
    def __init__(self, folder: str, trust_pickle: bool = False):
        from transformers import AutoConfig

        self.folder = folder
        raw = lm_config.read_config_json(folder)
        self.arch = lm_config.architecture(raw, folder)
        self.family = lm_config.ARCHITECTURES[self.arch]
        self.where = f"{self.arch} at {folder}"
        self.text = AutoConfig.from_pretrained(folder, local_files_only=True)
        self.keys = lm_config.lm_keys_from_hf(self.text, self.family, self.where)
        self.vocab_size = int(self.text.vocab_size)
        self.weights = open_weights(folder, trust_pickle, what="LM")  # missing shard / pickle: refused here
        self.layout = hf_lm.LAYOUTS[self.family]
        base = "transformer" if self.layout == "gpt2" else "model"
        names = self.weights.names()
        # old GPT-2 uploads store the base model's tensors without its prefix ("wte.weight", "h.0....")
        self.prefix = f"{base}." if any(n.startswith(f"{base}.") for n in names) else ""
        self.hf = {"text_model_type": self.text.model_type, "architecture": self.arch,
                   "dtype": lm_config.source_dtype(raw) or "float32",
                   "text_config": lm_config.text_config_dict(self.text)}

    def tokenizer_dir(self) -> str:
        return self.folder

    def table(self, cfg):
        return hf_lm.lm_table(cfg, self.layout, self.prefix, "lm_head.weight")

    def validate(self, cfg) -> None:
        """Every tensor the model needs is in the checkpoint, and the checkpoint has nothing else."""
        used = hf_lm.check_sources(self.weights, self.table(cfg), self.where, "lm_head.weight")
        hf_lm.check_leftovers(self.weights, used, self.where)

    def load(self, gpt, cfg) -> None:
        added = [self.tokenizer.convert_tokens_to_ids(t) for t in self.added_tokens] if self.tokenizer else []
        hf_lm.load_lm(gpt, self.weights, self.table(cfg), self.where, added_rows=added,
                      mean_of_rows=min(self.tokenizer_size, self.vocab_size) or self.vocab_size,
                      lm_head="lm_head.weight")
