"""LLaVA-format conversations + images -> token ids, exact labels and the preprocessed images.

A record's "image" is a path or a list of paths; each `<image>` tag of a user turn takes the next image, in
order, anywhere in the conversation (interleaved). Records without any tag get them put first (LLaVA's rule),
one per image. A record's "video" (a path or a list) works the same way with `<video>` tags (untagged videos
go first, before untagged images, as generation prompts place them); each video becomes `num_frames` images
(data/video_samples.py), in tag order among the images, each costing the processor's `tokens_per_frame`
placeholders (fewer than an image's with `model.mm_cfg.video.pool`). Items carry "images": [n, 3, H, W] (None for a text-only
sample), and with a video "video_frames": [n] bool (which of the images are its frames)."""
from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from contextlib import contextmanager
from typing import Sequence, Union

import torch
from torch.utils.data import Dataset

from nemo_neva.data.constants import IGNORE_INDEX, IMAGE_TOKEN, VIDEO_TOKEN
from nemo_neva.data.conversation import ConversationError, render
from nemo_neva.data.image_io import ImageError, ImageSource
from nemo_neva.data.media_members import MemberImages, MemberVideos
from nemo_neva.data.records import iter_records
from nemo_neva.data.tokenizer import encode_segments
from nemo_neva.data.processor import NevaProcessor
from nemo_neva.data.settings import DatasetSettings
from nemo_neva.data.video_io import VideoError
from nemo_neva.data.video_samples import VideoRef, VideoSource

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample that cannot be used; raised in strict mode, otherwise counted under `reason`."""

    def __init__(self, reason: str, detail: str, sample_id: str | None = None):
        super().__init__(f"sample {sample_id!r}: {reason}: {detail}" if sample_id else f"{reason}: {detail}")
        self.reason, self.detail, self.sample_id = reason, detail, sample_id


SAMPLE_ERRORS = (SampleError, ConversationError, ImageError)  # what a skipped sample raises


class RecordEncoder:
    """One record -> its item, the part every data path shares: media tags, template, tokenization, placeholder
    runs, labels, truncation, the media loaded within the limits and preprocessed; a bad sample is counted by
    reason in `skip_counts` (or raised with `strict`). `processor` (the model's `NevaProcessor`) owns the
    tokenizer, the image preprocessing and the placeholder counts, `settings` the template and the limits
    (data/settings.py). NevaDataset (a JSON/JSONL file) and StreamedRecordEncoder (tar shards, Energon samples)
    are the two kinds; they differ in where a record's media are read from (`self.images` / `self.videos`)."""

    def __init__(self, processor: NevaProcessor, settings: DatasetSettings = DatasetSettings()):
        self.processor, self.settings = processor, settings
        self.template = settings.template
        self.seq_length, self.strict = settings.seq_length, settings.strict
        self.steerlm_defaults, self.system_prompt = settings.steerlm_defaults, settings.system_prompt
        self.max_images_per_sample = int(settings.max_images_per_sample)
        self.max_image_tokens = None if settings.max_image_tokens is None else int(settings.max_image_tokens)
        self.video_settings = settings.video_settings
        self.image_token_id = processor.image_token_id
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN!r} token")
        self.images: ImageSource | None = None  # where a record's images / videos are read from
        self.videos: VideoSource | None = None
        self.video_root: str | None = None  # the folder `_videos` opens on the first video (None: no videos)
        self.truncated = 0
        self._logged: set = set()
        self.skip_counts: Counter = Counter()
        self._reported: Counter = Counter()

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def tiling(self):
        """The processor's `nemo_neva.modules.tiling.Tiling` (model.mm_cfg.image_tiling), or None."""
        return self.processor.tiling

    # ------------------------------------------------------------------ bookkeeping
    def _skip(self, sid: str, err: Exception) -> None:
        reason = getattr(err, "reason", "error")
        if isinstance(err, VideoError):
            reason = f"video_{reason}"
        elif isinstance(err, ImageError):
            reason = f"image_{reason}"
        if self.strict:
            raise SampleError(reason, getattr(err, "detail", str(err)), sid) from err
        self.skip_counts[reason] += 1
        if (sid, reason) not in self._logged:
            self._logged.add((sid, reason))
            log.warning("skipping sample %r (%s): %s", sid, reason, err)

    def take_new_skips(self) -> Counter:
        """Skips counted in this process (a DataLoader worker's copy, or the main process) since the last
        call, construction-time skips excluded. The collator calls it right after fetching a batch's
        items, so each batch carries the skips its own items caused."""
        new = self.skip_counts - self._reported
        self._reported = Counter(self.skip_counts)
        return new
    def _images(self) -> ImageSource:
        if self.images is None:
            raise ImageError("missing", "sample has an image but no image_folder was configured")
        return self.images

    def _videos(self) -> VideoSource:
        if self.videos is None:
            if not self.video_root:
                raise VideoError("missing", "sample has a video but no video_folder (or image_folder) was configured")
            self.videos = VideoSource(self.video_root, self.settings.video_settings, self.settings.video_limits)
        return self.videos

    # ------------------------------------------------------------------ text
    def _turns(self, rec) -> tuple[list, list]:
        """(turns with one `<image>` tag per image or video frame, the media in tag order: image paths and
        `VideoRef`s); raises on a bad record."""
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise SampleError("bad_record", "record is not an object with a 'conversations' list")
        images, videos = record_paths(rec, "image"), record_paths(rec, "video")
        if len(images) > self.max_images_per_sample:
            raise SampleError("too_many_images", f"{len(images)} images > max_images_per_sample "
                                                 f"{self.max_images_per_sample}")
        if videos and self.tiling is not None:
            raise SampleError("video_unsupported", "video samples with model.mm_cfg.image_tiling are not supported "
                                                   "(frames are not tiled)")
        turns = copy.deepcopy(rec["conversations"])
        texts = [t for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]
        for k, t in enumerate(turns):
            for tag in (IMAGE_TOKEN, VIDEO_TOKEN):
                if k % 2 and isinstance(t, dict) and tag in str(t.get("value", "")):
                    raise SampleError(f"{tag[1:-1]}_tag_in_reply", f"turn {k} is a reply containing {tag}")
        # untagged videos end up before untagged images, as inference/prompting.build_prompt places them
        for tag, items, kind in ((IMAGE_TOKEN, images, "image"), (VIDEO_TOKEN, videos, "video")):
            tags = sum(t["value"].count(tag) for t in texts)
            if items and tags == 0:
                if turns and isinstance(turns[0], dict) and isinstance(turns[0].get("value"), str):
                    # LLaVA puts a missing tag first; several items without tags all go first, in order
                    turns[0]["value"] = f"{tag}\n" * len(items) + turns[0]["value"]
            elif tags != len(items):
                raise SampleError(f"{kind}_count_mismatch", f"{tags} {tag} tag(s) but {len(items)} {kind}(s)")
        if not videos:
            return turns, images
        media, next_image, next_video = [], iter(images), iter(videos)
        frames = IMAGE_TOKEN * self.video_settings.num_frames
        for t in texts:  # in conversation order (replies hold no tags: checked above)
            parts = re.split(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})", t["value"])
            for i in range(1, len(parts), 2):
                if parts[i] == VIDEO_TOKEN:
                    media.append(VideoRef(next(next_video)))
                    parts[i] = frames
                else:
                    media.append(next(next_image))
            t["value"] = "".join(parts)
        return turns, media

    def encode(self, rec) -> tuple[list[int], list[int], list, bool]:
        """(input_ids, labels, media in tag order (image paths, `VideoRef`s), truncated) for one record; raises
        on a bad sample.
        Truncation never cuts an image run: a sample whose last run ends past seq_length is skipped."""
        turns, images = self._turns(rec)
        system = rec.get("system", self.system_prompt)
        segments = render(self.template, turns, system=system, attributes=rec.get("attributes"),
                          steerlm_defaults=self.steerlm_defaults, tokenizer=self.tokenizer)
        # One call for the whole text (never a batch call: in a DataLoader worker forked from a parent whose
        # `tokenizers` thread pool is up, a batch call hangs forever; single calls use no pool).
        flat, trainable, text = encode_segments(self.tokenizer, segments)
        decoded = self.tokenizer.decode(flat, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded != text or flat.count(self.image_token_id) != text.count(IMAGE_TOKEN):
            raise SampleError("tokenization_mismatch", f"decode(encode(text)) differs: {decoded[:80]!r}")
        ids, labels, image_end = [], [], 0
        # the k-th placeholder tag is the k-th image or video frame, in order (_turns checked the counts)
        tagged = iter([m for m in images
                       for _ in range(self.video_settings.num_frames if isinstance(m, VideoRef) else 1)])
        for tok, train in zip(flat, trainable):
            if tok == self.image_token_id:
                media = next(tagged)
                n = self.processor.tokens_per_frame if isinstance(media, VideoRef) else self.image_tokens(media)
                ids += [tok] * n
                labels += [IGNORE_INDEX] * n
                image_end = len(ids)
            else:
                ids.append(tok)
                labels.append(tok if train else IGNORE_INDEX)
        placeholders = ids.count(self.image_token_id)
        if self.max_image_tokens is not None and placeholders > self.max_image_tokens:
            raise SampleError("too_many_image_tokens", f"{placeholders} image placeholder tokens > "
                                                       f"max_image_tokens_per_sample {self.max_image_tokens}")
        truncated = len(ids) > self.seq_length
        if truncated:
            if image_end > self.seq_length:
                raise SampleError("image_does_not_fit",
                                  f"the last image run ends at {image_end} > seq_length {self.seq_length}")
            ids, labels = ids[: self.seq_length], labels[: self.seq_length]
        # labels[0] is never a next-token target (the collator shifts), so it does not count.
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            raise SampleError("no_trainable_tokens", "no assistant token left to train on")
        return ids, labels, images, truncated

    def image_tokens(self, image: str) -> int:
        """Placeholder tokens of one image (`NevaProcessor.size_token_count`, the count generation and export
        use too): with tiling from the size in the image's header, which only then is read."""
        if self.tiling is None:
            return self.processor.tokens_per_image
        return self.processor.size_token_count(*self._images().size(image))

    # ------------------------------------------------------------------ items
    def record_item(self, rec, sid: str):
        """The item of one record (every data path's: JSON here, tar shards and Energon through
        StreamedRecordEncoder), or None with the skip counted."""
        try:
            ids, labels, images, _ = self.encode(rec)
            loaded = [(isinstance(item, VideoRef), self._load(item)) for item in images]
            pil = [frame for _, frames in loaded for frame in frames]
            pixels = self.pixels(pil)
        except SAMPLE_ERRORS as e:
            self._skip(sid, e)
            return None
        item = make_item(ids, labels, pixels, sid)
        if any(is_video for is_video, _ in loaded):  # which images are video frames (the model may pool them)
            item["video_frames"] = torch.tensor([v for v, frames in loaded for _ in frames], dtype=torch.bool)
        if pil and self.tiling is not None:  # tiled images' original (height, width): the collator's `image_sizes`
            item["image_sizes"] = torch.tensor([(im.height, im.width) for im in pil], dtype=torch.long)
        return item

    def _load(self, item) -> list:
        """One media item -> its decoded images (an image: itself; a video: its sampled frames)."""
        return self._videos().load(item.path) if isinstance(item, VideoRef) else [self._images().load(item)]

    def pixels(self, pil_images) -> torch.Tensor | None:
        """Decoded images (PIL, in tag order) -> [n, 3, H, W] (tiled: [n, max_tiles, 3, tile, tile]) through the
        processor's `preprocess_images`; None for none."""
        if not pil_images:
            return None
        return torch.stack([self.processor.preprocess_images(im) for im in pil_images])


class NevaDataset(RecordEncoder, Dataset):
    """The records of a LLaVA JSON / JSONL file (or a list of them), `settings.image_folder` /
    `video_folder` holding their media. Parsing, rendering, tokenization and image header checks run at
    construction, so bad samples are counted before training. Image decoding runs in __getitem__; an image
    that fails there makes the item None (the collator drops it and reports `num_dropped`). Skips counted
    inside DataLoader workers land in the worker's copy of `skip_counts`; the collators carry them to the main
    process (`take_new_skips`, see collate.py), where the model sums them over data-parallel ranks.
    """

    def __init__(self, data_path: Union[str, Sequence[str]], processor: NevaProcessor,
                 settings: DatasetSettings = DatasetSettings()):
        super().__init__(processor, settings)
        folder = settings.image_folder
        self.images = ImageSource(folder, settings.max_image_bytes, settings.max_image_pixels) if folder else None
        # null: videos live beside the images; opened on the first video (a tar folder is indexed only then)
        self.video_root = settings.video_folder or folder
        self.records: list[dict] = []
        self.lengths: list[int] = []  # tokens per kept sample, for packing / length grouping
        total = 0
        for fallback_id, rec, error in iter_records(data_path):
            total += 1
            sid = rec.get("id", fallback_id) if isinstance(rec, dict) else fallback_id
            try:
                if error is not None:
                    raise SampleError("malformed_json", error)
                ids, _, images, truncated = self.encode(rec)
                if settings.prescan_images:  # header checks (videos: packets counted, nothing decoded)
                    for item in images:
                        if isinstance(item, VideoRef):
                            self._videos().check(item.path)
                        else:
                            self._images().check(item)
            except SAMPLE_ERRORS as e:
                self._skip(str(sid), e)
                continue
            rec = dict(rec, id=str(sid))
            self.records.append(rec)
            self.lengths.append(len(ids))
            self.truncated += truncated
        self.total = total
        self.prescan_skips = Counter(self.skip_counts)  # found before training, in every rank's copy
        self._reported = Counter(self.skip_counts)
        if not self.records:
            raise ValueError(f"no usable samples in {data_path!r}: {self.summary()}")

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skip_counts.items())) or "none"
        return (f"kept {len(self.records)}/{self.total} samples; skipped: {skipped}; "
                f"truncated: {self.truncated}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int):
        rec = self.records[idx]
        return self.record_item(rec, rec["id"])


def record_paths(rec: dict, key: str) -> list[str]:
    """A LLaVA record's media paths under `key` ("image" / "video") in order: absent/None, a path, or a list."""
    value = rec.get(key)
    if value is None:
        return []
    paths = value if isinstance(value, list) else [value]
    for path in paths:
        if not isinstance(path, str) or not path:
            raise SampleError("bad_record", f"'{key}' holds {type(path).__name__} {path!r}, expected a path "
                                            "or a list of paths")
    return list(paths)


def make_item(ids, labels, pixels, sid) -> dict:
    """The item every data path produces: "images" is [n, 3, H, W] in tag order, or None (text only)."""
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "images": pixels, "id": sid}


