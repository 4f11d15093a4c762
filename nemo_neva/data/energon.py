"""Megatron-Energon datasets: `model.data.data_path=<energon dataset folder or metadataset.yaml>`.

An Energon dataset is webdataset shards prepared by `energon prepare` (a `.nv-meta/` folder beside them:
split, sample type, field map or sample loader, tar index); a metadataset YAML blends or splits several.
NeMo 2, Megatron-LM and Megatron-Bridge read multimodal data this way, and so does nemo_neva here.

Energon reads, shards over data-parallel ranks, shuffles, blends (metadataset weights) and keeps a savable
position; our task encoder (`NevaTaskEncoder`) turns its typed samples into nemo_neva's rows with the same
code as the JSON and tar-shard paths: a sample becomes a LLaVA record (`sample_to_record`), `NevaDataset.encode`
renders it with the configured conversation template and tokenises it (image placeholders, truncation,
label masks), the image goes through image_io's byte/pixel limits and the HF image processor, and
NevaCollator / PackedCollator build the batch.

  CaptioningSample (stage 1)  -> [human "<image>", gpt caption]
  VQASample (stage 2)         -> context str + answers list: one turn with the best answer;
                                 context list + answers list: a multi-turn conversation (NeMo 2's convention)
  any sample with a `conversations` list (a LLaVA record) -> used as is

Images are handed to us undecoded (`NevaSampleDecoder` decodes text and JSON only), so the pixel limit is
checked before a decoder allocates anything. A bad sample is counted under its reason (as elsewhere:
`batch["skips"]`, summed over ranks by skip_tally.py) and skipped: Energon fills the batch with the next
sample, so every row is real. `model.data.strict=true` makes it an error instead.

Ranks: one Energon loader per data-parallel rank (WorkerConfig rank / world size / group = the DP group);
tensor- and pipeline-parallel ranks of one DP rank build the same loader and so read the same batches.

Resume: `EnergonLoader` keeps Energon's savable state as of the batches *trained* (Lightning prefetches one
batch ahead, so the loader's own current state is one batch too far): a snapshot before each fetch, the
trained one selected by `mark_trained`. Checkpoints store every DP rank's state (gathered to all ranks of the
group, written by rank 0) in plain types (`to_plain`), loadable with `torch.load(weights_only=True)`; only
Energon's own state classes are rebuilt from it. A relaunch restores each rank's state and continues with
exactly the batches an uninterrupted run would have trained.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections import Counter, deque
from typing import Any, Mapping, Optional

import torch

from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.constants import IMAGE_TOKEN
from nemo_neva.data.dataset import _ERRORS, NevaDataset, SampleError
from nemo_neva.data.image_io import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, _decode, preprocess
from nemo_neva.data.packing import PackedCollator, first_fit_decreasing

log = logging.getLogger(__name__)

META_DIR = ".nv-meta"
STATE_FORMAT = "nemo_neva.energon_state/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif", "bmp")
_TEXT_EXTS = ("txt", "text", "transcript")


# ---------------------------------------------------------------------------------------- locating
def is_energon_path(path) -> bool:
    """An Energon dataset folder (it has `.nv-meta/`) or an Energon metadataset YAML file."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = str(path)
    if os.path.isdir(path):
        return os.path.isdir(os.path.join(path, META_DIR))
    if os.path.isfile(path) and path.endswith((".yaml", ".yml")):
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return False
        return isinstance(doc, dict) and str(doc.get("__module__", "")).startswith("megatron.energon") \
            and str(doc.get("__class__", "")).startswith("Metadataset")
    return False


def _require_energon():
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


