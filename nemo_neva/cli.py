"""What the command-line entry points (`neva-*`, nemo_neva/commands/) share: the packaged hydra configs, paths
that work from any folder, and user mistakes reported as one line instead of a stack trace."""
from __future__ import annotations

import functools
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# The hydra configs (conf/ in a checkout is a link to it), an absolute path: hydra finds it from any folder.
CONF_DIR = os.path.join(_PACKAGE, "conf")
# What the shipped configs name as `data/...`: the shapes demo data and its tokenizer, inside the package.
ASSETS_DIR = os.path.join(_PACKAGE, "assets")


def resolve_path(path):
    """A relative path is taken from the working directory, else from the package's assets.

    Lets the shipped configs name `data/...` whether a command runs from a checkout, elsewhere, or from an
    installed (non-editable) package.
    """
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(ASSETS_DIR, path)
    return candidate if os.path.exists(candidate) else path


def shipped_config(name: str, overrides=()):
    """The packaged hydra config `name` (e.g. "neva_finetune") as the commands see it: composed with its
    `defaults:` (a bare `OmegaConf.load` of the file misses the network group), open for edits."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name=name, overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    return cfg


def user_errors(fn):
    """Config and input mistakes end the script with their message, not a stack trace.

    Set NEVA_DEBUG=1 to see the trace.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError, KeyError) as err:
            if os.environ.get("NEVA_DEBUG"):
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


# Notices that every CPU run repeats, several times per process (megatron-core warns per module, spawned
# checkpoint workers warn again): shown as one line instead, in full with NEVA_VERBOSE=1.
_NOISE = [
    r"(Transformer Engine and Apex are|Transformer Engine is|Apex is) not installed",
    r"Future Hydra versions will no longer change working directory",
    r"full scope is deprecated",  # megatron-core's TransformerConfig default (cuda_graph_scope), not ours to set
]
_NOISY_LOGGERS = ["nv_one_logger"]  # OneLogger's "disabled" / "no exporters" notices


def verbose() -> bool:
    return os.environ.get("NEVA_VERBOSE", "") not in ("", "0")


def quiet_logs() -> None:
    """A command's default log: the known CPU notices (TE / Apex fallbacks, OneLogger) as one line. Call it
    before importing NeMo / megatron-core; NEVA_VERBOSE=1 (or a command's --verbose) keeps everything."""
    import importlib.util
    import logging
    import warnings

    if verbose():
        return
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not os.environ.get("_NEVA_NOTED") and importlib.util.find_spec("transformer_engine") is None:
        os.environ["_NEVA_NOTED"] = "1"  # once per command: its spawned workers inherit it
        print("note: no Transformer Engine / Apex: megatron-core runs its PyTorch fallbacks "
              "(NEVA_VERBOSE=1 shows every notice)", file=sys.stderr, flush=True)
