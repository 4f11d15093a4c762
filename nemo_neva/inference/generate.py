"""Autoregressive generation for NeVA: batched prompts of any length, KV cache, sampling controls.

`generate` answers many (image, prompt) pairs; `stream_generate` yields one answer's text as it is decoded.
Requests are sorted by length and decoded in left-padded batches (`batching.py`) through megatron-core's
static KV cache (`kv_cache.py`); finished answers leave the batch. With an attention that cannot take a
padding mask in its cached steps (the Transformer Engine spec), only prompts of equal length share a batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_neva.data.constants import IMAGE_TOKEN, VIDEO_TOKEN
from nemo_neva.data.tokenizer import encode_text
from nemo_neva.data.video_io import Video, expand_media
from nemo_neva.inference.batching import left_pad
from nemo_neva.inference.kv_cache import CachedDecoder, RecomputeDecoder
from nemo_neva.inference.sampling import apply_repetition_penalty, sample_next, validate_sampling
from nemo_neva.inference.text_stream import TextStream

__all__ = ["generate", "generate_tokens", "generate_usage", "Usage", "stream_generate", "validate_sampling",
           "sample_next", "encode_prompt"]


@dataclass
class _Settings:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: Optional[int]
    stops: set
    stop_strings: Sequence[str]
    use_cache: bool
    compile_decode: bool = False


@dataclass
class Usage:
    """One answer as a server reports it: text, generated ids (stop token excluded), `completion_tokens`
    (tokens sampled, a final stop token included, as OpenAI counts them) and `finish_reason`."""
    text: str = ""
    tokens: list = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str = ""  # "stop" (stop token or stop string) | "length" (max_new_tokens reached)

    def fill(self, stream: TextStream, text: Optional[str] = None):
        self.tokens, self.completion_tokens, self.finish_reason = stream.tokens, stream.sampled, stream.finish_reason
        if text is not None:
            self.text = text


@dataclass
class _Request:
    ids: torch.Tensor  # prompt token ids, image placeholders expanded
    pixels: Optional[torch.Tensor]  # [n_images, 3, H, W] in tag order ([n, max_tiles, 3, t, t] tiled), or None
    sizes: Optional[torch.Tensor] = None  # [n_images, 2] original (height, width): tiled models only
    frames: Optional[torch.Tensor] = None  # [n_images] bool, which images are video frames (None: none)


def _image_count(image) -> int:
    """None -> 0; a PIL image or [3,H,W] tensor -> 1; a list of images or an [n,3,H,W] tensor -> n."""
    if image is None:
        return 0
    if isinstance(image, (list, tuple)):
        return len(image)
    if torch.is_tensor(image) and image.dim() == 4:
        return image.shape[0]
    return 1


def _expand_videos(prompt: str, image):
    """A request holding a `Video` (alone or in its list) or a `<video>` tag -> (prompt, images, frames) with
    each video's tag expanded to one `<image>` tag per frame and its frames in the image list, in tag order;
    `frames` [n_images] bool marks them (None for a request without video)."""
    items = image if isinstance(image, (list, tuple)) else [image]
    if VIDEO_TOKEN not in prompt and not any(isinstance(it, Video) for it in items):
        return prompt, image, None
    items = [] if image is None else items
    prompt, images = expand_media(prompt, items)
    flags = [isinstance(it, Video) for it in items for _ in (it.frames if isinstance(it, Video) else [it])]
    return prompt, images, torch.tensor(flags, dtype=torch.bool)


def encode_prompt(model, prompt: str, images) -> torch.Tensor:
    """Prompt ids with each `<image>` tag expanded to the model's placeholder run. `images`: the request's
    image(s) as `generate` takes them, or a count (True/False for one/none): one tag per image, in order."""
    frames = None
    if not isinstance(images, (bool, int)):
        prompt, images, frames = _expand_videos(prompt, images)
    elif VIDEO_TOKEN in prompt:
        raise ValueError(f"the prompt has a {VIDEO_TOKEN} tag: pass the request's images and videos, not a count")
    return _encode_expanded(model, prompt, images, frames)


def _encode_expanded(model, prompt: str, images, frames) -> torch.Tensor:
    """`encode_prompt` once the videos are expanded (`frames`: `_expand_videos`' flags)."""
    tok = model.tokenizer
    n_images = int(images) if isinstance(images, (bool, int)) else _image_count(images)
    n_tags = prompt.count(IMAGE_TOKEN)
    if n_tags != n_images:
        raise ValueError(f"prompt must contain exactly {n_images} '{IMAGE_TOKEN}' tag(s) (one per image), "
                         f"found {n_tags}")
    counts = _token_counts(model, images, n_images, frames)
    ids = []  # the whole prompt in one call, as the training data is tokenised (data/tokenizer.py)
    for t in encode_text(tok, prompt):
        ids += [t] * counts.pop(0) if t == model.image_token_id else [t]
    return torch.tensor(ids, dtype=torch.long)


def _token_counts(model, images, n_images: int, frames=None) -> list:
    """Placeholder tokens of each image in order: `tokens_per_image` each (`tokens_per_frame` for a video
    frame, pooled by `model.mm_cfg.video.pool`), or for a tiled model (`model.mm_cfg.image_tiling`) each
    image's own count from its size (so it needs the images)."""
    if getattr(model, "tiling", None) is None:
        if frames is None:
            return [model.tokens_per_image] * n_images
        per_frame = getattr(model, "tokens_per_frame", model.tokens_per_image)
        return [per_frame if f else model.tokens_per_image for f in frames.tolist()]
    if isinstance(images, (bool, int)) or torch.is_tensor(images):
        raise ValueError("a tiled model (model.mm_cfg.image_tiling) needs the PIL images themselves: each "
                         "image's placeholder count depends on its size")
    listed = images if isinstance(images, (list, tuple)) else ([] if images is None else [images])
    return [model.image_token_count(im) for im in listed]


def _one_pixels(model, image) -> torch.Tensor:
    """A PIL image -> pixel values made as the model's training data made them (its image processor and
    `image_aspect_ratio`); a tensor is taken as pixel values already."""
    if torch.is_tensor(image):
        return image
    return model.preprocess_images(image)


def _pixels(model, image) -> Optional[torch.Tensor]:
    """The request's images as [n, 3, H, W] in tag order, or None without images."""
    if _image_count(image) == 0:
        return None
    if torch.is_tensor(image):
        return image if image.dim() == 4 else image.unsqueeze(0)
    images = image if isinstance(image, (list, tuple)) else [image]
    return torch.stack([_one_pixels(model, im) for im in images])


def _sizes(model, image) -> Optional[torch.Tensor]:
    """[n, 2] original (height, width) of the request's images, for a tiled model (None otherwise)."""
    if getattr(model, "tiling", None) is None or _image_count(image) == 0:
        return None
    from nemo_neva.modules.tiling import image_size_of

    images = image if isinstance(image, (list, tuple)) else [image]
    return torch.tensor([image_size_of(im) for im in images], dtype=torch.long)


def _settings(model, n_images, n_prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
              stop_token_ids, stop_strings, use_cache, compile_decode=False) -> _Settings:
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("generation with pipeline parallelism is not supported; restore at PP=1")
    if n_images != n_prompts:
        raise ValueError(f"{n_images} images for {n_prompts} prompts")
    validate_sampling(temperature, top_k, top_p, max_new_tokens, model.cfg.encoder_seq_length, repetition_penalty)
    stops = set(stop_token_ids) if stop_token_ids is not None else {model.tokenizer.eos_token_id}
    if compile_decode and not use_cache:
        raise ValueError("compile_decode compiles the cached decode step; it needs use_cache=True")
    return _Settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stops,
                     list(stop_strings), use_cache, compile_decode)


