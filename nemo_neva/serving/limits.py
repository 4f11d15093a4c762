"""Request limits of the server (`server.*` in conf/neva_serve.yaml); every breach is an HTTP 400."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 16 * 1024 * 1024     # whole JSON body, checked from Content-Length before reading
    max_image_bytes: int = 8 * 1024 * 1024     # one decoded data: URL image
    max_image_pixels: int = 4096 * 4096        # from the image header, before the pixels are decoded
    max_images: int = 1                        # per conversation (the model reads one image per prompt)
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
            if f.name != "max_images" and value == 0:
                raise ValueError(f"server.{f.name} must be > 0")
        if self.max_images > 1:
            raise ValueError(f"server.max_images={self.max_images}: the model reads at most one image per prompt")

    @classmethod
    def from_cfg(cls, cfg) -> "ServerLimits":
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})
