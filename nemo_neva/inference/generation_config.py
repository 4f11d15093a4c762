"""`GenerationConfig`: the sampling and stop settings of one generation, validated once, carried as one object
from the CLI, the HTTP server, Triton and the evaluator to `inference.generate`.

The context-length check needs the prompt, so the model's processor does it (`NevaProcessor.check_context`);
everything that does not need the model is checked here, when the config is made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationConfig:
    """How one answer is decoded.

    temperature 0 is greedy (top_k 0 / top_p 1: off); `repetition_penalty` > 1 discourages tokens already in
    the prompt or answer; with a `seed` each answer is reproducible and independent of the other requests.
    Decoding ends at a stop token id (`stop_token_ids`; None: the tokenizer's EOS), a stop string, or after
    `max_new_tokens`. `use_cache=False` recomputes the whole sequence per token (reference / benchmark);
    `compile_decode` runs the cached decode steps through `torch.compile`. Frozen and hashable: equal configs
    can share a batch.
    """
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[tuple] = None
    stop_strings: tuple = ()
    use_cache: bool = True
    compile_decode: bool = False

    def __post_init__(self):
        # lists (from YAML, JSON) become tuples: the config stays hashable
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.stop_strings, tuple):
            if isinstance(self.stop_strings, str):
                raise ValueError(f"stop_strings must be a list of strings, got the string {self.stop_strings!r}")
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_real(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.stop_token_ids is not None and any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {list(self.stop_token_ids)}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(self.stop_strings)}")
        if self.compile_decode and not self.use_cache:
            raise ValueError("compile_decode compiles the cached decode step; it needs use_cache=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> "GenerationConfig":
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)

    def stop_ids(self, tokenizer) -> set:
        """The token ids that end an answer: `stop_token_ids`, or the tokenizer's EOS."""
        return set(self.stop_token_ids) if self.stop_token_ids is not None else {tokenizer.eos_token_id}
