"""Energon samples -> nemo_neva items: the task encoder of nemo_neva/data/energon.py (see its docstring).

Hand-written because the mapping is ours: Energon's typed samples become LLaVA records, which NevaDataset's
encoding (templates, tokeniser, placeholders, label masks) and item building (image_io's and video_io's limits,
tiling) turn into the rows every other nemo_neva data path produces. Media arrive undecoded (`make_decoder`), so
the pixel and frame limits are checked first.
"""
from __future__ import annotations

import json
from typing import Mapping, Optional

from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.constants import IMAGE_TOKEN
from nemo_neva.data.dataset import SAMPLE_ERRORS, SampleError, StreamedRecordEncoder
from nemo_neva.data.packing import PackedCollator, first_fit_decreasing

_TEXT_EXTS = ("txt", "text", "transcript")


def require_energon():
    try:
        import megatron.energon as energon
    except ImportError as e:  # pragma: no cover - the dev venv installs it (Makefile)
        raise ImportError("model.data.data_path names a Megatron-Energon dataset, but megatron-energon is not "
                          "installed: pip install megatron-energon==7.4.1") from e
    return energon


# ---------------------------------------------------------------------------------------- decoding
def _energon_decoder_base():
    from megatron.energon.flavors.webdataset.sample_decoder import SampleDecoder

    return SampleDecoder


class _DecoderMixin:
    """Decodes a webdataset sample's text and JSON parts and leaves every other part (images) as bytes.
    Nothing is unpickled (webdataset's default handlers would unpickle `.pyd` / `.pickle` parts)."""

    def _init(self):
        self._config = {"nemo_neva_decoder": 1}

    @staticmethod
    def _one(ext: str, raw):
        if not isinstance(raw, (bytes, bytearray)):
            return raw
        last = ext.rsplit(".", 1)[-1].lower()
        if last == "json":
            return json.loads(bytes(raw).decode("utf-8"))
        if last in _TEXT_EXTS:
            return bytes(raw).decode("utf-8")
        if last in ("cls", "cls2", "index", "inx", "id"):
            return int(bytes(raw).decode("utf-8").strip())
        return bytes(raw)

    def __call__(self, sample: dict) -> dict:
        return {k: (v if k.startswith("__") else self._one(k, v)) for k, v in sample.items()}

    def decode(self, fname: str, raw: bytes):
        return self._one(fname.rsplit(".", 1)[-1] if "." in fname else "", raw)

    def config(self) -> dict:
        return self._config


def make_decoder():
    base = _energon_decoder_base()

    class NevaSampleDecoder(_DecoderMixin, base):  # an Energon SampleDecoder for its isinstance checks
        def __init__(self):
            self._init()

    return NevaSampleDecoder()