def sample_to_record(sample) -> tuple[dict, Any]:
    """(LLaVA record, image or None) for an Energon sample. The record's `image` is a name for messages
    only; the image itself (bytes, PIL image or CHW tensor) is returned beside it."""
    key = str(getattr(sample, "__key__", "") or "")
    image = getattr(sample, "image", None)
    if isinstance(image, (list, tuple)):
        if len(image) > 1:
            raise SampleError("multiple_images", f"{len(image)} images; at most one is supported")
        image = image[0] if image else None
    conversations = getattr(sample, "conversations", None)
    if isinstance(sample, Mapping):  # a plain dict sample (e.g. from a cooker)
        conversations, image = sample.get("conversations"), sample.get("image", image)
        key = str(sample.get("__key__", key))
    if conversations is not None:
        turns = conversations
    elif hasattr(sample, "caption"):  # CaptioningSample
        turns = [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": _text(sample.caption)}]
    elif hasattr(sample, "context"):  # VQASample
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
    if image is not None:
        rec["image"] = key or "image"
    return rec, image


def _to_pil(image, name: str, max_bytes: int, max_pixels: int):
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        if len(image) > max_bytes:
            raise ImageError("too_large", f"{name!r}: {len(image)} bytes > {max_bytes}")
        return _decode(bytes(image), name, max_pixels, header_only=False)
    if isinstance(image, Image.Image):
        if image.width * image.height > max_pixels:
            raise ImageError("too_many_pixels", f"{name!r}: {image.width}x{image.height} > {max_pixels} pixels")
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):  # Energon's default decoder: CHW float in [0, 1] (or uint8)
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ImageError("decode_failed", f"{name!r}: image tensor of shape {tuple(t.shape)}")
        if t.shape[1] * t.shape[2] > max_pixels:
            raise ImageError("too_many_pixels", f"{name!r}: {t.shape[2]}x{t.shape[1]} > {max_pixels} pixels")
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round()
        arr = t.to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]).convert("RGB")
    raise ImageError("decode_failed", f"{name!r}: unsupported image value {type(image).__name__}")


class _SampleEncoder(NevaDataset):
    """NevaDataset's encoding and skip bookkeeping (templates, tokeniser, placeholders, limits), without
    an annotation file: the records come from Energon samples."""

    def __init__(self, tokenizer, image_processor, template, image_aspect_ratio, seq_length, num_image_tokens,
                 strict, max_image_bytes=DEFAULT_MAX_BYTES, max_image_pixels=DEFAULT_MAX_PIXELS,
                 steerlm_defaults=None, system_prompt=None):
        self._init_encoding(tokenizer, image_processor, template, image_aspect_ratio, seq_length,
                            num_image_tokens, strict, steerlm_defaults, system_prompt)
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.images = None
        self.truncated = 0
        self._logged: set = set()
        self.records, self.lengths, self.total = [], [], 0

    def item(self, sample) -> Optional[dict]:
        """The nemo_neva item of one Energon sample, or None (counted in skip_counts)."""
        sid = str(getattr(sample, "__key__", "?"))
        try:
            rec, image = sample_to_record(sample)
            sid = rec["id"] or sid
            ids, labels, image_name, truncated = self.encode(rec)
            self.truncated += truncated
            pixels = None
            if image_name is not None:
                pixels = preprocess(_to_pil(image, sid, self.max_image_bytes, self.max_image_pixels),
                                    self.image_processor, self.image_aspect_ratio)
        except _ERRORS as e:
            self._skip(sid, e)
            return None
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "image": pixels, "id": sid}


def make_task_encoder(encoder: _SampleEncoder, pad_id: int, packed_seq_length: Optional[int] = None):
    """Energon TaskEncoder: sample -> nemo_neva item (SkipSample for a bad one) -> [packed rows] -> batch."""
    energon = _require_energon()
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


