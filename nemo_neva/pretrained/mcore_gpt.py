"""A megatron-core GPTModel distributed checkpoint as NeVA's language model (filled in below)."""
from __future__ import annotations

import os


def is_mcore_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "metadata.json")) or \
        os.path.isfile(os.path.join(folder, "model_weights", "metadata.json"))
