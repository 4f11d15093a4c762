"""Autoregressive generation for NeVA: batched prompts of any length, KV cache, sampling controls.

`generate` answers many (image, prompt) pairs; `stream_generate` yields one answer's text as it is decoded.
Requests are sorted by length and decoded in left-padded batches (`batching.py`) through megatron-core's
static KV cache (`kv_cache.py`); finished answers leave the batch. With an attention that cannot take a
padding mask in its cached steps (the Transformer Engine spec), only prompts of equal length share a batch.

A request reaches the network through the model's `NevaProcessor` (`data/processor.py`: tags, pixels,
placeholder counts, context check) and is decoded under one `GenerationConfig` (`generation_config.py`);
what this module needs of a model is `model_protocol.GenerationModel`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_neva.data.processor import NevaInputs
from nemo_neva.inference.batching import left_pad
from nemo_neva.inference.kv_cache import CachedDecoder, RecomputeDecoder
from nemo_neva.inference.model_protocol import GenerationModel
from nemo_neva.inference.generation_config import GenerationConfig
from nemo_neva.inference.sampling import apply_repetition_penalty, sample_next
from nemo_neva.inference.text_stream import TextStream

__all__ = ["generate", "generate_tokens", "generate_usage", "Usage", "stream_generate", "GenerationConfig",
           "sample_next", "encode_prompt"]


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


def encode_prompt(model: GenerationModel, prompt: str, images) -> torch.Tensor:
    """`model.processor.encode`: prompt ids with each `<image>` tag expanded to the model's placeholder run.
    `images`: the request's image(s) as `generate` takes them, or a count (True/False for one/none)."""
    return model.processor.encode(prompt, images)


