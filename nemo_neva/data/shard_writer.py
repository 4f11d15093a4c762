"""Writing tar shards from LLaVA JSON + an image folder (`scripts/convert_llava_to_shards.py`): each image is
checked against the path / byte / pixel limits and decoded once, each video against `model.data.video`'s
limits (and its sampled frames decoded once), and the shard index and rejected list are written beside the
shards. Reading them back is shards.py."""
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
                                     decode_image)
from nemo_neva.data.records import iter_records
from nemo_neva.data.shard_encoding import member_ext
from nemo_neva.data.shards import FORMAT, INDEX_NAME
from nemo_neva.data.video_io import VideoError, VideoSettings, sniff_container, open_video, probe_video
from nemo_neva.data.video_samples import VideoLimits, VideoSource

log = logging.getLogger(__name__)


_PIL_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
_VIDEO_EXT = {"mp4": "mp4", "matroska": "mkv", "avi": "avi"}  # video_io's sniffed container -> member extension


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
    decode_image(raw, rel, images.max_pixels, header_only=not full_decode)
    with Image.open(io.BytesIO(raw), formats=sorted(_PIL_EXT)) as img:
        return raw, _PIL_EXT[img.format]


def _video_bytes(videos: VideoSource, rel: str, full_decode: bool) -> tuple[bytes, str]:
    """The video's bytes and member extension, after VideoSource's path/size checks and open_video's checks
    (format, stream, frame count, pixel budget at the default num_frames; full_decode: its sampled frames
    decoded too, else packets counted only)."""
    raw = videos._read(rel)
    if isinstance(raw, str):
        with open(raw, "rb") as f:
            raw = f.read()
    (open_video if full_decode else probe_video)(raw, **videos._kw())
    return raw, _VIDEO_EXT[sniff_container(raw[:12])]


def convert_to_shards(data_path: Union[str, Sequence[str]], image_folder: str | None, output_dir: str,
                      samples_per_shard: int = 1000, prefix: str = "shard", full_decode: bool = True,
                      max_image_bytes: int = DEFAULT_MAX_BYTES, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                      video_folder: str | None = None, video_limits: VideoLimits = VideoLimits()) -> dict:
    """LLaVA JSON/JSONL + images (+ videos) -> `<prefix>-NNNNNN.tar` shards, `index.json`, and `rejected.jsonl`
    (one line per sample left out: id, reason, detail). Returns the index (also holding the counts).

    Checked here: the annotation line parses, the record is an object with a `conversations` list, its
    "image" / "video" is a path or a list of paths, every image passes image_io's path, byte and pixel limits
    and decodes (`full_decode=False`: header only), every video (under `video_folder`, default the image
    folder) passes `video_limits` and its sampled frames decode (`full_decode=False`: packets counted only).
    Tag counts, max_images_per_sample and template/tokenizer checks happen when the shards are read (they
    depend on the training config); so do the video checks that depend on num_frames.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    os.makedirs(output_dir, exist_ok=True)
    index_path = os.path.join(output_dir, INDEX_NAME)
    if os.path.exists(index_path):
        raise FileExistsError(f"{index_path} exists; convert into an empty folder")
    image_source = ImageSource(image_folder, max_image_bytes, max_image_pixels) if image_folder else None
    video_root, video_source = video_folder or image_folder, None  # opened on the first video, as NevaDataset
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
                images = []  # (bytes, extension) per image, in the record's order
                for name in record_paths(rec, "image"):
                    if image_source is None:
                        raise ImageError("missing", "sample has an image but no image folder was given")
                    images.append(_image_bytes(image_source, name, full_decode))
                videos = []  # the same per video
                for name in record_paths(rec, "video"):
                    if not video_root:
                        raise VideoError("missing", "sample has a video but no video (or image) folder was given")
                    video_source = video_source or VideoSource(video_root, VideoSettings(), video_limits)
                    videos.append(_video_bytes(video_source, name, full_decode))
            except (SampleError, ImageError) as e:
                reason = e.reason if isinstance(e, SampleError) else \
                    f"{'video' if isinstance(e, VideoError) else 'image'}_{e.reason}"
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
            for media in (images, videos):  # record order per kind: the reader pairs them with the names
                for i, (data, ext) in enumerate(media):
                    _add_member(tf, f"{key}.{member_ext(ext, i, len(media))}", data)
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
