"""The Triton model of a NeVA: NeMo 1's multimodal request tensors -> checked prompts -> batched generation.

Inputs are named and typed as NeMo 1's multimodal Triton deployment (`nemo/export/tensorrt_mm_exporter.py`,
whose clients send numpy's default integer, INT64), so `query_multimodal`-style clients keep working:

    input_text          BYTES  [1]            the user's question; the server renders the model's template
    input_media         UINT8  [N, H, W, 3]   RGB pixels of the prompt's N images, in `<image>` order (optional:
                                              omitted or N = 0 is a text-only prompt; N <= limits.max_images)
    input_media_sizes   INT64  [N, 2]  optional  (height, width) of each image, the top-left of its H x W slot
                                              (images of different sizes, zero-padded); (0, 0) = an unused
                                              trailing slot. Without it every image is the whole H x W slot.
    max_output_len      INT64  [1]  optional  new tokens (default: as many as `limits.max_tokens` and the context allow)
    top_k               INT64  [1]  optional  0 = off; 1 = greedy
    top_p               FP32   [1]  optional  0 or 1 = off (NeMo 1's clients send 0)
    temperature         FP32   [1]  optional  0 = greedy (the default)
    repetition_penalty  FP32   [1]  optional  1 = off
    num_beams           INT64  [1]  optional  only 1 (no beam search)
    batch_size          INT64  [1]  optional  accepted from NeMo 1 clients and ignored: Triton batches
    random_seed         INT64  [1]  optional  reproducible sampling
    quality, toxicity, humor, creativity, violence, helpfulness, not_appropriate
                        INT32  [1]  optional  SteerLM attributes 0-9 (models with the `nv_steerlm` template only)
    -> outputs          BYTES  [1]  the answer (UTF-8)

`input_text` may place the images itself with one `<image>` tag per image; without tags they lead the question,
one per line, as in training. A `<video>` tag (PyTorch backend; at most `limits.max_videos`) takes the next
`model.data.video.num_frames` slots of `input_media` as one video's sampled frames, so the model sees a video
(its frames pooled with `model.mm_cfg.video.pool`) and not separate images. Every row of every request is checked before any generation (the same limits and
ranges as the HTTP server, `limits.py` / `images.py`); a bad one raises `InvalidInput` naming the input.
Triton's dynamic batcher hands over several requests at once; rows with the same decoding settings run through
one batched `generate`, so a batched answer is the one the request would get alone (greedy, or with the same
`random_seed`).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from nemo_neva.data.constants import IMAGE_TOKEN, VIDEO_TOKEN
from nemo_neva.data.video_io import Video
from nemo_neva.data.conversation import STEERLM_INFERENCE_DEFAULTS, ConversationError, get_template, parse_attributes
from nemo_neva.inference.generation_config import GenerationConfig
from nemo_neva.inference.prompting import build_prompt
from nemo_neva.serving.errors import RequestError
from nemo_neva.serving.images import image_from_array
from nemo_neva.serving.limits import ServerLimits, check_param, check_range, token_budget

log = logging.getLogger(__name__)

# NeMo 1 declares its integer inputs as np.int_ (INT64 on Linux) and its clients send np.int_ arrays;
# Triton refuses any other dtype, so INT64 is what keeps those clients working.
INT = np.int64
STEERLM_INPUTS = tuple(STEERLM_INFERENCE_DEFAULTS)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: Any         # numpy type (np.bytes_ for BYTES)
    shape: tuple       # per row, without Triton's batch dimension
    optional: bool = True


OUTPUT = InputSpec("outputs", np.bytes_, (1,), optional=False)


def model_inputs(template: str) -> list[InputSpec]:
    """The model's inputs; SteerLM attributes only for a template that renders them."""
    specs = [InputSpec("input_text", np.bytes_, (1,), optional=False),
             InputSpec("input_media", np.uint8, (-1, -1, -1, 3)),
             InputSpec("max_output_len", INT, (1,)),
             InputSpec("top_k", INT, (1,)),
             InputSpec("top_p", np.float32, (1,)),
             InputSpec("temperature", np.float32, (1,)),
             InputSpec("repetition_penalty", np.float32, (1,)),
             InputSpec("num_beams", INT, (1,)),
             InputSpec("batch_size", INT, (1,)),
             InputSpec("random_seed", INT, (1,)),
             InputSpec("input_media_sizes", INT, (-1, 2))]  # ours (NeMo 1 sends one image per row)
    if get_template(template).steerlm:
        specs += [InputSpec(name, np.int32, (1,)) for name in STEERLM_INPUTS]
    return specs