def _config(n_images: int, n_prompts: int, config: Optional[GenerationConfig], settings: dict,
            batch_size: Optional[int] = None) -> GenerationConfig:
    """The request's GenerationConfig (`config` with `settings` laid over it; validated as it is made) and the
    checks that need the model."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("generation with pipeline parallelism is not supported; restore at PP=1")
    if n_images != n_prompts:
        raise ValueError(f"{n_images} images for {n_prompts} prompts")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = config or GenerationConfig()
    return config.replace(**settings) if settings else config


def _requests(model: GenerationModel, images, prompts, max_new_tokens: int) -> list[NevaInputs]:
    """Every request through the model's processor (encoded, context-checked) before any model work; a
    `NevaInputs` prompt was processed already and is only checked against the context."""
    processor, out = model.processor, []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        if isinstance(prompt, NevaInputs):
            if image is not None:
                raise ValueError(f"prompt {i} is a NevaInputs (its pixels made already): pass None as its image")
            processor.check_context(prompt.ids.numel(), max_new_tokens, f"prompt {i}")
            out.append(prompt)
        else:
            out.append(processor(prompt, image, max_new_tokens, f"prompt {i}"))
    return out


def _batches(requests: list[NevaInputs], batch_size: Optional[int], pads: bool) -> list[list[int]]:
    """Request indices per batch: sorted by length (less padding); equal lengths only where padding can't work
    (`pads`: the model's `pads_in_cached_steps`)."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].ids.numel())
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
def _generation_mode(model: GenerationModel):
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


def _batch_frames(with_images: list[NevaInputs]) -> Optional[torch.Tensor]:
    """[n_images] bool of the batch's images (in row order): which are video frames; None when none is."""
    if all(r.frames is None for r in with_images):
        return None
    return torch.cat([r.frames if r.frames is not None else torch.zeros(r.pixels.shape[0], dtype=torch.bool)
                      for r in with_images])


def _decode_batch(model: GenerationModel, requests: list[NevaInputs], s: GenerationConfig, stops: set, seeds: list[int],
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
            if token in stops:
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


def _run(model: GenerationModel, requests: list[NevaInputs], s: GenerationConfig, batch_size: Optional[int],
         streams: list[TextStream]) -> Iterator[tuple[int, str]]:
    """(request index, delta) over all requests, batch after batch; `streams[i]` collects request i's tokens."""
    seed, stops = _shared_seed(s.seed), s.stop_ids(model.tokenizer)
    for group in _batches(requests, batch_size, model.pads_in_cached_steps):
        # An explicit seed gives every request the same stream, so its text does not depend on its batch.
        seeds = [seed if s.seed is not None else seed + i for i in group]
        for row, delta in _decode_batch(model, [requests[i] for i in group], s, stops, seeds,
                                        [streams[i] for i in group]):
            yield group[row], delta


def stream_generate(model: GenerationModel, image, prompt, config: Optional[GenerationConfig] = None,
                    usage: Optional[Usage] = None, **settings) -> Iterator[str]:
    """Like `generate` for one (image, prompt), yielding text deltas as they are decoded.

    Settings are validated before the first token; `"".join(deltas).strip()` equals `generate(...)[0]`.
    A `usage` passed in is filled in once the answer has ended.
    """
    s = _config(1, 1, config, settings)
    requests = _requests(model, [image], [prompt], s.max_new_tokens)
    stream = TextStream(model.tokenizer, s.stop_strings)
    with _generation_mode(model):
        for _, delta in _run(model, requests, s, 1, [stream]):
            yield delta
    if usage is not None:
        usage.fill(stream)


def generate(model: GenerationModel, images: Sequence, prompts: Sequence, config: Optional[GenerationConfig] = None,
             batch_size: Optional[int] = None, **settings) -> list[str]:
    """`images[i]` is None, one image (PIL or [3,H,W] tensor) or a list of images (or an [n,3,H,W] tensor),
    one per `<image>` tag of `prompts[i]`, in order; `prompts[i]` is the rendered prompt text, or the
    `NevaInputs` the model's processor made of it already (`model.processor(prompt, media)`; `images[i]` is
    then not read). A `data.video_io.Video` (alone or in the list) takes a `<video>` tag, which becomes one
    `<image>` tag per frame: the frames are the images of that place.

    `config`: the `GenerationConfig` (sampling, stops, max_new_tokens; default: greedy, 32 tokens, EOS);
    keyword `settings` (its field names) are laid over it. `batch_size` caps how many requests decode
    together (None: all).
    """
    answers = [""] * len(prompts)
    for i, delta in _stream_all(model, images, prompts, config, batch_size, settings):
        answers[i] += delta
    return [a.strip() for a in answers]


def generate_tokens(model: GenerationModel, images: Sequence, prompts: Sequence,
                    config: Optional[GenerationConfig] = None, batch_size: Optional[int] = None,
                    **settings) -> list[list[int]]:
    """Like `generate` (same arguments), but the generated token ids (stop token excluded)."""
    return [u.tokens for u in generate_usage(model, images, prompts, config, batch_size, **settings)]


def generate_usage(model: GenerationModel, images: Sequence, prompts: Sequence,
                   config: Optional[GenerationConfig] = None, batch_size: Optional[int] = None,
                   **settings) -> list[Usage]:
    """Like `generate` (same arguments), with each answer's token ids, count and finish reason."""
    answers = [""] * len(prompts)
    streams: list[TextStream] = []
    for i, delta in _stream_all(model, images, prompts, config, batch_size, settings, streams):
        answers[i] += delta
    out = [Usage() for _ in streams]
    for u, st, text in zip(out, streams, answers):
        u.fill(st, text.strip())
    return out


def _stream_all(model: GenerationModel, images, prompts, config: Optional[GenerationConfig], batch_size: Optional[int],
                settings: dict, streams: Optional[list] = None) -> Iterator[tuple[int, str]]:
    s = _config(len(images), len(prompts), config, settings, batch_size)
    requests = _requests(model, images, prompts, s.max_new_tokens)
    streams = streams if streams is not None else []
    streams[:] = [TextStream(model.tokenizer, s.stop_strings) for _ in requests]
    with _generation_mode(model):
        yield from _run(model, requests, s, batch_size, streams)
