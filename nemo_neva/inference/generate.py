"""Minimal autoregressive generation (full recompute per token; the KV-cache engine is separate work)."""
from __future__ import annotations

from typing import Optional, Sequence

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


@torch.no_grad()
def generate(model, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
             stop_token_ids: Optional[Sequence[int]] = None,
             stop_strings: Sequence[str] = ()) -> list[str]:
    """`images[i]` is a PIL image, a [3,H,W] tensor, or None; `prompts[i]` is the rendered prompt text.

    Decoding ends at a stop token id (default: EOS), a stop string, or `max_new_tokens`.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("generation with pipeline parallelism is not supported; restore at PP=1")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    context = model.cfg.encoder_seq_length
    validate_sampling(temperature, top_k, top_p, max_new_tokens, context)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stops = set(stop_token_ids) if stop_token_ids is not None else {model.tokenizer.eos_token_id}
    vocab = len(model.tokenizer)
    was_training = model.training
    model.eval()
    answers = []
    try:
        for image, prompt in zip(images, prompts):
            pixels = None
            if image is not None:
                pixels = image.unsqueeze(0) if torch.is_tensor(image) else \
                    model.image_processor(images=image, return_tensors="pt")["pixel_values"]
            ids = encode_prompt(model, prompt, image is not None)
            if ids.numel() + max_new_tokens > context:
                raise ValueError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) "
                                 f"exceeds the context of {context} tokens")
            out = []
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
                    out = model.tokenizer(text[: -len(hit)], add_special_tokens=False)["input_ids"]
                    break
            answers.append(model.tokenizer.decode(out, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers
