"""Transformer Engine / FP8 / activation-recompute contract, checked on CPU.

Only the *availability check* (`layer_specs.HAVE_TE`, `torch.cuda.is_available`) is patched; megatron-core
code runs unpatched. Tests that need Transformer Engine itself skip with a reason where it is absent.
"""
import pytest
import torch
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from nemo_neva import build_model
from nemo_neva.modules import layer_specs, precision
from nemo_neva.modules.language_model import build_transformer_config
from tests.model.helpers import batch_for, llama_overrides, tiny_model_cfg
from tests.optional import require_gpu_library


@pytest.fixture
def parallel_state_1():
    """TP=PP=1 model-parallel state (the decoder spec asks it how many layers this stage builds)."""
    from nemo_neva.parallel.init import ensure_distributed, initialize_model_parallel_from_cfg

    ensure_distributed()
    initialize_model_parallel_from_cfg(tp=1, pp=1, num_attention_heads=4, num_query_groups=4, num_layers=2,
                                       sequence_parallel=False, seed=1234)


# ----------------------------------------------------------------------------- spec selection
def test_without_te_the_local_spec_with_sdpa_attention_is_chosen(monkeypatch, parallel_state_1):
    monkeypatch.setattr(layer_specs, "HAVE_TE", False)
    config = build_transformer_config(tiny_model_cfg(), torch.float32)
    block = layer_specs.build_decoder_spec(config, transformer_engine=False)
    assert isinstance(block, TransformerBlockSubmodules)
    layer = block.layer_specs[0]
    assert layer.submodules.self_attention.submodules.core_attention is layer_specs.SDPACoreAttention
    assert layer.submodules.input_layernorm is layer_specs.TorchNormSP
    assert block.layer_norm is layer_specs.TorchNormSP
    with pytest.raises(RuntimeError, match="transformer_engine is not importable") as err:
        layer_specs.build_decoder_spec(config, transformer_engine=True)
    # the key the model reads (language_model.build_gpt: cfg.get("transformer_engine")), not a nested one
    assert str(err.value).startswith("model.transformer_engine=true") and "mm_cfg" not in str(err.value)


def test_te_present_but_no_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(layer_specs, "HAVE_TE", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        layer_specs.use_transformer_engine(True)
    assert layer_specs.use_transformer_engine(False) is False


# ----------------------------------------------------------------------------- fp8 config
def test_fp8_without_transformer_engine_names_the_fix():
    with pytest.raises(ValueError, match="model.transformer_engine=true"):
        build_transformer_config(tiny_model_cfg(fp8="hybrid"), torch.bfloat16)
    with pytest.raises(ValueError, match="model.transformer_engine=true"):
        build_model(tiny_model_cfg(fp8="e4m3"))


def test_fp8_with_transformer_engine_on_cpu_stops_at_the_te_check():
    if layer_specs.HAVE_TE and torch.cuda.is_available():
        pytest.skip("TE + CUDA present: this is the CPU refusal test")  # not optional: TE is here
    with pytest.raises(RuntimeError, match="transformer_engine"):
        build_model(tiny_model_cfg(fp8="hybrid", transformer_engine=True))


@pytest.mark.parametrize("key,value,match", [
    ("fp8", "e5m2", "model.fp8="),
    ("fp8_recipe", "mxfp8", "model.fp8_recipe"),
    ("fp8_amax_compute_algo", "mean", "model.fp8_amax_compute_algo"),
    ("fp8_amax_history_len", 0, "model.fp8_amax_history_len"),
    ("fp8_margin", -1, "model.fp8_margin"),
    ("hidden_size", 72, "multiple of 16"),
])
def test_bad_fp8_settings_are_named(key, value, match):
    cfg = tiny_model_cfg(**{"transformer_engine": True, "fp8": "hybrid", key: value})
    with pytest.raises(ValueError, match=match):
        precision.fp8_transformer_config_kwargs(cfg, cfg.hidden_size, cfg.ffn_hidden_size)


def test_fp8_keys_reach_transformer_config():
    """TransformerConfig accepts fp8 fields without TE, so the mapping is checkable on CPU."""
    cfg = tiny_model_cfg(transformer_engine=True, fp8="hybrid", fp8_margin=1, fp8_amax_history_len=16,
                         fp8_amax_compute_algo="most_recent", fp8_wgrad=False)
    config = build_transformer_config(cfg, torch.bfloat16)
    assert (config.fp8, config.fp8_recipe, config.fp8_margin) == ("hybrid", "delayed", 1)
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo, config.fp8_wgrad) == (16, "most_recent", False)
    off = build_transformer_config(tiny_model_cfg(), torch.float32)
    assert off.fp8 is None
    # the shipped YAML: fp8 off and the recipe defaults equal TE's DelayedScaling defaults
    base = tiny_model_cfg()
    assert base.fp8 is None and base.fp8_amax_history_len == 1024 and base.fp8_amax_compute_algo == "max"