# ---------------------------------------------------------------------------------------- samples -> records
def _text(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    if not isinstance(value, str):
        raise SampleError("bad_record", f"expected text, got {type(value).__name__}")
    return value


def _best_answer(answers, weights) -> str:
    if weights is not None and len(weights) == len(answers):
        w = [float(x) for x in (weights.tolist() if hasattr(weights, "tolist") else weights)]
        return _text(answers[max(range(len(answers)), key=lambda i: (w[i], -i))])
    return _text(answers[0])


def _listed(value) -> list:
    return [v for v in value if v is not None] if isinstance(value, (list, tuple)) else \
        ([] if value is None else [value])


def sample_to_record(sample) -> tuple[dict, list, list]:
    """(LLaVA record, images, videos) for an Energon sample. `image` may hold one image or a list of them
    (several images, in `<image>` tag order: what scripts/convert_llava_to_energon.py writes for multi-image
    records); a `LlavaSample` (energon_sample.py) carries the record itself with its images' and videos' bytes.
    The record's "image" / "video" hold the names its media are found by (messages name them); the media
    themselves (bytes, PIL images or CHW tensors; videos: bytes) are returned beside it, in the names' order."""
    key = str(getattr(sample, "__key__", "") or "")
    record = getattr(sample, "record", None)
    if isinstance(record, Mapping):  # LlavaSample: the record as the JSON path reads it
        return dict(record, id=key or record.get("id", "")), _listed(sample.images), _listed(sample.videos)
    image, video = getattr(sample, "image", None), getattr(sample, "video", None)
    conversations = getattr(sample, "conversations", None)
    if isinstance(sample, Mapping):  # a plain dict sample (e.g. from a cooker)
        conversations, image = sample.get("conversations"), sample.get("image", image)
        video, key = sample.get("video", video), str(sample.get("__key__", key))
    images, videos = _listed(image), _listed(video)
    if conversations is not None:
        turns = conversations
    elif hasattr(sample, "caption"):  # CaptioningSample
        turns = [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": _text(sample.caption)}]
    elif hasattr(sample, "context"):  # VQASample, VidQASample (its video undecoded: bytes)
        context, answers = sample.context, sample.answers
        if answers is None or (isinstance(answers, (list, tuple)) and not answers):
            raise SampleError("no_trainable_tokens", "VQA sample without an answer")
        if isinstance(context, (list, tuple)):  # multi-turn: context[i] is answered by answers[i]
            if not isinstance(answers, (list, tuple)) or len(answers) != len(context):
                raise SampleError("bad_record", f"{len(context)} questions but "
                                  f"{len(answers) if isinstance(answers, (list, tuple)) else 1} answers")
            pairs = [(_text(q), _text(a)) for q, a in zip(context, answers)]
        else:
            answer = _best_answer(answers, getattr(sample, "answer_weights", None)) \
                if isinstance(answers, (list, tuple)) else _text(answers)
            pairs = [(_text(context), answer)]
        turns = []
        for q, a in pairs:
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    else:
        raise SampleError("unsupported_sample", f"{type(sample).__name__} has no caption, context or conversations")
    rec = {"id": key, "conversations": list(turns)}
    system = getattr(sample, "system", None)
    if isinstance(system, str):
        rec["system"] = system
    name = key or "sample"
    for field, media in (("image", images), ("video", videos)):
        if len(media) == 1:
            rec[field] = name
        elif media:
            rec[field] = [f"{name}[{i}]" for i in range(len(media))]
    return rec, images, videos


class EnergonSampleEncoder(StreamedRecordEncoder):
    """NevaDataset's encoding and skip bookkeeping (templates, tokeniser, placeholders, limits, tiling), without
    an annotation file: the records come from Energon samples."""

    def item(self, sample) -> Optional[dict]:
        """The nemo_neva item of one Energon sample, or None (counted in skip_counts)."""
        sid = str(getattr(sample, "__key__", "?"))
        try:
            rec, images, videos = sample_to_record(sample)
            sid = rec["id"] or sid
        except SAMPLE_ERRORS as e:
            self._skip(sid, e)
            return None
        return self.streamed_item(rec, sid, images, videos)


def make_task_encoder(encoder: EnergonSampleEncoder, pad_id: int, packed_seq_length: Optional[int] = None):
    """Energon TaskEncoder: sample -> nemo_neva item (SkipSample for a bad one) -> [packed rows] -> batch."""
    energon = require_energon()
    from megatron.energon.task_encoder.base import stateless

    class NevaTaskEncoder(energon.DefaultTaskEncoder):
        def __init__(self):
            super().__init__()
            self.decoder = make_decoder()
            self.encoder, self.pad_id, self.packed_seq_length = encoder, int(pad_id), packed_seq_length
            if packed_seq_length:
                self.collate = PackedCollator(self.pad_id, seq_length=packed_seq_length,
                                              skip_source=encoder.take_new_skips)
            else:
                self.collate = NevaCollator(self.pad_id, skip_source=encoder.take_new_skips)

        @stateless
        def encode_sample(self, sample):
            item = self.encoder.item(sample)
            if item is None:
                raise energon.SkipSample()
            if self.packed_seq_length and len(item["input_ids"]) - 1 > self.packed_seq_length:
                raise energon.SkipSample()  # cannot happen: encode truncates to seq_length
            return item

        def select_samples_to_pack(self, samples):
            bins = first_fit_decreasing([max(len(s["input_ids"]) - 1, 0) for s in samples], self.packed_seq_length)
            return [[samples[i] for i in b] for b in bins]

        @stateless
        def pack_selected_samples(self, samples):
            return list(samples)  # one packed row = its samples; PackedCollator lays them out

        def batch(self, samples):
            return self.collate(samples)

        def encode_batch(self, batch):
            return batch

    return NevaTaskEncoder()  # the packing hooks act only with a packing buffer (packed_sequence)


