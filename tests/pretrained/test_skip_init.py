"""Loading without the throw-away initialisation: a network whose LM (and, for a .nemo, everything) is loaded
right after construction skips megatron-core's random init. What is loaded must equal the checkpoint, and what
is not (the projector, added-token rows, TP padding rows) must still hold its proper initial values."""
import math

import pytest
import torch
from safetensors.torch import load_file

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.pretrained import hf_lm
from tests.model.helpers import llama_overrides, tiny_model_cfg
from tests.pretrained.lm_helpers import make_tiny_lm, neva_cfg


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lm") / "llama")
    return path, make_tiny_lm("llama", path)


def _linear_std(fan_in: int) -> float:
    """torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whose std is that / sqrt(3)."""
    return 1.0 / math.sqrt(3 * fan_in)


def test_megatron_core_draws_no_random_numbers_when_the_lm_is_loaded():
    """The CPU generator is where megatron-core's CPU init draws from: untouched by a skipped init, advanced by a
    normal one (a RoPE + RMSNorm LM has no learned positions, whose nn.Embedding would draw on its own)."""
    from megatron.core import parallel_state

    from nemo_neva.modules.language_model import build_gpt, build_transformer_config
    from nemo_neva.parallel.init import ensure_distributed, initialize_model_parallel_from_cfg

    cfg = tiny_model_cfg(**llama_overrides())
    ensure_distributed()
    initialize_model_parallel_from_cfg(tp=1, pp=1, num_attention_heads=cfg.num_attention_heads,
                                       num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
                                       num_layers=cfg.num_layers)
    assert parallel_state.model_parallel_is_initialized()
    config = build_transformer_config(cfg, torch.float32)
    before = torch.get_rng_state()
    skipped = build_gpt(cfg, config, 512, True, True, initialize=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert config.perform_initialization  # modules built later with this config (LoRA, merges) initialise
    initialised = build_gpt(cfg, config, 512, True, True)
    assert not torch.equal(torch.get_rng_state(), before)
    # the tensor-parallel marks DDP, the grad norm and the loaders read are the ones megatron-core's init sets
    marks = lambda gpt: {n: tuple(getattr(p, a, None) for a in ("tensor_model_parallel", "partition_dim",  # noqa
                                                                 "partition_stride")) for n, p in gpt.named_parameters()}
    assert marks(skipped) == marks(initialised)
    assert marks(skipped)["decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)  # SwiGLU: [gate; up] per rank


def test_pretrained_lm_is_the_checkpoint_and_the_rest_is_initialised(llama):
    path, hf = llama
    model = build_model(neva_cfg(path))
    gpt = model.model.language_model
    vocab = hf.config.vocab_size
    assert all(torch.isfinite(p).all() for p in gpt.parameters())
    # every loaded tensor is the checkpoint's, bit for bit (fp32 both sides): back through the same tables
    stored = load_file(f"{path}/model.safetensors")
    exported = hf_lm.export_lm(gpt.state_dict(), hf_lm.lm_table(model.cfg, "llama"), vocab)
    assert set(exported) == set(stored)
    for name, tensor in stored.items():
        assert torch.equal(exported[name], tensor), name
    # rows the checkpoint lacks: <image> (added) = the mean of the LM's rows, the TP padding rows = zero
    for weight, source in ((gpt.embedding.word_embeddings.weight, stored["model.embed_tokens.weight"]),
                           (gpt.output_layer.weight, stored["lm_head.weight"])):
        torch.testing.assert_close(weight[model.image_token_id], source.mean(0), rtol=0, atol=1e-6)  # fp64 sum
        assert weight.shape[0] == 512 and not weight[vocab + 1:].any()
    # the projector is not in the checkpoint: torch's default Linear init (std within 10 %: 4096 draws give a
    # sampling error of ~1 %), not zeros or leftover memory
    first, second = model.model.projector[0], model.model.projector[2]
    for linear in (first, second):
        w = linear.weight.detach()
        assert torch.isfinite(w).all() and w.abs().max() <= 1 / math.sqrt(w.shape[1]) + 1e-7
        assert abs(float(w.std()) / _linear_std(w.shape[1]) - 1) < 0.10


def test_restored_nemo_is_the_saved_model_tensor_for_tensor(tmp_path):
    model = build_model(tiny_model_cfg(**llama_overrides()))
    with torch.no_grad():  # off the init values, so a restore that keeps an initialisation shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = str(tmp_path / "m.nemo")
    model.save_to(path)
    restored = MegatronNevaModel.restore_from(path)
    ours = {k: v for k, v in restored.model.state_dict().items() if torch.is_tensor(v)}
    theirs = {k: v for k, v in model.model.state_dict().items() if torch.is_tensor(v)}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if not key.endswith("_extra_state"):
            assert torch.equal(ours[key], value), key
