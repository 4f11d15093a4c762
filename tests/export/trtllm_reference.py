"""An independent pure-torch forward of a TensorRT-LLM checkpoint (config.json + rank{N}.safetensors).

Written from TensorRT-LLM's model semantics, not from our exporter: each TP rank computes its column-parallel
slice (its q heads, its KV heads, its fc/gate rows) and its partial row-parallel product; partial products are
summed (the all-reduce) and the row-parallel bias added once; lm_head slices are concatenated. The prompt table
is emulated the way TensorRT-LLM's PromptTuningEmbedding looks ids up: id < vocab_size -> word embedding,
id >= vocab_size -> row (id - vocab_size) of the table. GELU is TensorRT-LLM's tanh form.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def load_checkpoint(folder):
    config = json.load(open(os.path.join(folder, "config.json")))
    ranks = [load_file(os.path.join(folder, f"rank{r}.safetensors")) for r in range(config["mapping"]["world_size"])]
    return config, ranks


def _weight(t: dict, prefix: str) -> torch.Tensor:
    w = t[prefix + ".weight"]
    if w.dtype == torch.float8_e4m3fn:
        return w.float() * t[prefix + ".weights_scaling_factor"].float()
    return w.float()


def _bias(t: dict, prefix: str):
    b = t.get(prefix + ".bias")
    return None if b is None else b.float()


def _norm(cfg, t, prefix, x):
    w, b = t[prefix + ".weight"].float(), _bias(t, prefix)
    if cfg["architecture"] == "LlamaForCausalLM":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["norm_epsilon"]) * w
    return F.layer_norm(x, (x.shape[-1],), w, b, cfg["norm_epsilon"])


def _scaled_inv_freq(inv, scaling):
    """TensorRT-LLM's `rotary_scaling` (Hugging Face's form): linear divides every frequency by the factor; llama3
    (Meta's Llama 3.1 rule) keeps wavelengths under original/high_freq_factor, divides those over
    original/low_freq_factor by the factor and blends the band between."""
    if not scaling:
        return inv
    kind, factor = scaling.get("type", scaling.get("rope_type")), scaling["factor"]
    if kind == "linear":
        return inv / factor
    assert kind == "llama3", kind
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > original / low, inv / factor, blended)
    return torch.where(wavelen < original / high, inv, out)


def _rope(x, pos, rot_dim, base, scaling=None):
    """GPT-NeoX rotation of the first rot_dim channels: pairs (i, i + rot_dim/2). x [b, h, s, d]."""
    inv = _scaled_inv_freq(1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim), scaling)
    ang = pos.double()[:, None, :, None] * inv  # [b, 1, s, rot/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    r, keep = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-r[..., half:], r[..., :half]], -1)
    return torch.cat([r * cos + rotated * sin, keep], -1)


def embed(cfg, rank0, input_ids, prompt_table=None):
    vocab = cfg["vocab_size"]
    word = rank0["transformer.vocab_embedding.weight"].float()
    fake = input_ids >= vocab
    x = word[input_ids.clamp(max=vocab - 1)]
    if fake.any():
        x[fake] = prompt_table.float()[input_ids[fake] - vocab]
    if "transformer.position_embedding.weight" in rank0:
        pos = torch.arange(input_ids.shape[1])
        x = x + rank0["transformer.position_embedding.weight"].float()[pos]
    return x


def forward(cfg, ranks, input_ids, prompt_table=None):
    """Logits [b, s, vocab_size] of the checkpoint for input_ids [b, s] (fake ids address prompt_table)."""
    tp = len(ranks)
    b, s = input_ids.shape
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    h_loc, kv_loc = heads // tp, max(kv // tp, 1)
    llama = cfg["architecture"] == "LlamaForCausalLM"
    # TensorRT-LLM's LLaMA builds its attention biases (qkv and dense) only with attn_bias, and then loads them;
    # without it, bias tensors in the checkpoint are ignored
    attn_bias = (lambda t, name: _bias(t, name) if cfg.get("attn_bias") else None) if llama else _bias
    scaling = cfg.get("rotary_scaling")
    rope = cfg["position_embedding_type"] == "rope_gpt_neox"
    rot_dim = int(d * cfg.get("rotary_pct", 1.0))
    pos = torch.arange(s).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    x = embed(cfg, ranks[0], input_ids, prompt_table)
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        h = _norm(cfg, ranks[0], p + "input_layernorm", x)
        attn = 0
        for t in ranks:
            qkv = F.linear(h, _weight(t, p + "attention.qkv"), attn_bias(t, p + "attention.qkv"))
            q, k, v = qkv.split([h_loc * d, kv_loc * d, kv_loc * d], -1)
            q = q.reshape(b, s, h_loc, d).transpose(1, 2)
            k = k.reshape(b, s, kv_loc, d).transpose(1, 2)
            v = v.reshape(b, s, kv_loc, d).transpose(1, 2)
            if rope:
                q, k = (_rope(y, pos, rot_dim, cfg["rotary_base"], scaling) for y in (q, k))
            k = k.repeat_interleave(h_loc // kv_loc, dim=1)
            v = v.repeat_interleave(h_loc // kv_loc, dim=1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            ctx = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
            ctx = ctx.transpose(1, 2).reshape(b, s, h_loc * d)
            attn = attn + F.linear(ctx, _weight(t, p + "attention.dense"))
        if attn_bias(ranks[0], p + "attention.dense") is not None:
            attn = attn + attn_bias(ranks[0], p + "attention.dense")
        elif llama and cfg.get("attn_bias"):
            raise KeyError(p + "attention.dense.bias: attn_bias=true but the checkpoint has none")
        x = x + attn
        h = _norm(cfg, ranks[0], p + "post_layernorm", x)
        mlp = 0
        for t in ranks:
            fc = F.linear(h, _weight(t, p + "mlp.fc"), _bias(t, p + "mlp.fc"))
            if llama:
                inner = F.silu(fc) * F.linear(h, _weight(t, p + "mlp.gate"), _bias(t, p + "mlp.gate"))
            else:
                inner = F.gelu(fc, approximate="tanh")
            mlp = mlp + F.linear(inner, _weight(t, p + "mlp.proj"))
        if _bias(ranks[0], p + "mlp.proj") is not None:
            mlp = mlp + _bias(ranks[0], p + "mlp.proj")
        x = x + mlp
    x = _norm(cfg, ranks[0], "transformer.ln_f", x)
    logits = torch.cat([F.linear(x, t["lm_head.weight"].float()) for t in ranks], -1)
    return logits[..., : cfg["vocab_size"]]


class ReferenceRunner:
    """Stands in for tensorrt_llm.runtime.ModelRunner (the Python session TrtllmBackend drives) on CPU: greedy
    decoding of the checkpoint files with `forward` above (no KV cache: every step recomputes the sequence);
    fake ids address the batch's one prompt table. Records each call's new tokens and the smallest gap between
    the best and second-best logit seen (how far greedy is from a tie)."""

    def __init__(self, folder, max_batch_size=2, max_input_len=400, max_seq_len=512):
        self.config, self.ranks = load_checkpoint(folder)
        self.max_batch_size, self.max_input_len, self.max_seq_len = max_batch_size, max_input_len, max_seq_len
        self.calls, self.min_gap = [], float("inf")

    def generate(self, batch_input_ids, max_new_tokens, end_id, pad_id, prompt_table=None, top_k=1, **kw):
        if top_k != 1:
            raise NotImplementedError("the reference runner decodes greedily only")
        table = None if prompt_table is None else prompt_table[0]
        outs, new = [], []
        for ids in batch_input_ids:
            seq = ids.long().tolist()
            for _ in range(max_new_tokens):
                logits = forward(self.config, self.ranks, torch.tensor([seq]), table)[0, -1]
                top2 = logits.topk(2).values
                self.min_gap = min(self.min_gap, float(top2[0] - top2[1]))
                seq.append(int(logits.argmax()))
                if seq[-1] == end_id:
                    break
            outs.append(seq)
            new.append(seq[ids.numel():])
        self.calls.append({"rows": len(batch_input_ids), "new_tokens": new,
                           "table_rows": 0 if table is None else table.shape[0]})
        width = max(len(o) for o in outs)
        output_ids = torch.tensor([[o + [pad_id] * (width - len(o))] for o in outs])
        return {"output_ids": output_ids, "sequence_lengths": torch.tensor([[len(o)] for o in outs])}
