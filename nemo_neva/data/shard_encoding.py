"""One tar-shard sample (`{field: bytes}`) -> a NevaDataset item, and the media members' naming (read by
shards.py, written by shard_writer.py): `<key>.<ext>` for a sample's only image, `<key>.<i>.<ext>` for image i of
several, in the order of the record's "image" list (= `<image>` tag order); videos the same, by their container
(`mp4`, `mkv`, `avi`) in the order of its "video" list. The record keeps its tags, so the reader puts images
and videos in the JSON path's media order."""
from __future__ import annotations

import json
import re
from typing import Mapping

from nemo_neva.data.dataset import SAMPLE_ERRORS, SampleError, StreamedRecordEncoder
from nemo_neva.data.image_io import ImageError
from nemo_neva.data.video_io import VideoError

IMAGE_EXTS = ("png", "jpg", "webp", "gif", "bmp")
VIDEO_EXTS = ("mp4", "mkv", "avi")  # video_io's containers (mp4/mov, Matroska/WebM, AVI), as the writer names them


def member_ext(ext: str, index: int, count: int) -> str:
    """A sample's media member name after its key: `<key>.png` for its only image, `<key>.<i>.png` for image i
    of several (webdataset field `i.png`), so single-image shards keep the plain layout (videos likewise)."""
    return ext if count == 1 else f"{index}.{ext}"


def _numbered(exts) -> re.Pattern:
    return re.compile(r"(\d+)\.(" + "|".join(exts) + r")")


_NUMBERED = {"image": (_numbered(IMAGE_EXTS), IMAGE_EXTS, ImageError),
             "video": (_numbered(VIDEO_EXTS), VIDEO_EXTS, VideoError)}


def shard_media(fields: Mapping[str, bytes], kind: str = "image") -> list[bytes]:
    """A shard sample's image (or video) bytes in record order (see member_ext)."""
    pattern, exts, error = _NUMBERED[kind]
    numbered = sorted((int(m.group(1)), v) for k, v in fields.items() if (m := pattern.fullmatch(k)))
    if numbered:
        if [i for i, _ in numbered] != list(range(len(numbered))):
            raise error("missing", f"{kind} members {[i for i, _ in numbered]} are not 0..{len(numbered) - 1}")
        return [v for _, v in numbered]
    ext = next((x for x in exts if x in fields), None)
    return [] if ext is None else [fields[ext]]


def parse_record(fields: Mapping[str, bytes], fallback_id: str):
    """The sample's `<key>.json` record (malformed_json if absent or unreadable)."""
    try:
        return json.loads(fields["json"].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError("malformed_json", f"{fallback_id}: {e}") from e


class ShardRecordEncoder(StreamedRecordEncoder):
    """NevaDataset's per-record encoding and skip bookkeeping, without reading an annotation file."""

    def item(self, fields: Mapping[str, bytes], fallback_id: str):
        """The NevaDataset item for one shard sample, or None (counted in skip_counts)."""
        sid = fallback_id
        try:
            rec = parse_record(fields, fallback_id)
            if isinstance(rec, dict):
                sid = str(rec.get("id", fallback_id))
            images, videos = shard_media(fields, "image"), shard_media(fields, "video")
        except SAMPLE_ERRORS as e:
            self._skip(sid, e)
            return None
        return self.streamed_item(rec, sid, images, videos)

    def encode_fields(self, rec, fields: Mapping[str, bytes]):
        """`encode(rec)` with the sample's members as its media (a tiled image's count reads its header)."""
        with self.sample_media(rec, shard_media(fields, "image"), shard_media(fields, "video")):
            return self.encode(rec)
