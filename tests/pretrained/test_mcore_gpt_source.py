"""A megatron-core GPTModel distributed checkpoint as the LM: written by megatron-core's own
`dist_checkpointing.save` of a GPTModel (NeMo 1 layout: model_config.yaml + model_weights/, keys under "model."),
then named by `model.mm_cfg.llm.from_pretrained`."""
import os
import shutil

import torch
from omegaconf import OmegaConf

from nemo_neva import build_model
from tests.pretrained.lm_helpers import ROOT, lm_logits, neva_cfg, probe_ids

LM = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
      "kv_channels": 16, "position_embedding_type": "rope", "rotary_base": 5000.0, "rotary_percentage": 1.0,
      "normalization": "RMSNorm", "layernorm_epsilon": 1e-5, "activation": "swiglu", "bias": False,
      "share_embeddings_and_output_weights": False, "encoder_seq_length": 64}


def _write_mcore_checkpoint(folder):
    from megatron.core import dist_checkpointing

    from nemo_neva.compat.cpu import cuda_free, seed_all
    from nemo_neva.modules.language_model import build_gpt, build_transformer_config
    from nemo_neva.parallel.init import initialize_model_parallel_from_cfg

    initialize_model_parallel_from_cfg(tp=1, pp=1, seed=7)
    cfg = OmegaConf.create(LM)
    seed_all(7)
    gpt = build_gpt(cfg, build_transformer_config(cfg, torch.float32), 640, True, True)  # 576 tokens padded to 128s
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    os.makedirs(os.path.join(folder, "model_weights"))
    with cuda_free():  # the CPU shims megatron-core's writer needs here (nemo_neva.compat.cpu)
        dist_checkpointing.save(gpt.sharded_state_dict(prefix="model."), os.path.join(folder, "model_weights"))
    OmegaConf.save(OmegaConf.create(LM), os.path.join(folder, "model_config.yaml"))
    shutil.copytree(os.path.join(ROOT, "data", "tokenizer"), os.path.join(folder, "tokenizer"))
    return gpt


def test_megatron_core_gpt_checkpoint_is_the_lm(tmp_path):
    folder = str(tmp_path / "mcore_gpt")
    gpt = _write_mcore_checkpoint(folder)
    expected = {k: v.detach().clone() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    ids = probe_ids(576)
    pos = torch.arange(ids.shape[1]).expand_as(ids).clone()
    gpt.eval()
    with torch.no_grad():
        want = gpt(ids, pos, attention_mask=None)
    model = build_model(neva_cfg(folder))
    assert (model.cfg.num_layers, model.cfg.num_query_groups, model.cfg.activation) == (2, 2, "swiglu")
    got = model.model.language_model.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    torch.testing.assert_close(lm_logits(model, ids), want, rtol=0, atol=0)  # the same weights and code