class InvalidInput(ValueError):
    """A request Triton accepted (names, dtypes, shapes) whose values this model refuses; the message names
    the input and is what the client's Triton error shows.

    PyTriton sends the client `traceback.format_exception(None, e, e.__traceback__)`: reading `__traceback__`
    as None keeps our frames and file paths out of that text (the interpreter still records the traceback,
    so the server log keeps it)."""

    __traceback__ = property(lambda self: None, lambda self, value: None)


@dataclass
class Row:
    prompt: str
    images: list  # RGB PIL images and `Video`s, one per <image> / <video> tag of `prompt`, in order
    sampling: GenerationConfig  # its max_new_tokens from the row's budget; the backend adds its stops
    encoded: Any = None  # the row as the backend's `generate` takes it (`backend.prepare`): encoded once


# A backend: `context` (tokens), `prepare(prompt, images) -> (encoded, prompt tokens)` (raising a RequestError
# for a prompt it cannot take) and `generate(encoded rows, GenerationConfig) -> answers`; the prompt is encoded
# once, in `prepare`, and what it made is what `generate` runs.


class TorchBackend:
    """nemo_neva's PyTorch generation on a restored `.nemo` (CPU or GPU)."""

    name = "pytorch"

    def __init__(self, model, template: str):
        from nemo_neva.serving.worker import serving_stops

        from nemo_neva.data.video_io import video_settings_of

        self.model = model.eval()
        self.context = int(model.cfg.encoder_seq_length)
        self.stop_ids, self.stop_strings = serving_stops(model, template)
        # frames a `<video>` tag of input_text takes from input_media: the model's model.data.video.num_frames
        self.num_frames = video_settings_of(model.cfg).num_frames

    def prompt_tokens(self, prompt: str, images) -> int:
        """`images`: the prompt's images (a list, as `generate` takes them) or their count."""
        return int(self.model.processor.encode(prompt, images).numel())

    def prepare(self, prompt: str, images: list):
        """(the row's `NevaInputs`, its prompt tokens): the model's processor encodes it and makes its pixels,
        once (a tiled model counts each image by its size, a video by its frames)."""
        inputs = self.model.processor(prompt, list(images) or None)
        return inputs, int(inputs.ids.numel())

    def generate(self, rows: list, s: GenerationConfig) -> list[str]:
        """`rows`: the `NevaInputs` of `prepare`, generated as they are (not encoded again)."""
        from nemo_neva.inference.generate import generate

        config = s.replace(stop_token_ids=tuple(sorted(self.stop_ids)), stop_strings=tuple(self.stop_strings))
        return generate(self.model, [None] * len(rows), list(rows), config)


def _data(request) -> dict:
    return getattr(request, "data", request)  # a PyTriton Request, or a plain dict of arrays (tests)