# ---------------------------------------------------------------------------------------- state as plain data
def to_plain(obj):
    """Energon's loader state -> dicts, lists, str, bytes, numbers and tensors only (weights_only-loadable)."""
    import numpy as np

    from megatron.energon.state import FlexState

    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, FlexState):
        return {"__flex__": {str(k): to_plain(v) for k, v in obj.items()}}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"__energon__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_plain(v) for k, v in obj.items()}
        return {"__dict__": [[to_plain(k), to_plain(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_plain(v) for v in obj]}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone()}
    if isinstance(obj, np.generic):
        return {"__npscalar__": obj.item(), "dtype": str(obj.dtype)}
    raise TypeError(f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} in a data position")


def from_plain(obj):
    """Inverse of to_plain; rebuilds only dataclasses defined in megatron.energon."""
    import numpy as np

    from megatron.energon.state import FlexState

    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__flex__" in obj:
        return FlexState({k: from_plain(v) for k, v in obj["__flex__"].items()})
    if "__tuple__" in obj:
        return tuple(from_plain(v) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {from_plain(k): from_plain(v) for k, v in obj["__dict__"]}
    if "__ndarray__" in obj:
        return obj["__ndarray__"].numpy().copy()
    if "__npscalar__" in obj:
        return np.dtype(obj["dtype"]).type(obj["__npscalar__"])
    if "__energon__" in obj:
        module, _, qualname = str(obj["__energon__"]).partition(":")
        if module != "megatron.energon" and not module.startswith("megatron.energon."):
            raise ValueError(f"data position names {obj['__energon__']!r}, not an Energon state class")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ValueError(f"data position names {obj['__energon__']!r}, which is not an Energon state class")
        fields = {k: from_plain(v) for k, v in obj["fields"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        inst = cls(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                object.__setattr__(inst, k, v)
        return inst
    return {k: from_plain(v) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------- loaders
class EnergonLoader:
    """Iterable over one DP rank's Energon batches, keeping the savable state of the *trained* batches.

    `mark_trained()` (called by the model after each optimizer step) advances the trained count;
    `energon_state()` -> this rank's state after the trained batches; `load_energon_state(state)` before
    iterating continues from there. `len()` is Energon's batches per rank and epoch (the stream itself repeats).
    """

    def __init__(self, loader, source: "EnergonSource", savable: bool = True):
        self.loader, self.source, self.savable = loader, source, savable
        self.dataset = source
        self._snapshots: deque = deque()  # (batches yielded before it, state)
        self._yielded = self._trained = 0

    def __len__(self) -> int:
        return len(self.loader)

    def _snapshot(self) -> None:
        if self.savable and (not self._snapshots or self._snapshots[-1][0] != self._yielded):
            self._snapshots.append((self._yielded, self.loader.save_state_rank()))

    def __iter__(self):
        for batch in _snapshotting(self):
            yield batch

    def mark_trained(self) -> None:
        self._trained += 1
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= self._trained:
            self._snapshots.popleft()
        if self._yielded == self._trained:  # nothing prefetched: the loader's state is the trained one
            self._snapshot()

    def _trained_snapshot(self):
        for n, state in self._snapshots:
            if n == self._trained:
                return state
        if self._yielded == self._trained:
            return self.loader.save_state_rank()
        raise RuntimeError(f"no Energon state for {self._trained} trained batches "
                           f"(have {[n for n, _ in self._snapshots]})")

    def energon_state(self) -> dict:
        """This rank's position, in plain types (see module docstring)."""
        return {"format": STATE_FORMAT, "trained_batches": self._trained, "config": self.source.fingerprint,
                "state": to_plain(self._trained_snapshot())}

    def load_energon_state(self, state: Mapping) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown Energon data position format {state.get('format')!r}")
        if state.get("config") != self.source.fingerprint:
            raise ValueError(f"this checkpoint's Energon data position was saved for {state.get('config')}, "
                             f"but the data is now {self.source.fingerprint}; resume with the same data, batch "
                             f"size, packing, ranks and workers, or start over")
        restored = from_plain(state["state"])
        self.loader.restore_state_rank(restored)
        self._yielded = self._trained = int(state.get("trained_batches", 0))
        self._snapshots = deque([(self._trained, restored)])

    def trained_batches(self) -> int:
        return self._trained


def _snapshotting(wrapper: EnergonLoader):
    # Before iter(): with workers that have not started yet, Energon answers from its initial (or restored)
    # state; asked after iter() but before the first fetch it would wait for workers that do not exist yet.
    wrapper._snapshot()
    it = iter(wrapper.loader)
    while True:
        wrapper._snapshot()  # the state after the batches yielded so far (a no-op if already taken)
        try:
            batch = next(it)
        except StopIteration:
            return
        wrapper._yielded += 1
        yield batch


class EnergonSource:
    """What `build_dataset` returns for an Energon path: the settings; `loader()` builds Energon's datasets."""

    prescan_skips: Counter = Counter()  # Energon samples are checked while streaming
    energon_source = True  # the model's _loader asks for this loader

    def __init__(self, path: str, encoder: _SampleEncoder, pad_id: int, seed: int, dp_rank: int, dp_size: int,
                 dp_group=None, num_workers: int = 0, shuffle_buffer: int = 1000,
                 max_samples_per_sequence: Optional[int] = 100, packed_seq_length: Optional[int] = None,
                 pack_buffer: int = 1000, split_part: str = "train", strict: bool = False):
        _require_energon()
        self.path, self.encoder, self.pad_id, self.seed = path, encoder, pad_id, int(seed)
        self.dp_rank, self.dp_size, self.dp_group = int(dp_rank), int(dp_size), dp_group
        self.num_workers, self.shuffle_buffer = int(num_workers), int(shuffle_buffer)
        self.max_samples_per_sequence = max_samples_per_sequence
        self.packed_seq_length, self.pack_buffer = packed_seq_length, int(pack_buffer)
        self.split_part, self.strict = split_part, strict
        self.fingerprint: dict = {}

    @property
    def skip_counts(self) -> Counter:
        return self.encoder.skip_counts

    def take_new_skips(self) -> Counter:
        return self.encoder.take_new_skips()

    def worker_config(self):
        from megatron.energon import WorkerConfig
        from megatron.energon.errors import log_exception, reraise_exception

        return WorkerConfig(rank=self.dp_rank, world_size=self.dp_size, num_workers=self.num_workers,
                            data_parallel_group=self.dp_group if self.dp_size > 1 else None,
                            seed_offset=self.seed,
                            global_error_handler=reraise_exception if self.strict else log_exception)

    def loader(self, batch_size: int, training: bool) -> EnergonLoader:
        """Training: Energon's repeating, shuffled, blended stream with a savable loader. Evaluation: one
        pass over `split_part` (default "val"; a dataset prepared with all samples in train: set
        model.data.energon_val_split=train)."""
        from megatron.energon import get_loader, get_savable_loader, get_train_dataset, get_val_dataset

        wc = self.worker_config()
        task_encoder = make_task_encoder(self.encoder, self.pad_id, self.packed_seq_length)
        packing = self.pack_buffer if self.packed_seq_length else None
        self.fingerprint = {"path": os.path.abspath(self.path), "batch_size": int(batch_size),
                            "dp_size": self.dp_size, "num_workers": self.num_workers, "seed": self.seed,
                            "shuffle_buffer": self.shuffle_buffer, "packed": self.packed_seq_length,
                            "pack_buffer": packing, "max_samples_per_sequence": self.max_samples_per_sequence}
        if training:
            ds = get_train_dataset(self.path, split_part=self.split_part, worker_config=wc, batch_size=batch_size,
                                   batch_drop_last=True, packing_buffer_size=packing,
                                   shuffle_buffer_size=self.shuffle_buffer if self.shuffle_buffer > 1 else None,
                                   max_samples_per_sequence=self.max_samples_per_sequence,
                                   task_encoder=task_encoder)
            return EnergonLoader(get_savable_loader(ds), self, savable=True)
        ds = get_val_dataset(self.path, split_part=self.split_part, worker_config=wc, batch_size=batch_size,
                             packing_buffer_size=packing, task_encoder=task_encoder)
        return EnergonLoader(get_loader(ds), self, savable=False)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.encoder.skip_counts.items())) or "none"
        return f"Energon dataset {self.path} (split {self.split_part}); skipped in this process: {skipped}"


def build_source(data_cfg, path: str, *, tokenizer, image_processor, seq_length: int, num_image_tokens: int,
                 seed: int, dp_rank: int, dp_size: int, dp_group=None, split_part: str = "train") -> EnergonSource:
    """EnergonSource from the model's `data` config (the keys the other data paths read, same meaning)."""
    strict = bool(data_cfg.get("strict", False))
    encoder = _SampleEncoder(tokenizer, image_processor, data_cfg.get("conv_template", "plain"),
                             data_cfg.get("image_aspect_ratio", "square"), seq_length, num_image_tokens, strict)
    packed = seq_length if data_cfg.get("packed_sequence", False) else None
    return EnergonSource(path, encoder, tokenizer.pad_token_id, seed, dp_rank, dp_size, dp_group,
                         num_workers=data_cfg.get("num_workers", 0), shuffle_buffer=data_cfg.get("shuffle_buffer", 1000),
                         max_samples_per_sequence=data_cfg.get("max_samples_per_sequence", 100),
                         packed_seq_length=packed, pack_buffer=data_cfg.get("pack_window", 1000),
                         split_part=split_part, strict=strict)


# ---------------------------------------------------------------------------------------- checkpoint glue
def gather_states(loader: EnergonLoader, group=None) -> list:
    """Every DP rank's `energon_state()`, in DP-rank order, on every rank of the group (a collective)."""
    mine = loader.energon_state()
    if not torch.distributed.is_initialized() or loader.source.dp_size == 1:
        return [mine]
    out = [None] * loader.source.dp_size
    torch.distributed.all_gather_object(out, mine, group=group)
    return out


def restore_states(loader: EnergonLoader, states) -> None:
    if not isinstance(states, list) or len(states) != loader.source.dp_size:
        n = len(states) if isinstance(states, list) else "no"
        raise ValueError(f"this checkpoint holds {n} Energon data positions for {loader.source.dp_size} "
                         "data-parallel ranks; resume with the data-parallel size it was saved with")
    loader.load_energon_state(states[loader.source.dp_rank])


__all__ = ["is_energon_path", "build_source", "EnergonSource", "EnergonLoader", "sample_to_record",
           "make_task_encoder", "to_plain", "from_plain", "gather_states", "restore_states"]
