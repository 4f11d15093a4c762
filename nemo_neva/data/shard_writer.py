"""Writing tar shards from LLaVA JSON + an image folder (`scripts/convert_llava_to_shards.py`): each image is
checked against the path / byte / pixel limits and decoded once, and the shard index and rejected list are
written beside the shards. Reading them back is shards.py."""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from typing import Sequence, Union


from nemo_neva.data.dataset import SampleError, record_paths
from nemo_neva.data.image_io import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, ImageSource,
                                     _decode)
from nemo_neva.data.records import iter_records
from nemo_neva.data.shard_encoding import image_member_ext
from nemo_neva.data.shards import FORMAT, INDEX_NAME

log = logging.getLogger(__name__)


_PIL_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible shards
    tf.addfile(info, io.BytesIO(data))


def _image_bytes(images: ImageSource, rel: str, full_decode: bool) -> tuple[bytes, str]:
    """The image's bytes and extension, after ImageSource's path/size checks and a decode (or header)
    check with the same pixel limit as training."""
    from PIL import Image

    raw = images._read(rel)  # path checks + byte limit; bytes for a tar, a checked path for a folder
    if isinstance(raw, str):
        with open(raw, "rb") as f:
            raw = f.read()
    _decode(raw, rel, images.max_pixels, header_only=not full_decode)
    with Image.open(io.BytesIO(raw), formats=sorted(_PIL_EXT)) as img:
        return raw, _PIL_EXT[img.format]


def convert_to_shards(data_path: Union[str, Sequence[str]], image_folder: str | None, output_dir: str,
                      samples_per_shard: int = 1000, prefix: str = "shard", full_decode: bool = True,
                      max_image_bytes: int = DEFAULT_MAX_BYTES, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """LLaVA JSON/JSONL + images -> `<prefix>-NNNNNN.tar` shards, `index.json`, and `rejected.jsonl`
    (one line per sample left out: id, reason, detail). Returns the index (also holding the counts).

    Checked here: the annotation line parses, the record is an object with a `conversations` list, its
    "image" is a path or a list of paths, and every image passes image_io's path, byte and pixel limits and
    decodes (`full_decode=False`: header only). Tag counts, max_images_per_sample and template/tokenizer
    checks happen when the shards are read (they depend on the training config).
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    os.makedirs(output_dir, exist_ok=True)
    index_path = os.path.join(output_dir, INDEX_NAME)
    if os.path.exists(index_path):
        raise FileExistsError(f"{index_path} exists; convert into an empty folder")
    image_source = ImageSource(image_folder, max_image_bytes, max_image_pixels) if image_folder else None
    skipped: Counter = Counter()
    shards: list[dict] = []
    records = kept = 0
    tf = tmp = None

    def close_shard():
        tf.close()
        os.replace(tmp, os.path.join(output_dir, shards[-1]["name"]))

    with open(os.path.join(output_dir, "rejected.jsonl"), "w", encoding="utf-8") as rejected:
        for fallback_id, rec, error in iter_records(data_path):
            records += 1
            sid = str(rec.get("id", fallback_id)) if isinstance(rec, dict) else fallback_id
            try:
                if error is not None:
                    raise SampleError("malformed_json", error)
                if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
                    raise SampleError("bad_record", "record is not an object with a 'conversations' list")
                if rec.get("video") is not None:  # shards carry image members only (see shard_encoding.py)
                    raise SampleError("video_unsupported", "tar shards do not carry videos; train video records "
                                                           "from a JSON/JSONL data_path")
                images = []  # (bytes, extension) per image, in the record's order
                for name in record_paths(rec, "image"):
                    if image_source is None:
                        raise ImageError("missing", "sample has an image but no image folder was given")
                    images.append(_image_bytes(image_source, name, full_decode))
            except (SampleError, ImageError) as e:
                reason = e.reason if isinstance(e, SampleError) else f"image_{e.reason}"
                skipped[reason] += 1
                rejected.write(json.dumps({"id": sid, "reason": reason, "detail": str(e)}) + "\n")
                log.warning("left out sample %r (%s): %s", sid, reason, e)
                continue
            if tf is None or shards[-1]["samples"] == samples_per_shard:
                if tf is not None:
                    close_shard()
                shards.append({"name": f"{prefix}-{len(shards):06d}.tar", "samples": 0})
                tmp = os.path.join(output_dir, shards[-1]["name"] + ".tmp")
                tf = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            key = f"{kept:09d}"
            _add_member(tf, key + ".json", json.dumps(dict(rec, id=sid), ensure_ascii=False).encode("utf-8"))
            for i, (data, ext) in enumerate(images):
                _add_member(tf, f"{key}.{image_member_ext(ext, i, len(images))}", data)
            shards[-1]["samples"] += 1
            kept += 1
    if tf is not None:
        close_shard()
    paths = [data_path] if isinstance(data_path, (str, os.PathLike)) else list(data_path)
    index = {"format": FORMAT, "total": kept, "records": records, "skipped": dict(sorted(skipped.items())),
             "shards": shards, "source": [os.path.basename(str(p)) for p in paths]}
    with open(index_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    os.replace(index_path + ".tmp", index_path)
    return index