class NevaTritonModel:
    """The inference callable PyTriton binds: a list of Triton requests -> a list of {"outputs": ...}."""

    def __init__(self, backend, template: str, limits: ServerLimits):
        self.backend, self.template, self.limits = backend, template, limits
        self.steerlm = get_template(template).steerlm
        self.inputs = model_inputs(template)
        self._known = {spec.name for spec in self.inputs}
        self.batches = 0  # executions and requests seen: the log reports them
        self.requests = 0

    # ---------------------------------------------------------------------------------------------- checks
    def _scalar(self, data: dict, name: str, row: int, n_rows: int, default):
        arr = data.get(name)
        if arr is None:
            return default
        arr = np.asarray(arr)
        if arr.shape != (n_rows, 1):
            raise RequestError(f"expected shape [{n_rows}, 1] (one value per row of input_text), "
                               f"got {list(arr.shape)}", name)
        value = arr[row, 0]
        return value.item() if isinstance(value, np.generic) else value

    def _question(self, data: dict, row: int) -> str:
        value = np.asarray(data["input_text"])[row, 0]
        if isinstance(value, (bytes, np.bytes_)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError("input_text is not valid UTF-8", "input_text") from None
        if not isinstance(value, str):
            raise RequestError("input_text must be a string", "input_text")
        if len(value) > self.limits.max_text_chars:
            raise RequestError(f"input_text of {len(value)} characters exceeds the limit of "
                               f"{self.limits.max_text_chars}", "input_text", code="prompt_too_long")
        return value

    def _images(self, data: dict, row: int, n_rows: int) -> list:
        """The row's images, in order: its `input_media` slots, cropped to `input_media_sizes` when given."""
        media, sizes = data.get("input_media"), data.get("input_media_sizes")
        if media is None:
            if sizes is not None:
                raise RequestError("input_media_sizes without input_media", "input_media_sizes")
            return []
        media = np.asarray(media)
        if media.ndim != 5 or media.shape[0] != n_rows:
            raise RequestError(f"expected shape [{n_rows}, N, H, W, 3], got {list(media.shape)}", "input_media")
        slots, height, width = media.shape[1:4]
        hw = [(height, width)] * slots
        if sizes is not None:
            sizes = np.asarray(sizes)
            if sizes.shape != (n_rows, slots, 2):
                raise RequestError(f"expected shape [{n_rows}, {slots}, 2] ((height, width) per image of "
                                   f"input_media), got {list(sizes.shape)}", "input_media_sizes")
            hw = [(int(h), int(w)) for h, w in sizes[row]]
            used = [h > 0 or w > 0 for h, w in hw]
            if any(used[k + 1] and not used[k] for k in range(slots - 1)):
                raise RequestError("an unused slot (0, 0) may only follow the used ones", "input_media_sizes")
            hw = hw[:sum(used)]
            for k, (h, w) in enumerate(hw):
                if not (1 <= h <= height and 1 <= w <= width):
                    raise RequestError(f"image {k}: size ({h}, {w}) does not fit its {height} x {width} slot "
                                       "(each of height, width in 1..the slot's)", "input_media_sizes")
        frames = getattr(self.backend, "num_frames", 0) if self.limits.max_videos else 0
        most = self.limits.max_images + self.limits.max_videos * frames
        if len(hw) > most:  # more slots than any prompt may fill: refused before converting them
            if not frames:
                self._check_images(len(hw))
            raise RequestError(f"{len(hw)} input_media slots in one prompt; this server takes at most {most} "
                               f"(limits.max_images images + limits.max_videos videos of {frames} frames)",
                               "input_media", code="too_many_images")
        return [image_from_array(media[row, k, :h, :w], self.limits, "input_media") for k, (h, w) in enumerate(hw)]

    def _check_images(self, n: int) -> None:
        if n > self.limits.max_images:
            what = ("this server takes text-only prompts (limits.max_images=0)" if self.limits.max_images == 0
                    else f"this server takes at most {self.limits.max_images} per prompt (limits.max_images)")
            raise RequestError(f"{n} image{'s' * (n != 1)} in one prompt; {what}", "input_media",
                               code="too_many_images")

    def _place_media(self, question: str, images: list) -> tuple[str, list]:
        """(question, media as `generate` takes them): without `<video>` tags, the images (`_place_images`);
        each `<video>` tag takes the next `backend.num_frames` input_media slots as one video's frames."""
        n_videos = question.count(VIDEO_TOKEN)
        if n_videos == 0:
            self._check_images(len(images))
            return self._place_images(question, len(images)), images
        frames = getattr(self.backend, "num_frames", None)
        if frames is None:
            raise RequestError(f"the {self.backend.name} backend takes no {VIDEO_TOKEN} tag: send a video's frames as "
                               f"images, one {IMAGE_TOKEN} tag each", "input_text")
        if n_videos > self.limits.max_videos:
            raise RequestError(f"{n_videos} {VIDEO_TOKEN} tags in one prompt; this server takes at most "
                               f"{self.limits.max_videos} (limits.max_videos)", "input_text", code="too_many_videos")
        tags = re.findall(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}", question)
        self._check_images(len(tags) - n_videos)
        need = len(tags) - n_videos + n_videos * frames
        if need != len(images):
            raise RequestError(f"input_text has {len(tags) - n_videos} {IMAGE_TOKEN} and {n_videos} {VIDEO_TOKEN} "
                               f"tag(s), which take {need} input_media slots ({frames} frames per video, the model's "
                               f"model.data.video.num_frames); got {len(images)}", "input_media")
        media, rest = [], iter(images)
        for tag in tags:
            if tag == IMAGE_TOKEN:
                media.append(next(rest))
            else:
                media.append(Video([next(rest) for _ in range(frames)], list(range(frames)), frames))
        return question, media

    def _place_images(self, question: str, n_images: int) -> str:
        """The question with one `<image>` tag per image: the client's tags, or leading ones (LLaVA layout)."""
        n_tags = question.count(IMAGE_TOKEN)
        if n_tags == 0:
            return "\n".join([IMAGE_TOKEN] * n_images + [question])
        if n_tags != n_images:
            raise RequestError(f"input_text has {n_tags} image tag(s) {IMAGE_TOKEN} for {n_images} image(s) in "
                               "input_media: give one tag per image, in order, or none (the images lead)",
                               "input_text")
        return question

    def _sampling(self, data: dict, row: int, n_rows: int) -> tuple[dict, Optional[int]]:
        get = lambda name, default: self._scalar(data, name, row, n_rows, default)  # noqa: E731
        num_beams = get("num_beams", 1)
        if num_beams != 1:
            raise RequestError(f"num_beams={num_beams}: only 1 is supported (no beam search)", "num_beams")
        get("batch_size", 1)  # NeMo 1 clients send it; shape-checked, otherwise ignored
        temperature = float(check_param("temperature", float(get("temperature", 0.0))))
        top_k = int(check_param("top_k", int(get("top_k", 0))))
        top_p = float(get("top_p", 1.0))
        top_p = 1.0 if top_p == 0.0 else float(check_param("top_p", top_p))  # 0: NeMo 1's "off"
        penalty = float(check_param("repetition_penalty", float(get("repetition_penalty", 1.0))))
        seed = get("random_seed", None)
        if seed is not None:
            seed = int(check_param("seed", int(seed), "random_seed"))
        max_out = get("max_output_len", None)
        if max_out is not None:
            max_out = int(check_range(int(max_out), 1, float("inf"), param="max_output_len"))
            if max_out > self.limits.max_tokens:
                raise RequestError(f"max_output_len={max_out} exceeds this server's limit of "
                                   f"{self.limits.max_tokens}", "max_output_len", code="max_tokens_too_large")
        s = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed)
        if temperature == 0.0 or top_k == 1:  # greedy: the other settings do not change the answer
            s = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=penalty, seed=None)
        return s, max_out  # the GenerationConfig is made once max_new_tokens is known (parse)

    def _attributes(self, data: dict, row: int, n_rows: int) -> Optional[dict]:
        if not self.steerlm:
            return None
        given = {}
        for name in STEERLM_INPUTS:
            value = self._scalar(data, name, row, n_rows, None)
            if value is not None:
                given[name] = int(value)
                try:
                    parse_attributes({name: given[name]}, STEERLM_INFERENCE_DEFAULTS)
                except ConversationError as e:
                    raise RequestError(e.detail, name) from None
        return given or None

    def parse(self, request) -> list[Row]:
        """One Triton request -> its rows, each checked; a RequestError names the bad input."""
        data = _data(request)
        unknown = sorted(set(data) - self._known)
        if unknown:  # Triton refuses these itself; kept for direct calls
            raise RequestError(f"unknown input(s): {', '.join(unknown)}", unknown[0])
        if data.get("input_text") is None:
            raise RequestError("input_text is required", "input_text")
        text = np.asarray(data["input_text"])
        if text.ndim != 2 or text.shape[1] != 1 or text.shape[0] < 1:
            raise RequestError(f"expected shape [rows, 1], got {list(text.shape)}", "input_text")
        n_rows = text.shape[0]
        rows = []
        for r in range(n_rows):
            try:
                question = self._question(data, r)
                question, images = self._place_media(question, self._images(data, r, n_rows))
                sampling, max_out = self._sampling(data, r, n_rows)
                attributes = self._attributes(data, r, n_rows)
                prompt = build_prompt(self.template, question, IMAGE_TOKEN in question, steerlm=attributes,
                                      has_video=VIDEO_TOKEN in question)
                encoded, n_prompt = self.backend.prepare(prompt, images)
                max_new = token_budget(n_prompt, self.backend.context, max_out, self.limits.max_tokens,
                                       "input_text", "max_output_len")
            except RequestError as e:
                if n_rows > 1:
                    e.message = f"row {r}: {e.message}"
                raise
            rows.append(Row(prompt, images, GenerationConfig(max_new_tokens=max_new, **sampling), encoded))
        return rows

    # ---------------------------------------------------------------------------------------------- running
    def generate_rows(self, rows: Sequence[Row]) -> list[str]:
        """Answers in order; rows with the same settings decode together in one batched `generate`."""
        groups: dict[GenerationConfig, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.sampling, []).append(i)
        answers: list[Optional[str]] = [None] * len(rows)
        for sampling, idx in groups.items():
            texts = self.backend.generate([rows[i].encoded for i in idx], sampling)
            for i, text in zip(idx, texts):
                answers[i] = text
        return answers

    def __call__(self, requests) -> list[dict]:
        start = time.monotonic()
        parsed, bad = [], []
        for k, request in enumerate(requests):
            try:
                parsed.append(self.parse(request))
            except RequestError as e:
                bad.append((k, e))
        if bad:
            raise InvalidInput(self._describe(bad, len(requests)))
        flat = [row for rows in parsed for row in rows]
        try:
            answers = self.generate_rows(flat)
        except Exception:
            log.exception("generation failed")
            raise RuntimeError("internal error while generating (the server log has the cause)") from None
        self.batches += 1
        self.requests += len(requests)
        log.info("answered %d request(s) (%d row(s)) in one execution, %.2f s", len(requests), len(flat),
                 time.monotonic() - start)
        out, i = [], 0
        for rows in parsed:
            texts = answers[i:i + len(rows)]
            i += len(rows)
            out.append({"outputs": np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)})
        return out

    @staticmethod
    def _describe(bad: list, n_requests: int) -> str:
        """The error text: the input and the reason; in a dynamic batch, which request it was (Triton
        fails the whole execution, so the others of the batch are told theirs was not run)."""
        parts = [f"input '{e.param}': {e.message}" if e.param else e.message for _, e in bad]
        if n_requests == 1:
            return parts[0]
        where = "; ".join(f"request {k + 1} of {n_requests}: {p}" for (k, _), p in zip(bad, parts))
        return (f"{where} (these requests arrived in one dynamic batch, which was not run; "
                "requests without an error can be resent)")
