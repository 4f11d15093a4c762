"""Shared by the generation tests that use the tiny LLaMA-style model and one random image."""
import pytest
import torch

from nemo_neva import build_model
from tests.model.helpers import llama_overrides, tiny_model_cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(2)
    return build_model(tiny_model_cfg(**llama_overrides()))


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