class StreamedRecordEncoder(RecordEncoder):
    """RecordEncoder for records that stream in with their media (tar shards, Energon samples): no annotation
    file, each record's media are its own (`sample_media`). Subclasses add the `item` that turns one streamed
    sample into a dataset item through `streamed_item`."""

    @contextmanager
    def sample_media(self, rec, images: Sequence = (), videos: Sequence = ()):
        """Within: the record's image and video names (record order) read `images` / `videos` (in that order:
        bytes, or PIL images / tensors from Energon's decoders) within the configured limits. A record whose
        names are not path lists raises its SampleError (bad_record) on entering."""
        named = rec if isinstance(rec, dict) else {}  # not a record: encode says bad_record
        try:
            self.images = MemberImages(record_paths(named, "image"), images, self.settings.max_image_bytes,
                                       self.settings.max_image_pixels)
            self.videos = MemberVideos(record_paths(named, "video"), videos, self.settings.video_settings,
                                       self.settings.video_limits)
            yield
        finally:
            self.images = self.videos = None

    def streamed_item(self, rec, sid: str, images: Sequence = (), videos: Sequence = ()):
        """`record_item` of a streamed record with its own media, or None (counted in skip_counts)."""
        try:
            with self.sample_media(rec, images, videos):
                return self.record_item(rec, sid)
        except SAMPLE_ERRORS as e:  # from sample_media: record_item counts its own
            self._skip(sid, e)
            return None
