"""The `.nemo` layout's fixed names (see nemo_connector.py): where the dist checkpoint sits, and the marker
file that NeMo's generic restore reads as "the weights" (the real load happens in the model constructor)."""

WEIGHTS_DIR = "model_weights"
WEIGHTS_MARKER = {"nemo_neva_weights": WEIGHTS_DIR}
MARKER_FILE = "model_weights.ckpt"  # NeMo's default `model_weights_ckpt` name


def is_weights_marker(state_dict) -> bool:
    return isinstance(state_dict, dict) and state_dict.get("nemo_neva_weights") == WEIGHTS_DIR
