"""Safe image loading and aspect-ratio preprocessing with a real HF image processor."""
import os
import tarfile

import pytest
import torch
from PIL import Image

from neva_image_helpers import bomb_png, truncated_png
from nemo_neva.data.image_io import ImageError, ImageSource, preprocess


def reason(fn):
    with pytest.raises(ImageError) as e:
        fn()
    return e.value.reason


def test_loads_rgb(image_dir):
    src = ImageSource(str(image_dir))
    Image.new("L", (5, 4), 77).save(image_dir / "grey.png")
    img = src.load("grey.png")
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (77, 77, 77)
    assert src.load("./red.png").getpixel((3, 3)) == (200, 10, 10)


def test_path_escapes_are_rejected(tmp_path, image_dir):
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", image_dir / "link.png")
    src = ImageSource(str(image_dir))
    assert reason(lambda: src.load("../outside.png")) == "path_escape"
    assert reason(lambda: src.load(str(tmp_path / "outside.png"))) == "path_escape"
    assert reason(lambda: src.load("link.png")) == "path_escape"  # symlink resolving out of the root
    assert reason(lambda: src.check("sub/../../outside.png")) == "path_escape"


def test_size_and_format_limits(image_dir):
    (image_dir / "bomb.png").write_bytes(bomb_png(5000, 5000))
    (image_dir / "huge.png").write_bytes(bomb_png(30000, 30000))
    (image_dir / "bad.png").write_bytes(truncated_png())
    (image_dir / "junk.png").write_bytes(b"not an image at all")
    Image.new("RGB", (8, 8)).save(image_dir / "x.tiff")
    src = ImageSource(str(image_dir), max_pixels=4096 * 4096)
    assert reason(lambda: src.check("bomb.png")) == "too_many_pixels"  # our header check
    assert reason(lambda: ImageSource(str(image_dir), max_pixels=10**12).check("huge.png")) == "too_many_pixels"  # PIL's
    assert reason(lambda: src.check("missing.png")) == "missing"
    assert reason(lambda: src.check("x.tiff")) == "bad_format"
    assert reason(lambda: src.check("junk.png")) == "bad_format"
    src.check("bad.png")  # header is fine ...
    assert reason(lambda: src.load("bad.png")) == "corrupt"  # ... the pixels are not
    assert reason(lambda: ImageSource(str(image_dir), max_bytes=50).check("red.png")) == "too_large"
    assert isinstance(ImageError("x", "y"), ValueError)


def test_tar_source_matches_folder(tmp_path, image_dir):
    tar_path = tmp_path / "images.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(image_dir / "red.png", arcname="./red.png")
        tf.add(image_dir / "blue.png", arcname="sub/blue.png")
    src = ImageSource(str(tar_path))
    assert src.load("red.png").tobytes() == Image.open(image_dir / "red.png").convert("RGB").tobytes()
    assert src.load("sub/blue.png").size == (48, 32)
    assert reason(lambda: src.load("nope.png")) == "missing"
    assert reason(lambda: src.load("../red.png")) == "path_escape"


def stripes():
    """96x32: red | green | red thirds (the centre crop of `keep` sees only green)."""
    img = Image.new("RGB", (96, 32), (255, 0, 0))
    img.paste((0, 255, 0), (32, 0, 64, 32))
    return img


def test_aspect_ratio_modes(proc):
    mean = torch.tensor(proc.image_mean).view(3, 1)
    std = torch.tensor(proc.image_std).view(3, 1)
    unnorm = {m: preprocess(stripes(), proc, m) * std.view(3, 1, 1) + mean.view(3, 1, 1)
              for m in ("square", "pad", "keep")}
    for t in unnorm.values():
        assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    # keep: shortest-edge resize + centre crop -> only the green middle third remains
    assert unnorm["keep"][1].mean() > 0.95 and unnorm["keep"][0].mean() < 0.05
    # square: whole picture squeezed -> red on both sides, green in the middle
    assert unnorm["square"][0, :, 0].mean() > 0.95 and unnorm["square"][1, :, 16].mean() > 0.95
    # pad: top and bottom bands are the processor's mean colour (normalised ~0), content in the middle
    padded = preprocess(stripes(), proc, "pad")
    # (< 0.03: the fill is the mean rounded to a byte, at most 0.5 / 255 / std ~ 0.007 once normalised)
    assert padded[:, :8].abs().max() < 0.03 and padded[:, -8:].abs().max() < 0.03
    assert unnorm["pad"][0, 16, 0] > 0.9
    batch = preprocess([stripes(), stripes()], proc, "pad")
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[0], padded)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        preprocess(stripes(), proc, "crop")


def test_siglip_processor():
    from transformers import SiglipImageProcessor

    sig = SiglipImageProcessor(size={"height": 16, "width": 16})
    for mode in ("square", "pad", "keep"):
        assert preprocess(stripes(), sig, mode).shape == (3, 16, 16)
