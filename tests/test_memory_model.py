"""The paper model (nemo_neva.perf.paper_model) counts the parameters the code actually builds, and its memory /
throughput arithmetic behaves as the formulas in docs/PARALLELISM.md say."""
import os
import subprocess
import sys

import pytest

from nemo_neva.perf import paper_model as pm
from tests.model.helpers import ROOT, llama_overrides, tiny_model_cfg

VARIANTS = {
    "gpt-untied": {},
    "gpt-tied": {"share_embeddings_and_output_weights": True},
    "gpt-linear-projector": {"mm_cfg.mm_mlp_adapter_type": "linear"},
    "llama-gqa-untied": llama_overrides(),
    "llama-mha-tied-mlp3x": {**llama_overrides(), "num_query_groups": None,
                             "share_embeddings_and_output_weights": True, "mm_cfg.mm_mlp_adapter_type": "mlp3x_gelu"},
    "llama-gqa-siglip-kvchannels": {**llama_overrides(), "kv_channels": 8, "activation": "geglu",
                                    "mm_cfg.vision_encoder.model_type": "siglip", "ffn_hidden_size": 96},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_equal_the_built_model(name):
    from omegaconf import OmegaConf

    from nemo_neva import build_model

    model = build_model(tiny_model_cfg(**VARIANTS[name]))
    vocab = model.model.language_model.vocab_size
    shape = pm.from_model_cfg(OmegaConf.to_container(model.cfg, resolve=True), vocab, model.vision_config)
    counts = pm.neva_params(shape)
    built = {
        "lm": sum(p.numel() for p in model.model.language_model.parameters()),
        "vision": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.projector.parameters()),
    }
    built["total"] = sum(p.numel() for p in model.parameters())
    assert counts == built
    # and per layer, at TP=1, the formula matches one built decoder layer
    layer = model.model.language_model.decoder.layers[0]
    assert pm.lm_layer_params(shape.lm) == sum(p.numel() for p in layer.parameters())


def test_ngc_sizes_land_on_their_names():
    for name, target in (("8B", 8e9), ("22B", 22e9), ("43B", 43e9)):
        n = pm.lm_params(pm.NGC_LMS[name])
        assert abs(n - target) / target < 0.07, (name, n)
    assert abs(pm.vision_params(pm.CLIP_VIT_L_14_336) - 303.5e6) < 1e6  # CLIP ViT-L/14-336 vision tower
    assert pm.CLIP_VIT_L_14_336.tokens_per_image == 576


def test_memory_behaves_like_the_formulas():
    m = pm.ngc_model("22B")
    base = pm.Layout(tp=8, pp=1, dp=4, sequence_parallel=True, micro_batch_size=1, seq_length=4096,
                     distributed_optimizer=False)
    mem = pm.memory_per_gpu(m, base)
    parts = pm.neva_params(m)
    # bf16 weights: 2 B per parameter, LM split 8 ways by TP (norms replicated), vision + projector whole
    frozen = 2 * parts["vision"] / pm.GIB
    assert mem["weights"] == pytest.approx(frozen + 2 * (parts["lm"] / 8 + parts["projector"]) / pm.GIB, rel=0.01)
    # trainable (LM + projector): 4 B fp32 grads, 12 B Adam state (no distributed optimizer). approx() without
    # arguments (1e-6 relative) in this file: the same formula in another float order; rel=0.01 above: the norms
    # the 8-way split replicates are left out of that sum
    assert mem["grads"] == pytest.approx(2 * (mem["weights"] - frozen))
    assert mem["optimizer"] == pytest.approx(6 * (mem["weights"] - frozen))
    dist = pm.memory_per_gpu(m, pm.replace(base, distributed_optimizer=True))
    assert dist["optimizer"] == pytest.approx(mem["optimizer"] / 4)
    # stage 1 (projector learns): the LM has no grads or optimizer state
    s1 = pm.memory_per_gpu(m, pm.replace(base, stage="pretrain"))
    assert s1["grads"] == pytest.approx(4 * parts["projector"] / pm.GIB)
    assert s1["optimizer"] == pytest.approx(12 * parts["projector"] / pm.GIB)
    # Korthikanti et al. check: GPT-3-style layer (MHA, ffn 4h, non-flash, dropout, no SP) = sbh(10 + 24/t + 5as/ht)
    gpt = pm.LMShape(num_layers=4, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                     vocab_size=50304, gated=False, bias=True)
    lay = pm.Layout(tp=2, seq_length=512, micro_batch_size=2, flash_attention=False, dropout=True)
    s, b, h, a, t = 512, 2, 1024, 16, 2
    assert pm.activation_bytes_per_layer(gpt, lay) == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    sp = pm.replace(lay, sequence_parallel=True)
    assert pm.activation_bytes_per_layer(gpt, sp) == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
    sel = pm.replace(sp, recompute="selective")
    assert pm.activation_bytes_per_layer(gpt, sel) == pytest.approx(s * b * h * 34 / t)
    # full recompute keeps far less than none; fp8 halves the GEMM-input part
    none = pm.memory_per_gpu(m, base)["activations"]
    full = pm.memory_per_gpu(m, pm.replace(base, recompute="full"))["activations"]
    assert full < none / 3  # what remains: chunk inputs, one live layer, the logits
    assert pm.memory_per_gpu(m, pm.replace(base, precision="fp8"))["activations"] < none


def test_throughput_uses_6n_plus_attention():
    m = pm.ngc_model("8B")
    lay = pm.Layout(tp=2, dp=4, seq_length=2048)
    f = pm.flops_per_sample(m, lay)
    lm = m.lm
    n_mm = lm.num_layers * 12 * lm.hidden_size ** 2 + lm.vocab_size * lm.hidden_size  # 4h^2 attn + 8h^2 mlp
    assert f["lm_gemm"] == 6 * n_mm * 2048
    assert f["lm_attention"] == 12 * 2048 ** 2 * lm.hidden_size * lm.num_layers
    bf16 = pm.tokens_per_second(m, lay, mfu=0.4)
    fp8 = pm.tokens_per_second(m, pm.replace(lay, precision="fp8"), mfu=0.4)
    assert bf16["tokens_per_s"] == pytest.approx(bf16["tokens_per_s_per_gpu"] * 8)
    assert 1.3 < fp8["tokens_per_s"] / bf16["tokens_per_s"] < 2.0  # only the LM GEMMs run at the fp8 peak
    assert bf16["tokens_per_s_per_gpu"] == pytest.approx(0.4 * 989e12 / (f["total"] / 2048), rel=1e-9)


def test_script_prints_a_table():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "memory_model.py"), "--models", "8B",
                           "--tp", "2", "--dp", "4", "--seq-length", "4096"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "8B" in proc.stdout and "tokens/s" in proc.stdout and "GiB" in proc.stdout
