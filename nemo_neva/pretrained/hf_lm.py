"""Hugging Face causal-LM tensors <-> NeVA's megatron-core `GPTModel`: one table per tensor layout, read both ways.

The table says, for every GPTModel parameter (TP=1 name, local layer spec spelling), which HF tensors make it:
  `Plain`   a rename (GPT-2's Conv1D weights are stored [in, out]: transposed)
  `Vocab`   embed_tokens / lm_head: zero rows appended up to the padded vocabulary (dropped again on export)
  `Gated`   SwiGLU `linear_fc1` = [gate_proj; up_proj]
  `QKV`     `linear_qkv` rows grouped per query group: [q heads of group g, k_g, v_g] for each g (weights and
            biases; GPT-2's fused c_attn is three row ranges of one tensor)
Loading (`load_lm`) walks the model's own parameters: a tensor-parallel rank reads only its shard's rows or
columns from the memory-mapped checkpoint (`weights.WeightSource`), each layer of a pipeline stage by its global
layer number, so no rank ever holds more than its shard plus one tensor slice. Export (`export_lm`) inverts the
same table on a TP=1 state dict. The LLaVA converter (nemo_neva/export/hf.py) uses both with a LLaVA prefix.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

from nemo_neva.pretrained.weight_specs import (QKV, Gated, Plain, Spec, Src, Vocab,  # noqa: F401  (hf_lm.X users)
                                               _chunk, pack_qkv, unpack_qkv)
from nemo_neva.pretrained.weights import UnsupportedCheckpoint, WeightSource

# HF key layout of each supported family (the tensor names inside its base model).
LAYOUTS = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "nemotron": "llama", "gpt2": "gpt2"}
# Non-weights some checkpoints carry (RoPE tables, GPT-2's causal-mask buffers).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")
# Transformer Engine spec fuses the pre-attention / pre-MLP norms into the following linear.
_TE_NAMES = [(".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
             (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
             (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
             (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias")]


def local_spec_name(name: str) -> str:
    for te, local in _TE_NAMES:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


# ----------------------------------------------------------------------------------------- tables
def lm_table(cfg, layout: str, prefix: str = "model.", lm_head: str = "lm_head.weight") -> dict[str, Spec]:
    """GPTModel parameter name -> Spec, for a (resolved) NeVA config `cfg` and an HF key `layout`;
    `prefix`: where the base model's tensors live ("model." in a LlamaForCausalLM, "transformer." in GPT-2)."""
    heads = cfg.num_attention_heads
    groups = cfg.get("num_query_groups") or heads
    tied = bool(cfg.get("share_embeddings_and_output_weights", False))
    bias, qkv_bias = bool(cfg.get("bias", True)), bool(cfg.get("qkv_bias", False))
    norm_bias = str(cfg.get("normalization", "LayerNorm")).lower().startswith("layernorm")
    gated = cfg.get("activation", "gelu") in ("swiglu", "geglu")
    if layout not in ("llama", "gpt2"):
        raise UnsupportedCheckpoint(f"no tensor layout {layout!r}")
    p = prefix
    embed = Src(p + ("wte.weight" if layout == "gpt2" else "embed_tokens.weight"))
    table: dict[str, Spec] = {"embedding.word_embeddings.weight": Vocab(embed),
                              "output_layer.weight": Vocab(embed if tied else Src(lm_head))}
    final = p + ("ln_f." if layout == "gpt2" else "norm.")
    table["decoder.final_layernorm.weight"] = Plain(Src(final + "weight"))
    if norm_bias:
        table["decoder.final_layernorm.bias"] = Plain(Src(final + "bias"))
    if layout == "gpt2":
        table["embedding.position_embeddings.weight"] = Plain(Src(p + "wpe.weight"))
    for i in range(cfg.num_layers):
        m = f"decoder.layers.{i}."
        if layout == "llama":
            h = f"{p}layers.{i}."
            norms = {"input_layernorm": h + "input_layernorm.", "pre_mlp_layernorm": h + "post_attention_layernorm."}
            att = h + "self_attn."
            for kind in ("weight", "bias") if (bias or qkv_bias) else ("weight",):
                table[m + f"self_attention.linear_qkv.{kind}"] = QKV(
                    Src(att + f"q_proj.{kind}"), Src(att + f"k_proj.{kind}"), Src(att + f"v_proj.{kind}"), heads, groups)
            linears = {"self_attention.linear_proj": att + "o_proj.", "mlp.linear_fc2": h + "mlp.down_proj."}
            fc1 = (lambda kind: Gated(Src(h + f"mlp.gate_proj.{kind}"), Src(h + f"mlp.up_proj.{kind}"))) if gated \
                else (lambda kind: Plain(Src(h + f"mlp.up_proj.{kind}")))
        else:  # GPT-2: Conv1D weights stored [in, out]; c_attn = [q; k; v] along its output features
            h = f"{p}h.{i}."
            norms = {"input_layernorm": h + "ln_1.", "pre_mlp_layernorm": h + "ln_2."}
            hidden = cfg.hidden_size
            for kind, t in (("weight", True), ("bias", False)):
                qkv = [Src(h + f"attn.c_attn.{kind}", transpose=t, offset=j * hidden, rows=hidden) for j in range(3)]
                table[m + f"self_attention.linear_qkv.{kind}"] = QKV(*qkv, heads, heads)
            linears = {"self_attention.linear_proj": h + "attn.c_proj.", "mlp.linear_fc2": h + "mlp.c_proj."}
            fc1 = lambda kind: Plain(Src(h + f"mlp.c_fc.{kind}", transpose=kind == "weight"))  # noqa: E731
        for ours, theirs in norms.items():
            table[m + f"{ours}.weight"] = Plain(Src(theirs + "weight"))
            if norm_bias:
                table[m + f"{ours}.bias"] = Plain(Src(theirs + "bias"))
        for kind in ("weight", "bias") if bias else ("weight",):
            for ours, theirs in linears.items():
                table[m + f"{ours}.{kind}"] = Plain(Src(theirs + kind, transpose=layout == "gpt2" and kind == "weight"))
            table[m + f"mlp.linear_fc1.{kind}"] = fc1(kind)
    return table


