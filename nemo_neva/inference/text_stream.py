"""Token ids in, text deltas out: incremental detokenisation that never leaks a stop string."""
from __future__ import annotations

from typing import Optional, Sequence


class TextStream:
    """Follows one answer token by token.

    A delta is only released once it cannot turn out to be the start of a stop string or part of an
    incomplete UTF-8 sequence; `flush()` releases what was held back when decoding ends for another reason.
    The concatenation of all deltas is the answer (before stripping).
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.held = max([len(s) - 1 for s in self.stop_strings] + [0])
        self.tokens: list[int] = []
        self.sent = ""
        # Set by the decoding loop when this answer ends (what a server reports as usage):
        self.sampled = 0  # tokens sampled, a final stop token included (it was sampled, as OpenAI counts it)
        self.finish_reason: Optional[str] = None  # "stop" (stop token or string) | "length" (max_new_tokens)

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token: (delta, stopped). `stopped` means a stop string just completed (it is cut off)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        # A stop string may end inside a token (" pictu" for "pi"): look for it anywhere, cut at the first.
        found = [i for i in (text.find(s, max(0, len(self.sent) - self.held)) for s in self.stop_strings) if i >= 0]
        if found:
            ready = text[: min(found)]
        else:
            ready = text[: len(text) - self.held] if self.held else text
            ready = ready.rstrip("\ufffd")
        return self._release(ready), bool(found)

    def flush(self) -> str:
        return self._release(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _release(self, ready: str) -> str:
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            delta, self.sent = ready[len(self.sent):], ready
            return delta
        return ""
