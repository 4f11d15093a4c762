"""The shipped hydra configs (nemo_neva/conf) as the commands see them: composed with their `defaults:`."""
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nemo_neva.cli import CONF_DIR


def shipped_config(name: str, overrides=()):
    """`name` (e.g. "neva_finetune") composed by hydra's compose API, open for edits like a loaded YAML."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name=name, overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    return cfg
