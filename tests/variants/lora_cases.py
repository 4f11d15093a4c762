"""The LoRA model, probe and training steps shared by tests/variants/test_lora.py and its torchrun worker."""
import torch
from omegaconf import open_dict

from nemo_neva import MegatronNevaModel
from tests.model.helpers import llama_overrides, tiny_model_cfg
from tests.variants.variant_helpers import variant_batch

LORA = {"peft_scheme": "lora", "train_projector": True,
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                 "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}}


def base_cfg():
    # LLaMA-style: GQA packing in linear_qkv and SwiGLU-packed linear_fc1 are the TP-delicate layouts
    return tiny_model_cfg(**llama_overrides(), **{"mm_cfg.llm.freeze": False, "global_batch_size": 4,
                                                   "micro_batch_size": 2, "optim.sched": None})


def peft_cfg(base_nemo, **lora_overrides):
    cfg = MegatronNevaModel.restore_from(base_nemo, return_config=True)
    with open_dict(cfg):
        cfg.peft = {**LORA, "lora": {**LORA["lora"], **lora_overrides}}
    return cfg


def randomise_adapters(model, seed=7):
    """Non-zero B (and fresh A), so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".lora_a", ".lora_b")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def lora_logits(model):
    model.eval()
    probe = variant_batch(model, n=2, seed=100)
    with torch.no_grad():
        return model.model(probe["tokens"], probe["position_ids"], images=probe["images"],
                           runtime_gather_output=True)


def lora_train(model, steps):
    from megatron.core import parallel_state as ps

    model.train()
    opt = model.configure_optimizers()
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = model.cfg.global_batch_size // dp
    losses = []
    for step in range(steps):
        full = variant_batch(model, n=model.cfg.global_batch_size, seed=step)
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in full.items()}
        losses.append(float(model.train_on_batch(batch, opt)))
    return losses
