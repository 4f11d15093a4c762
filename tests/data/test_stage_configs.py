"""neva_finetune.yaml / neva_peft.yaml compose neva_pretrain.yaml (hydra `defaults:`): composed by hydra's compose
API, they agree with the pretrain config key for key except the keys each stage sets, the network keys (a .nemo
carries them) are absent, and their null video keys keep the restored .nemo's."""
import os

from omegaconf import OmegaConf

from nemo_neva.cli import CONF_DIR
from nemo_neva.cli import shipped_config

# what a finetune / PEFT run sets differently from pretraining (the rest is the pretrain config's)
FINETUNE_SETS = {"name", "trainer.max_steps", "model.mm_cfg.llm.freeze", "model.mm_cfg.video.pool_mode",
                 "model.data.data_path", "model.data.conv_template", "model.data.seq_length", "model.optim.lr",
                 "model.optim.sched.min_lr"}
PEFT_SETS = {"name", "model.mm_cfg.llm.freeze", "model.optim.lr"} | {
    f"model.data.video.{k}" for k in ("num_frames", "sampling", "max_bytes", "max_frames", "max_pixels")}


def flat(cfg, prefix="") -> dict:
    """{dotted key: value} of a config, interpolations unresolved (exp_manager.name stays ${name})."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def composed(name: str) -> dict:
    return flat(OmegaConf.to_container(shipped_config(name), resolve=False))


def network_keys() -> set:
    """The keys of conf/network/tiny.yaml (package `model`): what a .nemo carries."""
    return {f"model.{k}" for k in flat(OmegaConf.to_container(OmegaConf.load(
        os.path.join(CONF_DIR, "network", "tiny.yaml"))))}


def test_finetune_is_pretrain_without_the_network_plus_its_own_keys():
    pre, fin = composed("neva_pretrain"), composed("neva_finetune")
    assert network_keys() <= set(pre) and not network_keys() & set(fin)
    assert set(fin) - set(pre) == {"model.restore_from_path"}
    assert set(pre) - set(fin) == network_keys()
    differ = {k for k in set(pre) & set(fin) if pre[k] != fin[k]}
    assert differ == FINETUNE_SETS, differ
    assert fin["model.mm_cfg.video.pool"] is None and fin["model.data.seq_length"] is None


def test_peft_is_finetune_plus_the_adapters():
    fin, peft = composed("neva_finetune"), composed("neva_peft")
    assert {k.rsplit(".", 1)[0] for k in set(peft) - set(fin)} == {"model.peft", "model.peft.lora"}
    assert not set(fin) - set(peft)
    differ = {k for k in set(fin) & set(peft) if fin[k] != peft[k]}
    assert differ == PEFT_SETS, differ
    assert all(peft[k] is None for k in PEFT_SETS if ".video." in k)


def test_hydra_overrides_reach_the_composed_stage_configs():
    cfg = shipped_config("neva_peft", ["model.peft.lora.rank=4", "trainer.max_steps=3"])
    assert cfg.model.peft.lora.rank == 4 and cfg.trainer.max_steps == 3 and cfg.exp_manager.name == "neva_peft"


def test_null_keys_keep_the_nemos_and_the_network_is_the_nemos(tmp_path):
    """finetune_config (what neva-finetune / neva-peft run) on a .nemo with its own video and context settings."""
    from nemo_neva import build_model
    from nemo_neva.models.finetune_config import finetune_config
    from tests.model.helpers import tiny_model_cfg

    base = tiny_model_cfg(**{"data.video.num_frames": 3, "data.video.sampling": "first", "mm_cfg.video.pool": "2x2"})
    path = str(tmp_path / "base.nemo")
    build_model(base).save_to(path)
    for stage, frames in (("neva_finetune", 8), ("neva_peft", 3)):  # finetune sets 8 frames; peft keeps the .nemo's
        cfg = finetune_config(path, shipped_config(stage).model)
        assert cfg.encoder_seq_length == base.encoder_seq_length == 64  # not the pretrain yaml's 128
        assert cfg.mm_cfg.video.pool == "2x2" and cfg.mm_cfg.llm.freeze == (stage == "neva_peft")
        assert cfg.data.video.num_frames == frames, stage
        assert cfg.data.conv_template == "nvgpt" and cfg.data.seq_length is None
