"""The export writes the language model in its own family: every family `model.mm_cfg.llm.from_pretrained`
imports round-trips import -> .nemo -> HF LLaVA tensor for tensor, and NeVA's own GPT-style LM goes out as HF GPT-2.

Oracles: the tiny random source checkpoints themselves (written with transformers' save_pretrained) and
transformers' `LlavaForConditionalGeneration` loading the exported folder.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva import build_model
from nemo_neva.export.hf import UnsupportedCheckpoint, export_neva_to_hf, export_nemo_to_hf
from tests.export.hf_helpers import neva_logits
from tests.model.helpers import tiny_model_cfg
from tests.pretrained.lm_helpers import lm_logits, make_tiny_lm, neva_cfg, probe_ids

# fp32 both sides, same weights; GPT-2's Conv1D multiplies in another order (~1e-6). 1e-4 still catches any
# mis-mapped tensor (those move logits by ~1e-1).
ATOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama": ("llama", {}),
    "llama_rope_llama3": ("llama", {"rope_parameters": LLAMA3}),
    "llama_rope_linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases, tied embeddings, byte-level BPE
    "nemotron": ("nemotron", {"partial_rotary_factor": 0.5}),
    "gpt2": ("gpt2", {}),  # learned positions, Conv1D [in, out] weights, tied
    "gpt2_untied": ("gpt2", {"tie_word_embeddings": False, "activation_function": "gelu"}),
}


def _hub_name(family: str, source_key: str) -> str:
    """A causal LM's tensor name -> its name in the exported LLaVA (Hub layout)."""
    if source_key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if family == "gpt2":  # transformers and vLLM both take GPT-2's base model straight under language_model.
        return "language_model." + source_key[len("transformer."):]
    return "language_model." + source_key