def table_sources(table: dict[str, Spec]) -> set:
    return {s.name for spec in table.values() for s in spec.sources()}


def tied_head(table: dict[str, Spec], lm_head: str) -> Optional[str]:
    """`lm_head` when the table ties it to the embedding (the checkpoint may still hold a copy)."""
    emb, out = table["embedding.word_embeddings.weight"], table["output_layer.weight"]
    return lm_head if out.sources() == emb.sources() else None


# ------------------------------------------------------------------------------------------------ loading
def _local_targets(gpt):
    """{global TP=1 name: (parameter, partition or None, global shape)} of this rank's GPTModel."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    numbers = {j: layer.layer_number - 1 for j, layer in enumerate(gpt.decoder.layers)}
    out = {}
    for name, param in gpt.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            name = f"decoder.layers.{numbers[int(m.group(1))]}.{m.group(2)}"
        name = local_spec_name(name)
        part = None
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            part = (param.partition_dim, rank, tp)
            shape[param.partition_dim] *= tp
        out[name] = (param, part, tuple(shape))
    return out


def check_sources(source: WeightSource, table: dict[str, Spec], where: str, lm_head: Optional[str] = None) -> set:
    """Every tensor the table needs is in the checkpoint; returns the names it uses."""
    used = table_sources(table)
    missing = sorted(used - source.names())
    if missing:
        raise UnsupportedCheckpoint(f"{where}: the checkpoint has no {', '.join(missing[:4])}"
                                    f"{' ...' if len(missing) > 4 else ''} (config.json and the weights disagree)")
    head = tied_head(table, lm_head) if lm_head else None
    if head and head in source:
        used = used | {head}
    return used


def check_leftovers(source: WeightSource, used: Iterable[str], where: str) -> None:
    left = sorted(n for n in source.names() - set(used) if not _IGNORED.search(n))
    if left:
        raise UnsupportedCheckpoint(f"{where}: checkpoint tensors nemo_neva does not know: {', '.join(left[:6])}"
                                    f"{' ...' if len(left) > 6 else ''} (config.json and the weights disagree?)")


def _chunked_rows(src: Src, source: WeightSource, rows: int, step: int = 4096):
    for a in range(0, rows, step):
        yield a, src.read(source, {0: (a, min(a + step, rows))})


def _check_tied_copy(source: WeightSource, embed: Src, head: str) -> None:
    if tuple(source.shape(head)) != embed.shape(source):
        raise UnsupportedCheckpoint(f"tie_word_embeddings=True but {head} has another shape than {embed.name}")
    other = Src(head)
    for a, rows in _chunked_rows(embed, source, embed.shape(source)[0]):
        if not torch.equal(rows, other.read(source, {0: (a, a + rows.shape[0])})):
            raise UnsupportedCheckpoint(f"tie_word_embeddings=True but {head} differs from {embed.name}")


def mean_row(src: Src, source: WeightSource, rows: int) -> torch.Tensor:
    """Mean of the first `rows` rows of an embedding-like tensor, read in chunks (float64 sum)."""
    total = None
    for _, chunk in _chunked_rows(src, source, rows):
        s = chunk.double().sum(0)
        total = s if total is None else total + s
    return total / rows


def load_lm(gpt, source: WeightSource, table: dict[str, Spec], where: str, added_rows: Iterable[int] = (),
            mean_of_rows: Optional[int] = None, lm_head: Optional[str] = None) -> set:
    """Copy this rank's shard of every GPTModel parameter from `source`; returns the checkpoint names used.

    `added_rows` (token ids the checkpoint's vocabulary did not have) of the embedding and output layer are set
    to the mean of its first `mean_of_rows` rows. Shapes are checked before any parameter is written.
    """
    used = check_sources(source, table, where, lm_head)
    targets = _local_targets(gpt)
    unknown = sorted(set(targets) - set(table))
    if unknown:
        raise UnsupportedCheckpoint(f"{where}: no checkpoint tensor maps to {', '.join(unknown[:4])}")
    for name, (_, _, shape) in targets.items():
        problem = table[name].check(source, shape)
        if problem:
            raise UnsupportedCheckpoint(f"{where}: {problem}")
    head = tied_head(table, lm_head) if lm_head else None
    if head and head in source and "embedding.word_embeddings.weight" in targets:
        _check_tied_copy(source, table["embedding.word_embeddings.weight"].src, head)
    added_rows = sorted(set(added_rows))
    with torch.no_grad():
        for name, (param, part, shape) in targets.items():
            piece = table[name].local(source, shape, part)
            if tuple(piece.shape) != tuple(param.shape):  # a bug here, not the checkpoint's: checked above
                raise RuntimeError(f"{name}: loaded {tuple(piece.shape)} for a {tuple(param.shape)} parameter")
            param.copy_(piece.to(param.dtype))
            if added_rows and isinstance(table[name], Vocab):
                a = 0 if part is None else _chunk(shape[0], part)[0]
                mine = [r - a for r in added_rows if a <= r < a + param.shape[0]]
                if mine:
                    param[mine] = mean_row(table[name].src, source, mean_of_rows).to(param.dtype)
    return used


# ------------------------------------------------------------------------------------------------- export
def export_lm(state: dict, table: dict[str, Spec], vocab_size: int) -> dict[str, torch.Tensor]:
    """TP=1 GPTModel tensors (`state`, local or TE names) -> HF tensors of the table's layout."""
    by_local = {local_spec_name(k): v for k, v in state.items()}
    parts: dict[str, list] = {}
    done = set()
    for name, spec in table.items():
        if name not in by_local:
            continue  # e.g. a tied output layer: the embedding is the tensor
        for src, tensor in spec.split(by_local[name]):
            if isinstance(spec, Vocab):
                tensor = tensor[:vocab_size]
            if (src.name, src.offset) in done:
                continue
            done.add((src.name, src.offset))
            parts.setdefault(src.name, []).append((src, tensor))
    out = {}
    for name, pieces in parts.items():
        pieces.sort(key=lambda p: p[0].offset)
        t = torch.cat([p[1] for p in pieces], dim=0) if len(pieces) > 1 else pieces[0][1]
        if pieces[0][0].transpose:
            t = t.t()
        out[name] = t.detach().to("cpu").clone().contiguous()
    return out
