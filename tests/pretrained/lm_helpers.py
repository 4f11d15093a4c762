"""Tiny random Hugging Face causal LMs (2 layers, hidden 64) with tokenizers of their own kind, written locally
with save_pretrained: the oracles' checkpoints. No downloads."""
import os

import torch
from omegaconf import open_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = ["A chat between a curious user and an artificial intelligence assistant.",
         "USER: What colour is the shape? ASSISTANT: The shape is red.",
         "a red circle on a blue background", "What is the capital of France? Paris is the capital of France.",
         "Describe the image briefly. A green square at the top left.", "Hello there, how are you today?"] * 4
# SmolLM2-style chat template (chatml), so conv_template=hf_chat_template has one to use.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def metaspace_tokenizer(vocab_size=400):
    """SentencePiece-style (Llama 2 / Mistral v0.1): BPE with byte fallback + Metaspace(prepend_scheme=first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    trial = Tokenizer(models.BPE(unk_token="<unk>"))
    trial.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trial.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials,
                                                         show_progress=False))
    learned = sorted(trial.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}  # Llama's layout
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in __import__("json").loads(trial.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)


def byte_level_tokenizer(vocab_size=400, eos="<|endoftext|>", extra=()):
    """GPT-2 / Qwen2 style byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos, *extra],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=None,
                                   clean_up_tokenization_spaces=False)


FAMILIES = ("llama", "mistral", "qwen2", "nemotron", "gpt2")


def make_tiny_lm(family, out_dir, seed=0, dtype=None, chat_template=None, **config_overrides):
    """Write a random `family` causal LM + tokenizer to `out_dir`; returns the HF model (eval, fp32)."""
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, NemotronConfig,
                              Qwen2Config)

    if family in ("qwen2", "gpt2"):
        tok = byte_level_tokenizer(extra=("<|im_start|>", "<|im_end|>") if family == "qwen2" else ())
    else:
        tok = metaspace_tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    vocab = len(tok)
    common = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **common)
    if family == "llama":
        config = LlamaConfig(**{"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
                                **llama_like, **config_overrides})
    elif family == "mistral":
        config = MistralConfig(**{"sliding_window": None, **llama_like, **config_overrides})
    elif family == "qwen2":
        config = Qwen2Config(**{**llama_like, "tie_word_embeddings": True, **config_overrides})
    elif family == "nemotron":
        config = NemotronConfig(**{**llama_like, **config_overrides})
    else:
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **{**common, **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # every tensor (norm gains included) off its init value, so a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model.float().eval()


def neva_cfg(lm_dir, **overrides):
    """The shipped pretrain config (tiny vision tower) with the LM from `lm_dir`, as the example script makes it:
    LM keys not given are cleared (they come from the checkpoint), tokenizer = the LM's own."""
    from omegaconf import OmegaConf

    from nemo_neva.pretrained.lm_config import drop_unset_lm_keys
    from tests.model.helpers import tiny_model_cfg

    cfg = tiny_model_cfg(**{"mm_cfg.llm.from_pretrained": lm_dir})
    given = [f"model.{k}" for k in overrides]
    drop_unset_lm_keys(cfg, given)
    with open_dict(cfg):
        cfg.tokenizer.path = None
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def lm_logits(model, ids):
    """Text-only logits of the NeVA LM (full vocabulary gathered over TP)."""
    pos = torch.arange(ids.shape[1]).expand_as(ids).clone()
    model.eval()
    with torch.no_grad():
        return model.model(ids, pos, runtime_gather_output=True)


def probe_ids(vocab, n=2, seq=20, seed=1):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def parallel_lm_worker(rank, world_size, lm_dirs, tp, pp, ids):
    """One rank of a TP/PP NeVA built from each pretrained LM: gathered logits (PP=1) or, at PP>1, this stage's
    LM parameters by global layer number (to compare with a TP=1 build)."""
    from megatron.core import parallel_state

    from nemo_neva import build_model

    out = {}
    for lm_dir in lm_dirs:
        model = build_model(neva_cfg(lm_dir, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        if pp == 1:
            out[lm_dir] = lm_logits(model, ids)
        else:
            gpt = model.model.language_model
            offset = gpt.decoder.layers[0].layer_number - 1
            params = {}
            for name, p in gpt.named_parameters():
                parts = name.split(".")
                if name.startswith("decoder.layers."):
                    parts[2] = str(int(parts[2]) + offset)
                params[".".join(parts)] = p.detach().clone()
            out[lm_dir] = (parallel_state.get_pipeline_model_parallel_rank(), params)
    return out
