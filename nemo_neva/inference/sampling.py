"""Next-token choice: repetition penalty, temperature / top-k / top-p sampling."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as Hugging Face applies it): for tokens already seen (prompt + output), a positive
    logit is divided by `penalty` and a negative one multiplied, so penalty > 1 always makes them less likely.

    logits [b, vocab] float, seen [b, vocab] bool.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / the top-p nucleus set to -inf."""
    # Shift by the row maximum and divide in float64: any temperature > 0 (5e-324 included) then gives finite
    # or -inf logits, never inf / inf (NaN after softmax), and a tiny temperature tends to greedy as it should.
    logits = logits.double()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
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
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator | Sequence[torch.Generator]]) -> torch.Tensor:
    """logits [b, vocab] -> token ids [b]. temperature 0 is greedy.

    `generator` may be one generator for the batch or one per row; per-row generators make a request's
    sample independent of which other requests share its batch.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