def _requests(model, images, prompts, max_new_tokens: int) -> list[_Request]:
    """Tokenise and check every request before any model work."""
    context = model.cfg.encoder_seq_length
    out = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        prompt, image, frames = _expand_videos(prompt, image)
        ids = _encode_expanded(model, prompt, image, frames)
        if ids.numel() + max_new_tokens > context:
            raise ValueError(f"prompt {i} ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the context of {context} tokens")
        out.append(_Request(ids, _pixels(model, image), _sizes(model, image), frames))
    return out


def _pads_in_cached_steps(module) -> bool:
    """Our CPU core attention honours a padding mask in cached steps; TE's drops it there (no_mask)."""
    from nemo_neva.modules.layer_specs import SDPACoreAttention

    return any(isinstance(m, SDPACoreAttention) for m in module.modules())


def _batches(module, requests: list[_Request], batch_size: Optional[int]) -> list[list[int]]:
    """Request indices per batch: sorted by length (less padding); equal lengths only where padding can't work."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].ids.numel())
    pads = _pads_in_cached_steps(module)
    groups: list[list[int]] = []
    for i in order:
        fits = groups and (pads or requests[groups[-1][0]].ids.numel() == requests[i].ids.numel())
        if fits and (batch_size is None or len(groups[-1]) < batch_size):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _shared_seed(seed: Optional[int]) -> int:
    """An unseeded run draws one seed; tensor-parallel ranks must agree on it to pick the same tokens."""
    if seed is not None:
        return seed
    drawn = torch.randint(0, 2**62, (1,), device="cuda" if torch.cuda.is_available() else "cpu")  # NCCL: on GPU
    if dist.is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(drawn, src=parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return int(drawn)


@contextlib.contextmanager
def _generation_mode(model):
    """eval(), and sequence parallelism off: a one-token step cannot be split over the sequence. An FP8 model's
    Transformer Engine linears get megatron-core's inference padding (`prepare_model_for_fp8_inference`, once):
    TE's FP8 GEMMs need token counts in multiples of 8, and a decode step has one token per row."""
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    gpt = model.model.language_model
    was_training, sp = model.training, gpt.config.sequence_parallel
    if gpt.config.fp8:
        from megatron.core.fp8_utils import prepare_model_for_fp8_inference

        prepare_model_for_fp8_inference(gpt)
    model.eval()
    if sp:
        set_model_to_sequence_parallel(gpt, False)
    try:
        with torch.no_grad():
            yield
    finally:
        if sp:
            set_model_to_sequence_parallel(gpt, True)
        model.train(was_training)


