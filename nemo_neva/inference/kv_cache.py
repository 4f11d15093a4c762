"""The two ways to run the network during generation, behind one interface.

`CachedDecoder` keeps every layer's keys and values in megatron-core's `StaticInferenceContext`: the prompt
(with its image features) is run once (prefill), then each step feeds only the newest token, so a decoded
token costs work independent of the prompt length (apart from attending over the cache).
`RecomputeDecoder` re-runs the whole sequence, images included, for every token: the plain reference the
cache is tested against.

Prompts of different lengths share a batch left-padded (`batching.left_pad`): every row then ends at the
same cache slot, which is what the static context's single `sequence_len_offset` needs. Padding keys are
masked out with an explicit attention mask, positions count real tokens only (learned absolute embeddings);
rotary embeddings use slot positions, which changes nothing because RoPE attention scores depend only on the
distance between query and key.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from nemo_neva.inference.batching import decode_mask, positions, prefill_mask
from nemo_neva.inference.compiled_step import compiled_language_model


class _Decoder:
    def __init__(self, module, images: Optional[torch.Tensor], image_rows: list[int],
                 image_sizes: Optional[torch.Tensor] = None, video_frames: Optional[torch.Tensor] = None):
        self.module = module  # NevaModule
        self.images = images  # [n_img, 3, H, W] in row order ([n_img, max_tiles, 3, t, t] tiled), or None
        self.image_rows = image_rows  # row index of each image (a row may have several)
        # per image, beside `images`: [n_img, 2] original (height, width) of a tiled model's images, and
        # [n_img] bool video-frame flags (model.mm_cfg.video.pool); absent when None
        self.per_image = {k: v for k, v in (("image_sizes", image_sizes), ("video_frames", video_frames))
                          if v is not None}

    def _forward(self, tokens, position_ids, mask, images, context=None):
        extra = self.per_image if images is not None else {}
        return self.module(tokens, position_ids, attention_mask=mask, images=images, inference_context=context,
                           runtime_gather_output=True, **extra)

    def _keep_images(self, rows: torch.Tensor):
        if self.images is None:
            return
        where: dict = {}  # row -> its images' indices (several per row for multi-image prompts)
        for i, r in enumerate(self.image_rows):
            where.setdefault(r, []).append(i)
        kept = [(new, i) for new, old in enumerate(rows) for i in where.get(int(old), [])]
        self.image_rows = [new for new, _ in kept]
        self.images = self.images[[i for _, i in kept]] if kept else None
        self.per_image = {k: v[[i for _, i in kept]] for k, v in self.per_image.items()} if kept else {}


class CachedDecoder(_Decoder):
    """Prefill once, then one token per step through megatron-core's static KV cache."""

    def __init__(self, module, images, image_rows, max_sequence_length: int, compile_steps: bool = False,
                 image_sizes: Optional[torch.Tensor] = None, video_frames: Optional[torch.Tensor] = None):
        super().__init__(module, images, image_rows, image_sizes, video_frames)
        self.max_sequence_length = max_sequence_length
        self.compiled = compiled_language_model(module) if compile_steps else None
        self.context = None
        self.valid = None
        self.next_position = None

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """tokens/valid [b, s] (left-padded) -> next-token logits [b, vocab]."""
        self.context = StaticInferenceContext(tokens.shape[0], self.max_sequence_length)
        pos = positions(valid)
        logits = self._forward(tokens, pos, prefill_mask(valid), self.images, self.context)
        self.context.increment_sequence_len_offset(tokens.shape[1])
        self.context.enable_decode_mode()
        self.images = None  # the image features now live in the cached keys/values
        self.valid, self.next_position = valid, pos[:, -1] + 1
        return logits[:, -1]

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """next_tokens [b] -> logits [b, vocab] for the token after them."""
        self.valid = torch.cat([self.valid, torch.ones_like(self.valid[:, :1])], dim=1)
        if self.compiled is not None:
            logits = self.compiled(input_ids=next_tokens[:, None], position_ids=self.next_position[:, None],
                                   attention_mask=decode_mask(self.valid), inference_context=self.context,
                                   runtime_gather_output=True)
        else:
            logits = self._forward(next_tokens[:, None], self.next_position[:, None], decode_mask(self.valid),
                                   None, self.context)
        self.context.increment_sequence_len_offset(1)
        self.next_position = self.next_position + 1
        return logits[:, -1]

    def keep(self, rows: torch.Tensor):
        """Continue with these rows only (finished answers leave the batch)."""
        cache = self.context.key_value_memory_dict
        for layer, (keys, values) in cache.items():
            cache[layer] = (keys[:, rows], values[:, rows])
        self.context.max_batch_size = len(rows)
        self.valid, self.next_position = self.valid[rows], self.next_position[rows]


class RecomputeDecoder(_Decoder):
    """No cache: the full sequence (and the vision tower) runs again for every token."""

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.tokens, self.valid = tokens, valid
        return self._run()

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, next_tokens[:, None]], dim=1)
        self.valid = torch.cat([self.valid, torch.ones_like(self.valid[:, :1])], dim=1)
        return self._run()

    def keep(self, rows: torch.Tensor):
        self.tokens, self.valid = self.tokens[rows], self.valid[rows]
        self._keep_images(rows)

    def _run(self) -> torch.Tensor:
        return self._forward(self.tokens, positions(self.valid), prefill_mask(self.valid), self.images)[:, -1]