def test_fp8_recipe_needs_te_with_clear_error():
    if layer_specs.HAVE_TE:
        pytest.skip("transformer_engine is importable here")  # not optional: TE is here
    cfg = tiny_model_cfg(transformer_engine=True, fp8="hybrid")
    with pytest.raises(RuntimeError, match="transformer_engine"):
        precision.build_fp8_recipe(cfg)
    assert precision.build_fp8_recipe(tiny_model_cfg()) is None


def test_fp8_recipe_matches_megatron_core():
    """Our recipe and the one megatron-core's TransformerBlock will enter agree (TE only)."""
    require_gpu_library("transformer_engine")
    from megatron.core.fp8_utils import get_fp8_recipe
    from transformer_engine.common import recipe as te_recipe

    cfg = tiny_model_cfg(transformer_engine=True, fp8="hybrid", fp8_margin=2, fp8_amax_history_len=32,
                         fp8_amax_compute_algo="max")
    ours = precision.build_fp8_recipe(cfg)
    theirs = get_fp8_recipe(build_transformer_config(cfg, torch.bfloat16))
    assert isinstance(ours, te_recipe.DelayedScaling) and isinstance(theirs, te_recipe.DelayedScaling)
    for field in ("fp8_format", "margin", "amax_history_len", "amax_compute_algo"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.fp8_format == te_recipe.Format.HYBRID
    if hasattr(te_recipe, "Float8CurrentScaling"):
        cur = precision.build_fp8_recipe(tiny_model_cfg(transformer_engine=True, fp8="e4m3", fp8_recipe="tensorwise"))
        assert isinstance(cur, te_recipe.Float8CurrentScaling) and cur.fp8_format == te_recipe.Format.E4M3


def test_te_spec_module_names():
    require_gpu_library("transformer_engine")
    if not torch.cuda.is_available():
        pytest.skip("the TE spec is only selected with CUDA")  # not optional: no GPU
    config = build_transformer_config(tiny_model_cfg(transformer_engine=True), torch.bfloat16)
    spec = layer_specs.build_decoder_spec(config, transformer_engine=True)
    attn = spec.submodules.self_attention.submodules
    assert attn.core_attention.__name__ == "TEDotProductAttention"
    assert attn.linear_qkv.__name__ == "TELayerNormColumnParallelLinear"
    assert attn.linear_proj.__name__ == "TERowParallelLinear"


# ----------------------------------------------------------------------------- recompute
@pytest.mark.parametrize("overrides,match", [
    ({"activations_checkpoint_granularity": "some"}, "activations_checkpoint_granularity"),
    ({"activations_checkpoint_granularity": "full"}, "uniform or block"),
    ({"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform"},
     "activations_checkpoint_num_layers"),
    ({"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "block",
      "activations_checkpoint_num_layers": 3}, "between 1 and"),
    ({"activations_checkpoint_granularity": "selective", "activations_checkpoint_method": "uniform"}, "null"),
    ({"activations_checkpoint_method": "uniform"}, "granularity is null"),
])
def test_bad_recompute_settings_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_transformer_config(tiny_model_cfg(**overrides), torch.float32)


RECOMPUTE = {
    "full-uniform": {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
                     "activations_checkpoint_num_layers": 1},
    "full-block": {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "block",
                   "activations_checkpoint_num_layers": 2},
    "selective": {"activations_checkpoint_granularity": "selective"},
}


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss_from_batch(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_recompute_gives_the_same_loss_and_grads(style):
    base_over = {"mm_cfg.llm.freeze": False, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    if style == "llama":
        base_over.update(llama_overrides())
    reference = build_model(tiny_model_cfg(**base_over))
    batch = batch_for(reference)
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    assert any(n.startswith("model.language_model.decoder") for n in ref_grads)
    for name, rc in RECOMPUTE.items():
        model = build_model(tiny_model_cfg(**base_over, **rc))
        model.load_state_dict(reference.state_dict(), strict=True)
        layer = model.model.language_model.decoder.layers[0]
        calls = []
        handle = layer.register_forward_hook(lambda *a: calls.append(1))
        try:
            loss, grads = _loss_and_grads(model, batch)
        finally:
            handle.remove()
        if rc["activations_checkpoint_granularity"] == "full":
            assert len(calls) == 2, f"{name}: layer 0 ran {len(calls)}x; full recompute should re-run it once"
        # recompute re-runs the same fp32 ops on the same inputs: measured 0.0 (loss and every gradient); the
        # small bounds only admit a backend that reorders a recomputed kernel
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6, msg=name)
        assert grads.keys() == ref_grads.keys(), name
        for key in grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


# ----------------------------------------------------------------------------- fp8 per-rank GEMM dims, fp8_wgrad
def test_fp8_per_rank_dims_are_checked_with_the_sizes_that_work():
    """TE's FP8 GEMMs need every linear's in-features on a rank to be a multiple of 16: ffn_hidden_size=144 is,
    but its half on each of 2 TP ranks (72) is not (fc2's input)."""
    cfg = tiny_model_cfg(transformer_engine=True, fp8="hybrid", ffn_hidden_size=144, tensor_model_parallel_size=2)
    with pytest.raises(ValueError) as err:
        precision.fp8_transformer_config_kwargs(cfg, cfg.hidden_size, cfg.ffn_hidden_size)
    message = str(err.value)
    assert "\n" not in message
    assert "ffn_hidden_size / tensor_model_parallel_size = 144/2 to be a multiple of 16" in message
    assert "ffn_hidden_size = 128 or 160" in message and "tensor_model_parallel_size that work for this model: 1" \
        in message
    for ffn in (128, 160):  # the sizes named do work
        ok = tiny_model_cfg(transformer_engine=True, fp8="hybrid", ffn_hidden_size=ffn, tensor_model_parallel_size=2)
        assert precision.fp8_transformer_config_kwargs(ok, ok.hidden_size, ok.ffn_hidden_size)["fp8"] == "hybrid"
    # attention: 4 heads x 16 channels over 4 ranks leaves 16 per rank (fine), over 8 is impossible anyway;
    # kv_channels 12 at TP=2 gives 4 x 12 / 2 = 24 per rank
    bad_heads = tiny_model_cfg(transformer_engine=True, fp8="hybrid", kv_channels=12, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"num_attention_heads x kv_channels / tensor_model_parallel_size = 48/2"):
        precision.fp8_transformer_config_kwargs(bad_heads, bad_heads.hidden_size, bad_heads.ffn_hidden_size)


def test_fp8_wgrad_off_is_refused_on_transformer_engine_2(monkeypatch):
    """TE 2.x recipes have no `override_linear_precision`: fp8_wgrad=false would do nothing, so it is refused."""
    assert precision.fp8_wgrad_problem(False, "2.9.0") is not None
    assert "model.fp8_wgrad=false" in precision.fp8_wgrad_problem(False, "2.11.0+abc")
    assert precision.fp8_wgrad_problem(False, "1.13.0") is None  # TE 1.x honours it
    assert precision.fp8_wgrad_problem(True, "2.9.0") is None
    assert precision.fp8_wgrad_problem(False, None) is None  # no TE: refused elsewhere (needs TE at all)
    # the config path asks the installed version (only that lookup is patched here: TE is not installed)
    monkeypatch.setattr(precision, "installed_te_version", lambda: "2.10.0")
    cfg = tiny_model_cfg(transformer_engine=True, fp8="hybrid", fp8_wgrad=False)
    with pytest.raises(ValueError, match="fp8_wgrad=false has no effect on Transformer Engine 2.10.0"):
        precision.fp8_transformer_config_kwargs(cfg, cfg.hidden_size, cfg.ffn_hidden_size)
    on = tiny_model_cfg(transformer_engine=True, fp8="hybrid")
    assert precision.fp8_transformer_config_kwargs(on, on.hidden_size, on.ffn_hidden_size)["fp8_wgrad"] is True
