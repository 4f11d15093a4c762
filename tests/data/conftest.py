import pytest
from PIL import Image

from neva_data_helpers import DEMO_TOKENIZER


@pytest.fixture(scope="session")
def tok():
    from nemo_neva.data.tokenizer import load_tokenizer

    return load_tokenizer(DEMO_TOKENIZER)


@pytest.fixture(scope="session")
def proc():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(d / "red.png")
    Image.new("RGB", (48, 32), (10, 10, 200)).save(d / "blue.png")
    return d