@pytest.mark.parametrize("case", list(CASES))
def test_imported_lm_exports_tensor_for_tensor_in_its_own_family(case, tmp_path):
    family, overrides = CASES[case]
    src = str(tmp_path / "lm")
    hf = make_tiny_lm(family, src, **overrides)
    model = build_model(neva_cfg(src))
    nemo = str(tmp_path / "model.nemo")
    model.save_to(nemo)
    out = export_nemo_to_hf(nemo, str(tmp_path / "hf"))

    exported = load_file(os.path.join(out, "model.safetensors"))
    source = load_file(os.path.join(src, "model.safetensors"))
    vocab = hf.config.vocab_size
    for key, value in source.items():
        ours = exported[_hub_name(family, key)]
        if key.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
            assert ours.shape[0] == vocab + 1  # + <image>
            ours = ours[:vocab]
        assert ours.dtype == value.dtype and torch.equal(ours, value), key
    extra = {"language_model.lm_head.weight"} if family == "gpt2" and "lm_head.weight" not in source else set()
    if extra:  # transformers' LLaVA cannot tie a GPT-2 head (it ties to `embed_tokens`): written untied, equal
        assert torch.equal(exported["language_model.lm_head.weight"], exported["language_model.wte.weight"])
    assert len([k for k in exported if k.startswith("language_model.")]) == len(source) + len(extra)
    assert any(k.startswith("vision_tower.vision_model.") for k in exported)

    text = json.load(open(os.path.join(out, "config.json")))["text_config"]
    theirs = json.load(open(os.path.join(src, "config.json")))
    assert text["model_type"] == family
    assert text["tie_word_embeddings"] == (theirs["tie_word_embeddings"] and not extra)
    for key in ("rope_parameters", "attention_bias", "partial_rotary_factor", "activation_function", "hidden_act",
                "num_key_value_heads"):
        assert text.get(key) == theirs.get(key), key

    from transformers import LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids = probe_ids(vocab, seed=3)
    with torch.no_grad():  # the exported LLaVA's language model answers text like the source LM
        torch.testing.assert_close(llava(input_ids=ids).logits[..., :vocab], hf(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)
    torch.testing.assert_close(lm_logits(model, ids)[..., :vocab], hf(input_ids=ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("activation,hf_name", [("gelu", "gelu"), ("gelu_tanh", "gelu_new")])
def test_nevas_gpt_style_goes_out_as_gpt2(activation, hf_name, tmp_path):
    """The demo's LM (LayerNorm, learned positions, GELU, biases, untied): HF GPT-2 computes it exactly."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(activation=activation, layernorm_epsilon=1e-6,
                                             **{"data.conv_template": "vicuna_v1"})).eval()
    with torch.no_grad():  # off their init values (norm gains 1, biases 0), so a mix-up shows
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = export_neva_to_hf(model, str(tmp_path / "hf"))
    text = json.load(open(os.path.join(out, "config.json")))["text_config"]
    assert (text["model_type"], text["activation_function"], text["layer_norm_epsilon"], text["n_positions"],
            text["tie_word_embeddings"], text["n_inner"]) == ("gpt2", hf_name, 1e-6, model.cfg.encoder_seq_length,
                                                              False, model.cfg.ffn_hidden_size)
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, len(model.tokenizer), (2, 30), generator=g)
    ids[:, 2:2 + model.tokens_per_image] = model.image_token_id
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        theirs = llava(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(neva_logits(model, ids, pixels), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides,named", [
    ({"position_embedding_type": "rope"}, "position_embedding_type='rope' (HF GPT-2 needs 'learned_absolute')"),
    ({"activation": "geglu"}, "activation='geglu'"),
    ({"num_query_groups": 2}, "num_query_groups=2 (HF GPT-2 has no grouped-query attention)"),
], ids=["rope", "geglu", "gqa"])
def test_an_lm_no_family_expresses_is_refused_naming_the_field(overrides, named, tmp_path):
    model = build_model(tiny_model_cfg(**overrides))
    out = tmp_path / "hf"
    with pytest.raises(UnsupportedCheckpoint, match="no Hugging Face LM family") as err:
        export_neva_to_hf(model, str(out))
    assert named in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(tmp_path) == []  # nothing written, no partial folder


def test_a_pooled_video_model_is_refused(tmp_path):
    model = build_model(tiny_model_cfg(**{"mm_cfg.video.pool": "2x2"}))
    with pytest.raises(UnsupportedCheckpoint, match=r"video\.pool='2x2' \(HF LLaVA has no video frame pooling"):
        export_neva_to_hf(model, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_folder_and_a_full_folder_is_not_overwritten(tmp_path, monkeypatch):
    import nemo_neva.export.hf as hf_export

    model = build_model(tiny_model_cfg())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "_generation_config", broken)  # fails after config and weights are written
    with pytest.raises(OSError, match="disk full"):
        export_neva_to_hf(model, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_neva_to_hf(model, str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]


@pytest.mark.parametrize("engine,overrides,named", [
    ("vllm", {}, "vLLM cannot serve this model: a GPT-2 language model"),
    ("trtllm", {"llama": True}, "TensorRT-LLM (PyTorch backend) cannot serve this model: plain LLaVA"),
    ("trtllm", {"llama": True, "mm_cfg.vision_encoder.vision_select_layer": -1, "mm_cfg.image_tiling.enabled": True},
     "vision_feature_layer=-1"),
], ids=["vllm_gpt2", "trtllm_plain_llava", "trtllm_select_layer"])
def test_an_export_for_an_engine_refuses_what_that_engine_cannot_serve(engine, overrides, named, tmp_path):
    from tests.model.helpers import llama_overrides

    overrides = dict(overrides)
    lm = llama_overrides() if overrides.pop("llama", False) else {}  # else the demo's GPT style: GPT-2
    model = build_model(tiny_model_cfg(**lm, **overrides))
    with pytest.raises(UnsupportedCheckpoint, match=named.replace("(", r"\(").replace(")", r"\)")):
        export_neva_to_hf(model, str(tmp_path / "hf"), engine=engine)
    assert os.listdir(tmp_path) == []
    export_neva_to_hf(model, str(tmp_path / "any"))  # without an engine: transformers loads it


def test_a_tiled_llama_model_exports_for_tensorrt_llm(tmp_path):
    from tests.model.helpers import llama_overrides

    model = build_model(tiny_model_cfg(**llama_overrides(), **{"mm_cfg.image_tiling.enabled": True}))
    out = export_neva_to_hf(model, str(tmp_path / "hf"), engine="trtllm")
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["LlavaNextForConditionalGeneration"]
