"""`NevaProcessor`: image + text -> token ids, pixel values and placeholder counts, in one place.

As transformers' `LlavaProcessor`, it owns the tokenizer and the image preprocessing (the model's
`image_aspect_ratio`, anyres tiles); it places `<image>` / `<video>` tags, expands a video into its frames,
encodes the prompt with each image's placeholder run and checks it fits the context. Generation, evaluation,
serving (HTTP and Triton) and the HF export take it from `MegatronNevaModel.processor`; a TensorRT-LLM export
builds one from its own files. The geometry (placeholders per image / per pooled frame, the tiling grid)
stays with modules/ (vision tower, projector, frame pool, `Tiling`); this is the one place that asks it.

Saving: a .nemo keeps the processor through its parts (the `tokenizer/` and `image_processor/` folders, and
`model.data.image_aspect_ratio` / `model.mm_cfg.image_tiling` in its config), the layout it always had, so
older .nemo files restore unchanged; `to_hf` makes the HF processor an export writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nemo_neva.data.constants import IMAGE_TOKEN, VIDEO_TOKEN
from nemo_neva.data.image_io import check_aspect_ratio, hf_processor_for, preprocess
from nemo_neva.data.tokenizer import encode_text
from nemo_neva.data.video_io import Video, expand_media

__all__ = ["NevaProcessor", "NevaInputs", "ContextTooLong", "place_media_tags"]


class ContextTooLong(ValueError):
    """A prompt (plus the tokens asked for) that does not fit the model's context."""


@dataclass
class NevaInputs:
    """One request as the model takes it."""
    ids: torch.Tensor  # prompt token ids, each image's placeholder run expanded
    pixels: Optional[torch.Tensor]  # [n_images, 3, H, W] in tag order ([n, max_tiles, 3, t, t] tiled), or None
    sizes: Optional[torch.Tensor] = None  # [n_images, 2] original (height, width): tiled models only
    frames: Optional[torch.Tensor] = None  # [n_images] bool, which images are video frames (None: none)


def place_media_tags(question: str, n_images: int, n_videos: int = 0) -> str:
    """A question with an `<image>` tag per image and a `<video>` tag per video first (videos before images,
    as in training) unless it places its own; a tag without its media is a ValueError."""
    if n_images and IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n" * int(n_images) + question
    if not n_images and IMAGE_TOKEN in question:
        raise ValueError(f"the prompt contains {IMAGE_TOKEN} but no image was given")
    if n_videos and VIDEO_TOKEN not in question:
        question = f"{VIDEO_TOKEN}\n" * int(n_videos) + question
    if not n_videos and VIDEO_TOKEN in question:
        raise ValueError(f"the prompt contains {VIDEO_TOKEN} but no video was given")
    return question


def _image_count(image) -> int:
    """None -> 0; a PIL image or [3,H,W] tensor -> 1; a list of images or an [n,3,H,W] tensor -> n."""
    if image is None:
        return 0
    if isinstance(image, (list, tuple)):
        return len(image)
    if torch.is_tensor(image) and image.dim() == 4:
        return image.shape[0]
    return 1


def _listed(image) -> list:
    return list(image) if isinstance(image, (list, tuple)) else ([] if image is None else [image])


