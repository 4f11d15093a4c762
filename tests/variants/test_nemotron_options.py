"""Nemotron-style LM options: LayerNorm1p (zero-centred gamma), squared-ReLU MLP, untied embeddings,
partial rotary embeddings (rotary_percentage < 1)."""
import pytest
import torch
import torch.nn.functional as F

from nemo_neva import build_model
from nemo_neva.export.hf import UnsupportedCheckpoint, export_neva_to_hf
from nemo_neva.modules.language_model import build_transformer_config
from nemo_neva.modules.norms import LayerNorm1p, RMSNorm1p
from tests.model.helpers import tiny_model_cfg
from tests.variants.variant_helpers import assert_nemo_roundtrip, logits_of, train_steps, variant_batch

NEMOTRON = {"position_embedding_type": "rope", "rotary_percentage": 0.5, "normalization": "LayerNorm1p",
            "activation": "squared-relu", "bias": False, "share_embeddings_and_output_weights": False,
            "mm_cfg.llm.freeze": False}


@pytest.mark.parametrize("cls,ref", [(LayerNorm1p, lambda x, w, b, eps: F.layer_norm(x, (16,), 1 + w, b, eps)),
                                     (RMSNorm1p, lambda x, w, b, eps: F.rms_norm(x, (16,), 1 + w, eps))])
def test_one_p_norm_numerics_and_gradients(cls, ref):
    torch.manual_seed(0)
    norm = cls(16, eps=1e-5)
    assert torch.equal(norm.weight, torch.zeros(16))  # gamma - 1 = 0 at init: an identity-gain norm
    with torch.no_grad():
        norm.weight.normal_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    norm.double()
    w = norm.weight.detach().clone().requires_grad_()
    b = norm.bias.detach().clone().requires_grad_() if getattr(norm, "bias", None) is not None else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = norm(x1), ref(x2, w, b, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)  # float64 rounding (measured 0.0)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(norm.weight.grad, w.grad)
    # and it differs from a plain norm with the stored weight (the +1 is really applied)
    assert not torch.allclose(out, F.layer_norm(x, (16,), norm.weight, getattr(norm, "bias", None), 1e-5))


def test_config_maps_to_megatron_zero_centered_gamma():
    cfg = tiny_model_cfg(**NEMOTRON)
    tc = build_transformer_config(cfg, torch.float32)
    # TE spec: megatron-core's TENorm / TELayerNormColumnParallelLinear pass this flag to TE's zero_centered_gamma
    assert tc.normalization == "LayerNorm" and tc.layernorm_zero_centered_gamma
    assert torch.equal(tc.activation_func(torch.tensor([-2.0, 0.5, 3.0])), torch.tensor([0.0, 0.25, 9.0]))
    cfg.normalization = "RMSNorm1p"
    tc = build_transformer_config(cfg, torch.float32)
    assert tc.normalization == "RMSNorm" and tc.layernorm_zero_centered_gamma
    for bad, match in (({"normalization": "BatchNorm"}, "LayerNorm1p"), ({"rotary_percentage": 0.0}, r"\(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            build_transformer_config(tiny_model_cfg(**{**NEMOTRON, **bad}), torch.float32)


def test_nemotron_model_modules():
    model = build_model(tiny_model_cfg(**NEMOTRON))
    lm = model.model.language_model
    layer = lm.decoder.layers[0]
    assert isinstance(layer.input_layernorm, LayerNorm1p) and isinstance(lm.decoder.final_layernorm, LayerNorm1p)
    assert not lm.share_embeddings_and_output_weights
    assert lm.output_layer.weight.data_ptr() != lm.embedding.word_embeddings.weight.data_ptr()
    head_dim = model.cfg.hidden_size // model.cfg.num_attention_heads
    assert lm.rotary_pos_emb.inv_freq.numel() == head_dim // 4  # rotates half the head dims (pairs)
    x = torch.randn(7)
    assert torch.equal(layer.mlp.activation_func(x), F.relu(x) ** 2)
    # the partial rotary is really used: same weights with full rotary give other logits
    full = build_model(tiny_model_cfg(**{**NEMOTRON, "rotary_percentage": 1.0}))
    full.load_state_dict(model.state_dict())
    batch = variant_batch(model)
    assert not torch.allclose(logits_of(model, batch), logits_of(full, batch), atol=1e-4)


def test_nemotron_trains_roundtrips_and_refuses_hf_export(tmp_path):
    model = build_model(tiny_model_cfg(**NEMOTRON))
    norm_w = model.model.language_model.decoder.layers[0].input_layernorm.weight
    train_steps(model)
    assert norm_w.abs().sum() > 0  # zero-centred gamma learned away from 0
    restored = assert_nemo_roundtrip(model, tmp_path / "nemotron.nemo")
    with pytest.raises(UnsupportedCheckpoint) as err:
        export_neva_to_hf(restored, str(tmp_path / "hf"))
    for what in ("normalization='LayerNorm1p'", "activation='squared-relu'", "rotary_percentage=0.5"):
        assert what in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_hf_export_reads_the_normalization_spelling():
    from nemo_neva.export.hf import hf_config_from_neva
    from tests.model.helpers import llama_overrides

    model = build_model(tiny_model_cfg(**{**llama_overrides(), "normalization": "rmsnorm"}))
    assert hf_config_from_neva(model)[0].text_config.rms_norm_eps == 1e-5  # plain RMSNorm, any case: exportable
    model.cfg.normalization = "RMSNorm1p"
    with pytest.raises(UnsupportedCheckpoint, match="'RMSNorm1p' with zero-centred gamma"):
        hf_config_from_neva(model)
