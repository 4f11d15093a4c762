"""How many tokens a generation sampled, without reaching into the decoding loop.

Every sampled token needs one next-token distribution, i.e. one call of the LM's output layer, both
when the whole prompt is recomputed per token and with a KV cache (prefill, then one call per step).
The server runs one request at a time, so a forward hook counting those calls gives the exact count
(batch size 1). A generation that stops on a stop token counts that token too, as OpenAI's usage does.
"""
from __future__ import annotations

import contextlib


def _output_layer(model):
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    return getattr(language_model, "output_layer", None)


class SampledTokens:
    def __init__(self):
        self.n = 0

    def _hook(self, module, args, output):
        self.n += 1


@contextlib.contextmanager
def count_sampled_tokens(model):
    """Yields a `SampledTokens` whose `.n` grows by one per sampled token; `.n` is None if not countable."""
    counter = SampledTokens()
    layer = _output_layer(model)
    if layer is None:
        counter.n = None
        yield counter
        return
    handle = layer.register_forward_hook(counter._hook)
    try:
        yield counter
    finally:
        handle.remove()
