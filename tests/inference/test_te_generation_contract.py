"""What generation does on the Transformer Engine spec, checked on CPU (TE is GPU-only).

- TE's core attention drops an explicit padding mask in its cached (decode) steps and its causal prefill, so
  prompts of different lengths must not share a left-padded batch there: `_batches` groups equal lengths only
  unless every core attention is ours (SDPACoreAttention, which honours the mask).
- An FP8 model's TE linears need token counts in multiples of 8 (a decode step has one per row): generation
  applies megatron-core's `prepare_model_for_fp8_inference` padding. Without TE that function refuses, which is
  what shows on CPU that generation calls it.
"""
import types

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from nemo_neva.inference import generate as gen
from nemo_neva.modules import layer_specs

PROMPTS = ["<image>\nWhat is it?", "Three words here.", "<image>\nA longer question about the picture?",
           "Hi"]


def _requests(model, image):
    return [model.processor(p, image if "<image>" in p else None, 4) for p in PROMPTS]


def test_mixed_lengths_share_a_batch_only_where_the_attention_takes_a_padding_mask(model, image):
    requests = _requests(model, image)
    lengths = [r.ids.numel() for r in requests]
    assert len(set(lengths)) == len(lengths)  # all different
    # ours: one left-padded batch for all
    assert model.pads_in_cached_steps
    groups = gen._batches(requests, None, model.pads_in_cached_steps)
    assert [sorted(g) for g in groups] == [sorted(range(len(PROMPTS)))]
    # a core attention that is not ours (megatron-core's own here, standing in for TEDotProductAttention)
    config = model.model.language_model.config
    foreign = torch.nn.ModuleList([DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                                       attention_type="self")])
    assert not any(isinstance(m, layer_specs.SDPACoreAttention) for m in foreign.modules())
    pads = type(model).pads_in_cached_steps.fget(types.SimpleNamespace(model=foreign))  # a model holding it
    assert not pads
    groups = gen._batches(requests, None, pads)
    assert all(len({lengths[i] for i in g}) == 1 for g in groups) and len(groups) == len(PROMPTS)


def test_fp8_generation_applies_megatron_core_fp8_inference_padding(model, image):
    if layer_specs.HAVE_TE:  # not optional: this test is for machines *without* TE
        pytest.skip("Transformer Engine present: the padding then runs (scripts/gpu_check.sh covers FP8 on a GPU)")
    gpt = model.model.language_model
    assert gen.generate(model, [image], ["<image>\nHi"], max_new_tokens=2)  # fp8 off: no FP8 preparation
    gpt.config.fp8 = "hybrid"
    try:
        with pytest.raises(RuntimeError, match="prepare_model_for_fp8_inference requires Transformer Engine"):
            gen.generate(model, [image], ["<image>\nHi"], max_new_tokens=2)
    finally:
        gpt.config.fp8 = None
