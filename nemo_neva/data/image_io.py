"""Safe image loading (size and path checks before decoding) and HF-processor preprocessing."""
from __future__ import annotations

import io
import os
import tarfile
import threading
import warnings
from typing import Optional, Sequence, Union

import torch
from PIL import Image

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
ASPECT_RATIOS = ("square", "pad", "keep")


class ImageError(ValueError):
    """An image that must not be used; `reason` is a short tag (missing, escape, too_large, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _normalise(name: str) -> str:
    return "/".join(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _check_relative(rel: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise ImageError("bad_path", f"image path {rel!r} is not a non-empty string")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise ImageError("path_escape", f"absolute image path {rel!r} is not allowed")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise ImageError("path_escape", f"image path {rel!r} leaves the image root")
    return _normalise(rel)


def decode_image(data: Union[bytes, str], name: str, max_pixels: int, header_only: bool):
    """Open, check format and pixel count from the header, then decode to RGB (header_only: (height, width))."""
    try:
        with warnings.catch_warnings():
            # PIL's own bomb guard stays on, and its warning tier becomes an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # `formats` keeps PIL from trying exotic decoders on untrusted bytes.
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data,
                            formats=sorted(ALLOWED_FORMATS)) as img:
                w, h = img.size
                if w * h > max_pixels or w <= 0 or h <= 0:
                    raise ImageError("too_many_pixels", f"{name}: {w}x{h} exceeds {max_pixels} pixels")
                if header_only:
                    return h, w
                img.seek(0)  # first frame of a GIF
                return img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", f"{name}: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError("bad_format", f"{name}: not one of {sorted(ALLOWED_FORMATS)}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's ways of saying "corrupt"
        raise ImageError("corrupt", f"{name}: {e}") from e


class ImageSource:
    """Images under a folder, or inside an uncompressed `.tar`, addressed by relative path."""

    def __init__(self, root: str, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root, self.max_bytes, self.max_pixels = root, max_bytes, max_pixels
        self.is_tar = os.path.isfile(root) and root.endswith(".tar")
        if not self.is_tar and not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root!r}")
        self._real_root = os.path.realpath(root)
        self._members: dict[str, tuple[int, int]] = {}
        if self.is_tar:
            with tarfile.open(root, "r:") as tf:  # name -> (data offset, size); regular files only
                self._members = {_normalise(m.name): (m.offset_data, m.size) for m in tf if m.isfile()}
        self._local = threading.local()

    def _read(self, rel: str) -> Union[bytes, str]:
        """Bytes from the tar, or the checked file path for a folder (PIL reads it lazily)."""
        key = _check_relative(rel)
        if self.is_tar:
            if key not in self._members:
                raise ImageError("missing", f"{rel!r} not in {self.root}")
            offset, size = self._members[key]
            if size > self.max_bytes:
                raise ImageError("too_large", f"{rel!r}: {size} bytes > {self.max_bytes}")
            # One handle per process/thread: DataLoader workers fork after __init__.
            fh = getattr(self._local, "fh", None)
            if fh is None or getattr(self._local, "pid", None) != os.getpid():
                fh = self._local.fh = open(self.root, "rb")
                self._local.pid = os.getpid()
            fh.seek(offset)
            return fh.read(size)
        path = os.path.realpath(os.path.join(self._real_root, key))
        if os.path.commonpath([path, self._real_root]) != self._real_root:  # e.g. a symlink out of root
            raise ImageError("path_escape", f"{rel!r} resolves outside {self.root}")
        if not os.path.isfile(path):
            raise ImageError("missing", f"{rel!r} not found under {self.root}")
        size = os.path.getsize(path)
        if size > self.max_bytes:
            raise ImageError("too_large", f"{rel!r}: {size} bytes > {self.max_bytes}")
        return path

    def check(self, rel: str) -> None:
        """Cheap validation (path, bytes, format, pixel count from the header); no pixel decode."""
        decode_image(self._read(rel), rel, self.max_pixels, header_only=True)

    def size(self, rel: str) -> tuple[int, int]:
        """(height, width) from the header, after the same checks as `check` (a tiled model's token count)."""
        return decode_image(self._read(rel), rel, self.max_pixels, header_only=True)

    def load(self, rel: str) -> Image.Image:
        return decode_image(self._read(rel), rel, self.max_pixels, header_only=False)


def target_size(processor) -> tuple[int, int]:
    """(height, width) the processor outputs: crop size if it crops, else its resize size."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    if "height" in size:
        return size["height"], size["width"]
    return size["shortest_edge"], size["shortest_edge"]


def pad_colour(processor) -> tuple[int, int, int]:
    """`pad`'s fill colour: LLaVA-1.5's `int(mean * 255)` of the processor's mean (truncated, as LLaVA's
    `expand2square` call and HF's LlavaImageProcessor(do_pad=True) make it)."""
    return tuple(int(m * 255) for m in processor.image_mean)


def expand_to_square(img: Image.Image, colour) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), colour)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _one(img: Image.Image, processor, aspect_ratio: str) -> torch.Tensor:
    if aspect_ratio == "pad":
        img = expand_to_square(img, pad_colour(processor))
    if aspect_ratio in ("square", "pad"):
        # Resize the whole picture to the output size, so the processor's crop has nothing to cut.
        h, w = target_size(processor)
        img = img.resize((w, h), resample=getattr(processor, "resample", Image.BICUBIC))
    return processor(images=img, return_tensors="pt")["pixel_values"][0].float()