def _batch_frames(with_images: list[_Request]) -> Optional[torch.Tensor]:
    """[n_images] bool of the batch's images (in row order): which are video frames; None when none is."""
    if all(r.frames is None for r in with_images):
        return None
    return torch.cat([r.frames if r.frames is not None else torch.zeros(r.pixels.shape[0], dtype=torch.bool)
                      for r in with_images])


def _decode_batch(model, requests: list[_Request], s: _Settings, seeds: list[int],
                  streams: list[TextStream]) -> Iterator[tuple[int, str]]:
    """Decode one batch; yields (row, text delta). Every row's deltas join to its answer (before stripping)."""
    tokenizer = model.tokenizer
    vocab = len(tokenizer)
    device = next(model.model.parameters()).device
    tokens, valid = (t.to(device) for t in left_pad([r.ids for r in requests]))
    with_images = [r for r in requests if r.pixels is not None]
    image_rows = [row for row, r in enumerate(requests) if r.pixels is not None for _ in range(r.pixels.shape[0])]
    images = torch.cat([r.pixels for r in with_images]).to(device) if with_images else None
    sizes = torch.cat([r.sizes for r in with_images]) if with_images and with_images[0].sizes is not None else None
    frames = _batch_frames(with_images)
    if s.use_cache:
        decoder = CachedDecoder(model.model, images, image_rows, tokens.shape[1] + s.max_new_tokens,
                                compile_steps=s.compile_decode, image_sizes=sizes, video_frames=frames)
    else:
        decoder = RecomputeDecoder(model.model, images, image_rows, image_sizes=sizes, video_frames=frames)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    seen = torch.zeros(len(requests), vocab, dtype=torch.bool, device=device)  # for the repetition penalty
    seen[valid.nonzero()[:, 0], tokens[valid].clamp(max=vocab - 1)] = True
    active = torch.arange(len(requests), device=device)  # batch row -> request row

    logits = decoder.prefill(tokens, valid)
    for step in range(s.max_new_tokens):
        logits = logits[:, :vocab].float()  # padded vocab entries are never sampled
        logits[:, model.image_token_id] = float("-inf")  # nor is the image placeholder
        logits = apply_repetition_penalty(logits, seen[active], s.repetition_penalty)
        chosen = sample_next(logits, s.temperature, s.top_k, s.top_p, [generators[int(r)] for r in active])
        keep = []
        for b, (row, token) in enumerate(zip(active.tolist(), chosen.tolist())):
            streams[row].sampled += 1
            reason = "stop"
            if token in s.stops:
                delta, done = streams[row].flush(), True
            else:
                delta, done = streams[row].push(token)
                seen[row, token] = True
                if step == s.max_new_tokens - 1 and not done:
                    delta, done, reason = delta + streams[row].flush(), True, "length"
            if done:
                streams[row].finish_reason = reason
            if delta:
                yield row, delta
            if not done:
                keep.append(b)
        if not keep:
            return
        if len(keep) < len(active):
            keep_t = torch.tensor(keep, device=device)
            decoder.keep(keep_t)
            active, chosen = active[keep_t], chosen[keep_t]
        logits = decoder.step(chosen)