class NevaProcessor:
    """`tokenizer`: the model's HF tokenizer (with an `<image>` token); `image_processor`: the vision tower's
    HF image processor; `tokens_per_image` / `tokens_per_frame`: placeholders of one image (one tile when
    tiled) / one pooled video frame; `tiling`: a `nemo_neva.modules.tiling.Tiling` or None;
    `context_length`: the model's `encoder_seq_length` (None: unchecked)."""

    def __init__(self, tokenizer, image_processor, tokens_per_image: int, tokens_per_frame: Optional[int] = None,
                 image_aspect_ratio: str = "square", tiling=None, context_length: Optional[int] = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.tokens_per_image = int(tokens_per_image)
        self.tokens_per_frame = self.tokens_per_image if tokens_per_frame is None else int(tokens_per_frame)
        if self.tokens_per_image < 1 or self.tokens_per_frame < 1:
            raise ValueError(f"placeholders per image ({self.tokens_per_image}) and per video frame "
                             f"({self.tokens_per_frame}) must be >= 1")
        self.image_aspect_ratio = check_aspect_ratio(image_aspect_ratio)
        self.tiling, self.context_length = tiling, context_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._tiling_processor = None

    # ------------------------------------------------------------------ pixels
    @property
    def pixel_processor(self):
        """The HF image processor `preprocess_images` runs: the tower's, or for a tiled model transformers'
        LlavaNextImageProcessor with the tower's settings and the model's grid pinpoints."""
        if self.tiling is None:
            return self.image_processor
        if self._tiling_processor is None:
            from nemo_neva.modules.tiling import processor_for

            self._tiling_processor = processor_for(self.image_processor, self.tiling)
        return self._tiling_processor

    def preprocess_images(self, images) -> torch.Tensor:
        """PIL image(s) -> pixel values [3,H,W] (a list: [N,3,H,W]) exactly as the training data makes them
        (`data.image_io.preprocess`); a tiled model gives [max_tiles,3,t,t] per image."""
        return preprocess(images, self.pixel_processor, self.image_aspect_ratio, self.tiling)

    def pixels(self, image) -> Optional[torch.Tensor]:
        """A request's images (PIL, a list, or pixel tensors already) as [n, 3, H, W] in tag order, or None."""
        if _image_count(image) == 0:
            return None
        if torch.is_tensor(image):
            return image if image.dim() == 4 else image.unsqueeze(0)
        return torch.stack([im if torch.is_tensor(im) else self.preprocess_images(im) for im in _listed(image)])

    def image_sizes(self, image) -> Optional[torch.Tensor]:
        """[n, 2] original (height, width) of a request's images, for a tiled model (None otherwise)."""
        if self.tiling is None or _image_count(image) == 0:
            return None
        from nemo_neva.modules.tiling import image_size_of

        return torch.tensor([image_size_of(im) for im in _listed(image)], dtype=torch.long)

    # ------------------------------------------------------------------ placeholder counts
    def image_token_count(self, image) -> int:
        """Placeholder tokens one image (PIL) becomes: `tokens_per_image`, or for a tiled model
        `Tiling.tokens(height, width)` of the image."""
        if self.tiling is None:
            return self.tokens_per_image
        from nemo_neva.modules.tiling import image_size_of

        if torch.is_tensor(image):
            raise ValueError("a tiled model (model.mm_cfg.image_tiling) takes PIL images: its placeholder count "
                             "and tiles depend on each image's original size")
        return self.size_token_count(*image_size_of(image))

    def size_token_count(self, height: int, width: int) -> int:
        """Placeholder tokens of an image of this original size (what a dataset knows from a file header)."""
        return self.tokens_per_image if self.tiling is None else self.tiling.tokens(int(height), int(width))

    def token_counts(self, images, frames: Optional[torch.Tensor] = None) -> list:
        """Placeholder tokens of each image in order: `tokens_per_image` each (`tokens_per_frame` for a video
        frame), or for a tiled model each image's own count from its size (so it needs the images).
        `images`: as `encode` takes them, or a count."""
        n_images = int(images) if isinstance(images, (bool, int)) else _image_count(images)
        if self.tiling is None:
            if frames is None:
                return [self.tokens_per_image] * n_images
            return [self.tokens_per_frame if f else self.tokens_per_image for f in frames.tolist()]
        if isinstance(images, (bool, int)) or torch.is_tensor(images):
            raise ValueError("a tiled model (model.mm_cfg.image_tiling) needs the PIL images themselves: each "
                             "image's placeholder count depends on its size")
        return [self.image_token_count(im) for im in _listed(images)]

    # ------------------------------------------------------------------ text
    @staticmethod
    def expand_videos(prompt: str, image):
        """A request holding a `Video` (alone or in its list) or a `<video>` tag -> (prompt, images, frames)
        with each video's tag expanded to one `<image>` tag per frame and its frames in the image list, in tag
        order; `frames` [n_images] bool marks them (None for a request without video)."""
        items = image if isinstance(image, (list, tuple)) else [image]
        if VIDEO_TOKEN not in prompt and not any(isinstance(it, Video) for it in items):
            return prompt, image, None
        items = [] if image is None else items
        prompt, images = expand_media(prompt, items)
        flags = [isinstance(it, Video) for it in items for _ in (it.frames if isinstance(it, Video) else [it])]
        return prompt, images, torch.tensor(flags, dtype=torch.bool)

    def encode(self, prompt: str, images) -> torch.Tensor:
        """Prompt ids with each `<image>` tag expanded to its placeholder run. `images`: the request's media as
        `generate` takes them (videos included), or a count (True/False for one/none): one tag per image."""
        frames = None
        if not isinstance(images, (bool, int)):
            prompt, images, frames = self.expand_videos(prompt, images)
        elif VIDEO_TOKEN in prompt:
            raise ValueError(f"the prompt has a {VIDEO_TOKEN} tag: pass the request's images and videos, not a count")
        return self._encode_expanded(prompt, images, frames)

    def _encode_expanded(self, prompt: str, images, frames) -> torch.Tensor:
        n_images = int(images) if isinstance(images, (bool, int)) else _image_count(images)
        n_tags = prompt.count(IMAGE_TOKEN)
        if n_tags != n_images:
            raise ValueError(f"prompt must contain exactly {n_images} '{IMAGE_TOKEN}' tag(s) (one per image), "
                             f"found {n_tags}")
        counts = self.token_counts(images, frames)
        ids = []  # the whole prompt in one call, as the training data is tokenised (data/tokenizer.py)
        for t in encode_text(self.tokenizer, prompt):
            ids += [t] * counts.pop(0) if t == self.image_token_id else [t]
        return torch.tensor(ids, dtype=torch.long)

    def check_context(self, n_prompt: int, max_new_tokens: int, what: str = "prompt",
                      budget: str = "max_new_tokens") -> None:
        """ContextTooLong when `n_prompt` tokens + `max_new_tokens` exceed the context (`what` / `budget`
        name them in the message)."""
        if self.context_length is not None and max_new_tokens >= self.context_length:
            raise ContextTooLong(f"{budget}={max_new_tokens} does not fit the model context of "
                                 f"{self.context_length} tokens")
        if self.context_length is not None and n_prompt + max_new_tokens > self.context_length:
            raise ContextTooLong(f"{what} ({n_prompt} tokens) + {budget} ({max_new_tokens}) exceeds the context "
                                 f"of {self.context_length} tokens")

    def __call__(self, prompt: str, media=None, max_new_tokens: Optional[int] = None, what: str = "prompt",
                 budget: str = "max_new_tokens") -> NevaInputs:
        """One request -> `NevaInputs` (ids, pixels, tiled sizes, video-frame flags), its length checked
        against the context when `max_new_tokens` is given. `media`: None, an image, a `Video` or a list of
        them in tag order (PIL images or pixel tensors)."""
        prompt, images, frames = self.expand_videos(prompt, media)
        ids = self._encode_expanded(prompt, images, frames)
        if max_new_tokens is not None:
            self.check_context(ids.numel(), max_new_tokens, what, budget)
        return NevaInputs(ids, self.pixels(images), self.image_sizes(images), frames)

    # ------------------------------------------------------------------ Hugging Face
    def to_hf(self, patch_size: int, drop_cls: bool, num_additional_image_tokens: int, tokenizer=None):
        """transformers' LlavaProcessor (LlavaNextProcessor when tiled) making this processor's pixels by itself
        (its aspect-ratio mode, or its tiles) and inserting its placeholder counts: what the HF export writes."""
        from transformers import LlavaNextProcessor, LlavaProcessor

        if self.tiling is None:
            cls, image_processor = LlavaProcessor, hf_processor_for(self.image_processor, self.image_aspect_ratio)
        else:
            cls, image_processor = LlavaNextProcessor, self.pixel_processor
        return cls(image_processor=image_processor, tokenizer=tokenizer or self.tokenizer, patch_size=patch_size,
                   vision_feature_select_strategy="default" if drop_cls else "full",
                   num_additional_image_tokens=num_additional_image_tokens, image_token=IMAGE_TOKEN)