def check_aspect_ratio(aspect_ratio) -> str:
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
    return aspect_ratio


def aspect_ratio_of(model_cfg) -> str:
    """A model's `image_aspect_ratio` (`model.data.image_aspect_ratio`, recorded in its .nemo). A config
    without it (a .nemo written before it was recorded) was trained with the default, `square`."""
    data = model_cfg.get("data") if model_cfg is not None else None
    return check_aspect_ratio((data.get("image_aspect_ratio") if data is not None else None) or "square")


def preprocess(images: Union[Image.Image, Sequence[Image.Image]], image_processor,
               aspect_ratio: str = "square", tiling=None) -> torch.Tensor:
    """One PIL image -> FloatTensor[3,H,W]; a list -> [N,3,H,W].

    The one image preprocessing of the project: training data, generation (hence evaluation and
    serving) and the TensorRT-LLM check all call it with the model's `image_aspect_ratio`
    (`MegatronNevaModel.preprocess_images`; exports record the mode in their metadata).

    square: stretch to the output size; pad: pad to a square with the processor's mean colour, then
    resize (LLaVA-1.5); keep: the processor's own shortest-edge resize + center crop.

    `tiling` (a `nemo_neva.modules.tiling.Tiling`, anyres): `image_processor` is then the model's
    LlavaNextImageProcessor (`tiling.processor_for`) and one image gives [max_tiles, 3, tile, tile].
    """
    check_aspect_ratio(aspect_ratio)
    if tiling is not None:
        from nemo_neva.modules.tiling import preprocess_tiled

        if isinstance(images, Image.Image):
            return preprocess_tiled(images, image_processor, tiling)
        return torch.stack([preprocess_tiled(im, image_processor, tiling) for im in images])
    if isinstance(images, Image.Image):
        return _one(images, image_processor, aspect_ratio)
    return torch.stack([_one(im, image_processor, aspect_ratio) for im in images])


def check_file_size(name: str, max_bytes: int, error=ImageError) -> None:
    """`name` is a file of at most `max_bytes` (before anything is read), else `error` ("missing" / "too_large")."""
    if not os.path.isfile(name):
        raise error("missing", f"{name!r} is not a file")
    size = os.path.getsize(name)
    if size > max_bytes:
        raise error("too_large", f"{name!r}: {size} bytes > {max_bytes}")


def open_user_image(src, max_bytes: Optional[int] = None, max_pixels: Optional[int] = None):
    """A user-supplied image (path, bytes, file object or PIL image) -> RGB PIL image, within limits.

    The file size is checked before reading, the pixel count from the header before decoding (PIL's own
    decompression-bomb guard stays on); truncated/malformed files raise `ImageError` with a clear reason.
    """
    from PIL import Image

    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(src, Image.Image):
        w, h = src.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            raise ImageError("too_many_pixels", f"image of {w}x{h} exceeds {max_pixels} pixels")
        return src.convert("RGB")
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        check_file_size(name, max_bytes)
        with open(name, "rb") as f:
            data = f.read(max_bytes + 1)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name, data = "<bytes>", bytes(src)
    elif hasattr(src, "read"):
        name, data = getattr(src, "name", "<stream>"), src.read(max_bytes + 1)
    else:
        raise TypeError(f"expected a path, bytes, file object or PIL image, got {type(src).__name__}")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{name!r}: more than {max_bytes} bytes")
    return decode_image(bytes(data), str(name), max_pixels, header_only=False)


# ------------------------------------------------------------------ Hugging Face processors (export / import)
def mode_of_hf_processor(processor) -> str:
    """The aspect-ratio mode whose pixels a Hugging Face image processor makes by itself: `pad` (LLaVA's
    do_pad), `keep` (shortest-edge resize + centre crop, CLIP's) or `square` (resize to a fixed size)."""
    if getattr(processor, "do_pad", False):
        return "pad"
    size = processor.size if isinstance(processor.size, dict) else dict(processor.size)
    if getattr(processor, "do_center_crop", False) and "shortest_edge" in size:
        return "keep"
    return "square"


def hf_processor_for(processor, aspect_ratio: str):
    """A Hugging Face image processor that by itself makes `preprocess(image, processor, aspect_ratio)`'s
    pixels (for an HF export: transformers users then feed the model what it was trained on)."""
    from nemo_neva.modules.vision import hf_image_processor_class

    check_aspect_ratio(aspect_ratio)
    if aspect_ratio == "keep" or mode_of_hf_processor(processor) == aspect_ratio:
        return processor
    settings = {k: v for k, v in processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    if aspect_ratio == "square":
        h, w = target_size(processor)
        return type(processor)(**dict(settings, size={"height": h, "width": w}, do_center_crop=False))
    llava = hf_image_processor_class("LlavaImageProcessor")  # pad, then the processor's own steps
    return llava(**dict(settings, do_pad=True))