def _run(model, requests: list[_Request], s: _Settings, batch_size: Optional[int],
         streams: list[TextStream]) -> Iterator[tuple[int, str]]:
    """(request index, delta) over all requests, batch after batch; `streams[i]` collects request i's tokens."""
    seed = _shared_seed(s.seed)
    for group in _batches(model.model, requests, batch_size):
        # An explicit seed gives every request the same stream, so its text does not depend on its batch.
        seeds = [seed if s.seed is not None else seed + i for i in group]
        for row, delta in _decode_batch(model, [requests[i] for i in group], s, seeds, [streams[i] for i in group]):
            yield group[row], delta


def stream_generate(model, image, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                    stop_token_ids: Optional[Sequence[int]] = None, stop_strings: Sequence[str] = (),
                    repetition_penalty: float = 1.0, use_cache: bool = True,
                    usage: Optional[Usage] = None, compile_decode: bool = False) -> Iterator[str]:
    """Like `generate` for one (image, prompt), yielding text deltas as they are decoded.

    Parameters are validated before the first token; `"".join(deltas).strip()` equals `generate(...)[0]`.
    A `usage` passed in is filled in once the answer has ended.
    """
    s = _settings(model, 1, 1, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                  stop_token_ids, stop_strings, use_cache, compile_decode)
    requests = _requests(model, [image], [prompt], max_new_tokens)
    stream = TextStream(model.tokenizer, s.stop_strings)
    with _generation_mode(model):
        for _, delta in _run(model, requests, s, 1, [stream]):
            yield delta
    if usage is not None:
        usage.fill(stream)


def generate(model, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
             stop_token_ids: Optional[Sequence[int]] = None, stop_strings: Sequence[str] = (),
             repetition_penalty: float = 1.0, batch_size: Optional[int] = None,
             use_cache: bool = True, compile_decode: bool = False) -> list[str]:
    """`images[i]` is None, one image (PIL or [3,H,W] tensor) or a list of images (or an [n,3,H,W] tensor),
    one per `<image>` tag of `prompts[i]`, in order; `prompts[i]` is the rendered prompt text. A
    `data.video_io.Video` (alone or in the list) takes a `<video>` tag, which becomes one `<image>` tag per
    frame: the frames are the images of that place.

    Decoding ends at a stop token id (default: EOS), a stop string, or `max_new_tokens`. temperature 0 is
    greedy; `repetition_penalty` > 1 discourages tokens already in the prompt or answer. With a `seed`, each
    answer is reproducible and independent of the other requests. `batch_size` caps how many requests decode
    together (None: all); `use_cache=False` recomputes the whole sequence per token (reference/benchmark).
    `compile_decode=True` runs the cached decode steps through `torch.compile` (`compiled_step.py`).
    """
    answers = [""] * len(prompts)
    for i, delta in _stream_all(model, images, prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                stop_token_ids, stop_strings, repetition_penalty, batch_size, use_cache,
                                compile_decode=compile_decode):
        answers[i] += delta
    return [a.strip() for a in answers]


def generate_tokens(model, images: Sequence, prompts: Sequence[str], **kwargs) -> list[list[int]]:
    """Like `generate` (same keyword arguments), but the generated token ids (stop token excluded)."""
    return [u.tokens for u in generate_usage(model, images, prompts, **kwargs)]


def generate_usage(model, images: Sequence, prompts: Sequence[str], **kwargs) -> list[Usage]:
    """Like `generate` (same keyword arguments), with each answer's token ids, count and finish reason."""
    answers = [""] * len(prompts)
    streams: list[TextStream] = []
    for i, delta in _stream_all(model, images, prompts, streams=streams, **kwargs):
        answers[i] += delta
    out = [Usage() for _ in streams]
    for u, st, text in zip(out, streams, answers):
        u.fill(st, text.strip())
    return out


def _stream_all(model, images, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: Optional[int] = None, stop_token_ids: Optional[Sequence[int]] = None,
                stop_strings: Sequence[str] = (), repetition_penalty: float = 1.0, batch_size: Optional[int] = None,
                use_cache: bool = True, streams: Optional[list] = None,
                compile_decode: bool = False) -> Iterator[tuple[int, str]]:
    s = _settings(model, len(images), len(prompts), max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                  seed, stop_token_ids, stop_strings, use_cache, compile_decode)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    requests = _requests(model, images, prompts, max_new_tokens)
    streams = streams if streams is not None else []
    streams[:] = [TextStream(model.tokenizer, s.stop_strings) for _ in requests]
    with _generation_mode(model):
        yield from _run(model, requests, s, batch_size, streams)
