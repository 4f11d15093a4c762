"""One tar-shard sample (`{field: bytes}`) -> a NevaDataset item, and the image members' naming (read by
shards.py, written by shard_writer.py): `<key>.<ext>` for a sample's only image, `<key>.<i>.<ext>` for image i of
several, in `<image>` tag order."""
from __future__ import annotations

import json
import re
from typing import Mapping

from nemo_neva.data.dataset import _ERRORS, SampleError, StreamedRecordEncoder, make_item
from nemo_neva.data.image_io import ImageError, _decode

IMAGE_EXTS = ("png", "jpg", "webp", "gif", "bmp")


def image_member_ext(ext: str, index: int, count: int) -> str:
    """A sample's image member name after its key: `<key>.png` for its only image, `<key>.<i>.png` for image i
    of several (webdataset field `i.png`), so single-image shards keep the plain layout."""
    return ext if count == 1 else f"{index}.{ext}"


_NUMBERED_IMAGE = re.compile(r"(\d+)\.(" + "|".join(IMAGE_EXTS) + r")")


def shard_images(fields: Mapping[str, bytes]) -> list[bytes]:
    """A shard sample's image bytes in tag order (see image_member_ext)."""
    numbered = sorted((int(m.group(1)), v) for k, v in fields.items() if (m := _NUMBERED_IMAGE.fullmatch(k)))
    if numbered:
        if [i for i, _ in numbered] != list(range(len(numbered))):
            raise ImageError("missing", f"image members {[i for i, _ in numbered]} are not 0..{len(numbered) - 1}")
        return [v for _, v in numbered]
    ext = next((x for x in IMAGE_EXTS if x in fields), None)
    return [] if ext is None else [fields[ext]]


class ShardRecordEncoder(StreamedRecordEncoder):
    """NevaDataset's per-record encoding and skip bookkeeping, without reading an annotation file."""

    def item(self, fields: Mapping[str, bytes], fallback_id: str):
        """The NevaDataset item for one shard sample, or None (counted in skip_counts)."""
        sid = fallback_id
        try:
            try:
                rec = json.loads(fields["json"].decode("utf-8"))
            except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SampleError("malformed_json", f"{fallback_id}: {e}") from e
            if isinstance(rec, dict):
                sid = str(rec.get("id", fallback_id))
            ids, labels, images, _ = self.encode(rec)
            data = shard_images(fields) if images else []
            if len(data) != len(images):
                raise ImageError("missing", f"{len(images)} image(s) {images!r} but {len(data)} in the shard")
            decoded = []
            for name, raw in zip(images, data):
                if len(raw) > self.max_image_bytes:
                    raise ImageError("too_large", f"{name!r}: {len(raw)} bytes > {self.max_image_bytes}")
                decoded.append(_decode(raw, name, self.max_image_pixels, header_only=False))
            pixels = self.pixels(decoded)
        except _ERRORS as e:
            self._skip(sid, e)
            return None
        return make_item(ids, labels, pixels, sid)
