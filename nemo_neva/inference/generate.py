"""Minimal autoregressive generation (full recompute per token; the KV-cache engine is separate work)."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from megatron.core import parallel_state

from nemo_neva.data.constants import IMAGE_TOKEN


def validate_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int, context: int):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the model context of {context} tokens")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [b, vocab] -> token ids [b]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def encode_prompt(model, prompt: str, has_image: bool) -> torch.Tensor:
    tok = model.tokenizer
    n_tags = prompt.count(IMAGE_TOKEN)
    if n_tags != (1 if has_image else 0):
        raise ValueError(f"prompt must contain exactly {int(has_image)} '{IMAGE_TOKEN}' tag(s), found {n_tags}")
    ids = []
    for i, part in enumerate(prompt.split(IMAGE_TOKEN)):
        if i:
            ids += [model.image_token_id] * model.tokens_per_image
        if part:
            ids += tok(part, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _pixels(model, image):
    if image is None:
        return None
    return image.unsqueeze(0) if torch.is_tensor(image) else \
        model.image_processor(images=image, return_tensors="pt")["pixel_values"]


def _check_request(model, n_images: int, n_prompts: int, temperature, top_k, top_p, max_new_tokens):
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("generation with pipeline parallelism is not supported; restore at PP=1")
    if n_images != n_prompts:
        raise ValueError(f"{n_images} images for {n_prompts} prompts")
    validate_sampling(temperature, top_k, top_p, max_new_tokens, model.cfg.encoder_seq_length)


@torch.no_grad()
def _decode(model, image, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
            generator: Optional[torch.Generator], stops: set, stop_strings: Sequence[str]) -> Iterator[str]:
    """Yields text deltas for one (image, prompt); their concatenation is the answer before stripping."""
    context = model.cfg.encoder_seq_length
    pixels = _pixels(model, image)
    ids = encode_prompt(model, prompt, image is not None)
    if ids.numel() + max_new_tokens > context:
        raise ValueError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context of {context} tokens")
    vocab = len(model.tokenizer)
    out, sent = [], ""
    for _ in range(max_new_tokens):
        tokens = torch.cat([ids, torch.tensor(out, dtype=torch.long)]).unsqueeze(0)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0)
        logits = model.model(tokens, pos, images=pixels, runtime_gather_output=True)
        last = logits[:, -1, :vocab]  # padded vocab entries are never sampled
        nxt = int(sample_next(last, temperature, top_k, top_p, generator)[0])
        if nxt in stops:
            break
        out.append(nxt)
        text = model.tokenizer.decode(out, skip_special_tokens=True)
        hit = next((s for s in stop_strings if s and text.endswith(s)), None)
        if hit:
            text = text[: -len(hit)]
        # Hold back a possible partial stop string or an incomplete UTF-8 sequence until it resolves.
        held = max([len(s) - 1 for s in stop_strings if s] + [0]) if not hit else 0
        ready = text[: len(text) - held] if held else text
        if ready.endswith("\ufffd") and not hit:
            ready = ready.rstrip("\ufffd")
        if len(ready) > len(sent) and ready.startswith(sent):
            yield ready[len(sent):]
            sent = ready
        if hit:
            return
    text = model.tokenizer.decode(out, skip_special_tokens=True)
    if text.startswith(sent) and len(text) > len(sent):
        yield text[len(sent):]


def _prepare(model, seed, stop_token_ids):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stops = set(stop_token_ids) if stop_token_ids is not None else {model.tokenizer.eos_token_id}
    return generator, stops


def stream_generate(model, image, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                    stop_token_ids: Optional[Sequence[int]] = None,
                    stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Like `generate` for one (image, prompt), yielding text deltas as they are decoded.

    Parameters are validated before the first token; `"".join(deltas).strip()` equals `generate(...)[0]`.
    """
    _check_request(model, 1, 1, temperature, top_k, top_p, max_new_tokens)
    generator, stops = _prepare(model, seed, stop_token_ids)
    was_training = model.training
    model.eval()
    try:
        yield from _decode(model, image, prompt, max_new_tokens, temperature, top_k, top_p, generator, stops,
                           stop_strings)
    finally:
        model.train(was_training)


def generate(model, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
             stop_token_ids: Optional[Sequence[int]] = None,
             stop_strings: Sequence[str] = ()) -> list[str]:
    """`images[i]` is a PIL image, a [3,H,W] tensor, or None; `prompts[i]` is the rendered prompt text.

    Decoding ends at a stop token id (default: EOS), a stop string, or `max_new_tokens`.
    """
    _check_request(model, len(images), len(prompts), temperature, top_k, top_p, max_new_tokens)
    generator, stops = _prepare(model, seed, stop_token_ids)
    was_training = model.training
    model.eval()
    try:
        return ["".join(_decode(model, image, prompt, max_new_tokens, temperature, top_k, top_p, generator, stops,
                                stop_strings)).strip()
                for image, prompt in zip(images, prompts)]
    finally:
        model.train(was_training)
