"""Request limits of the servers (`server.*` in conf/neva_serve.yaml, `limits.*` in conf/neva_triton.yaml),
the sampling parameter ranges and the context budget both servers check; every breach is a RequestError
(HTTP 400 / a Triton error naming the input)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from nemo_neva.serving.errors import RequestError


_COUNTS = ("max_images", "max_videos")  # whole numbers where 0 switches the input off


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 16 * 1024 * 1024     # whole JSON body, checked from Content-Length before reading
    max_image_bytes: int = 8 * 1024 * 1024     # one decoded data: URL image
    max_image_pixels: int = 4096 * 4096        # from the image header, before the pixels are decoded
    max_images: int = 4                        # per conversation (HTTP) / per prompt (Triton); 0 = text only
    max_videos: int = 1                        # video_url parts per conversation (HTTP); 0 = no video
    max_video_bytes: int = 8 * 1024 * 1024     # one decoded data: URL video
    max_video_frames: int = 1800               # frames in one video's file, counted from its packets (not decoded)
    max_video_pixels: int = 1280 * 720 * 900   # decoded pixels per video (frames up to the last sampled one)
    max_messages: int = 64
    max_text_chars: int = 65536                # all message texts and stop strings together
    max_tokens: int = 512                      # cap on a request's max_tokens, and its default
    max_pending: int = 16                      # requests in progress (parsing, queued, generating) -> else 503
    request_timeout_s: float = 60.0            # socket read timeout per connection (slow clients)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"server.{f.name} must be a number >= 0, got {value!r}")
            if f.name not in _COUNTS and value == 0:
                raise ValueError(f"server.{f.name} must be > 0")
        for name in _COUNTS:
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"server.{name} must be a whole number, got {getattr(self, name)!r}")

    @classmethod
    def from_cfg(cls, cfg, section: str = "server") -> "ServerLimits":
        try:
            return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})
        except ValueError as e:
            raise ValueError(str(e).replace("server.", f"{section}.", 1)) from None


# ------------------------------------------------------------------ shared by the HTTP and the Triton server
# Sampling parameter ranges: name -> (lowest, highest, lowest excluded). The OpenAI API's where it has one.
MAX_SEED = 2 ** 63 - 1
RANGES = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, True),
    "top_k": (0, 1 << 20, False),
    "seed": (0, MAX_SEED, False),
    "repetition_penalty": (0.0, 10.0, True),
}


def check_range(value, lo: float, hi: float, lo_open: bool = False, param: Optional[str] = None,
                name: Optional[str] = None):
    """`value` when lo <= value <= hi (lo < value with `lo_open`), else a RequestError naming `param`."""
    name = name or param
    if value != value or value < lo or value > hi or (lo_open and value == lo):
        if hi == float("inf"):
            bounds = f"{'>' if lo_open else '>='} {lo}"
        else:
            bounds = f"in {'(' if lo_open else '['}{lo}, {hi}]"
        raise RequestError(f"{name}={value!r} is out of range: it must be {bounds}", param)
    return value


def check_param(name: str, value, param: Optional[str] = None):
    """One of the `RANGES` parameters, checked against its range; `param` = the name the client used."""
    lo, hi, lo_open = RANGES[name]
    return check_range(value, lo, hi, lo_open, param or name)


def token_budget(n_prompt: int, context: int, max_tokens: Optional[int], cap: int,
                 prompt_param: str, tokens_param: str, what: str = "prompt") -> int:
    """Max new tokens for a prompt of `n_prompt` tokens: `max_tokens` if it fits the context, else a
    RequestError; None = as many as the server's `cap` and the context allow."""
    room = context - n_prompt
    if room < 1:
        raise RequestError(f"the {what} is {n_prompt} tokens; the model's context is {context}", prompt_param,
                           code="context_length_exceeded")
    if max_tokens is None:
        return min(cap, room)
    if max_tokens > room:
        raise RequestError(f"{tokens_param}={max_tokens} + {n_prompt} prompt tokens exceed the model's context "
                           f"of {context} tokens", tokens_param, code="context_length_exceeded")
    return max_tokens
