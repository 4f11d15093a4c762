"""The NeVA network: frozen vision tower -> projector -> spliced into a megatron-core GPTModel.

Images enter the prompt as runs of the image token; the projected patch features replace the word
embeddings at exactly those positions (`image_splice.embed_with_images`: megatron-core's own embedding of the
prompt, then the features in place of its placeholders), and GPTModel takes the result as its `decoder_input`.
Without images (text only, and every KV-cache decoding step) GPTModel embeds the tokens itself. Vision and
projector live on the first pipeline stage only.

With `tiling` (anyres, `nemo_neva.modules.tiling`) an image is `[max_tiles, 3, tile, tile]` pixels plus its
original (height, width) in `image_sizes`; its tiles run through the tower in one batch with every other
image's, and `anyres.pack_image` makes its `tiling.tokens(h, w)` embeddings (a learned `image_newline`
closes each feature row). Images of one batch may then differ in token count: the checks below compare each
sample's placeholders with the sum of its own images' counts.

With `frame_pool` (`model.mm_cfg.video.pool`, `nemo_neva.modules.frame_pool`) the images flagged in
`video_frames` [n] (video frames) have their tower features pooled before the projector and cost
`tokens_per_frame` placeholders each; the other images are not pooled.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from nemo_neva.modules.image_splice import embed_with_images


class ImageTokenMismatch(ValueError):
    """The prompt's image placeholders do not match the images given."""


class NevaModule(MegatronModule):
    def __init__(self, config, language_model, vision_tower=None, projector=None, image_token_id: int = -1,
                 freeze_vision: bool = True, tiling=None, frame_pool=None, tokens_per_image: int = 0,
                 tokens_per_frame: Optional[int] = None):
        """`tokens_per_image` / `tokens_per_frame`: placeholders of one image (one tile) and of one (pooled) video
        frame, as `nemo_neva.modules.vision.tokens_per_image` counts them from the config (every pipeline stage
        knows them, tower or not)."""
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.language_model = language_model
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.vision_tower = vision_tower
        self.projector = projector
        self.image_token_id = image_token_id
        self.freeze_vision = freeze_vision
        self.tiling = tiling
        self.frame_pool = frame_pool
        self.tokens_per_image = int(tokens_per_image)
        self.tokens_per_frame = self.tokens_per_image if tokens_per_frame is None else int(tokens_per_frame)
        if self.pre_process:
            if vision_tower is None or projector is None:
                raise ValueError("the first pipeline stage needs the vision tower and projector")
            if tiling is not None:
                from nemo_neva.modules.anyres import new_image_newline

                self.image_newline = new_image_newline(config.hidden_size, next(projector.parameters()).dtype)

    # megatron-core's finalize_model_grads finds the module by `pre_process` and then asks it for the
    # embeddings it syncs across pipeline stages: answer for the wrapped GPTModel.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    @property
    def embedding(self):
        return self.language_model.embedding

    def set_input_tensor(self, input_tensor):
        self.language_model.set_input_tensor(input_tensor)

    def _tower(self, images: torch.Tensor) -> torch.Tensor:
        if self.freeze_vision:
            with torch.no_grad():
                return self.vision_tower(images)
        return self.vision_tower(images)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats.to(next(self.projector.parameters()).dtype))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] -> [N, tokens_per_image, llm_hidden]."""
        return self._project(self._tower(images))

    def encode_media(self, images: torch.Tensor, video_frames: Optional[torch.Tensor]) -> torch.Tensor:
        """[N,3,H,W] images and video frames (`video_frames` [N] bool) -> [sum of their counts, llm_hidden]
        in image order: one tower pass; the frames' features pooled (`frame_pool`) before the projector."""
        hidden = self.language_model.config.hidden_size
        frames = _frame_flags(video_frames, images.shape[0]) if self.frame_pool is not None else None
        if frames is None or not bool(frames.any()):
            return self.encode_images(images).reshape(-1, hidden)
        feats = self._tower(images)
        pooled = self._project(self.frame_pool(feats[frames]))
        plain = self._project(feats[~frames]) if not bool(frames.all()) else None
        pooled_it, plain_it = iter(pooled), iter(plain if plain is not None else [])
        return torch.cat([next(pooled_it) if f else next(plain_it) for f in frames.tolist()])

    def image_token_counts(self, images: Optional[torch.Tensor], image_sizes=None, video_frames=None) -> list[int]:
        """Placeholder tokens of each image of the batch, in order (checks the layout first)."""
        n = 0 if images is None else images.shape[0]
        frames = _frame_flags(video_frames, n)
        if self.tiling is None:
            if images is not None and images.dim() != 4:
                raise ImageTokenMismatch(f"images must be [n, 3, H, W] pixel values, got shape {tuple(images.shape)}"
                                         " (tiled [n, tiles, 3, H, W] images need model.mm_cfg.image_tiling)")
            if frames is None:
                return [self.tokens_per_image] * n
            return [self.tokens_per_frame if f else self.tokens_per_image for f in frames.tolist()]
        if frames is not None and bool(frames.any()):
            raise ImageTokenMismatch("video frames with model.mm_cfg.image_tiling are not supported")
        if n == 0:
            return []
        want = (self.tiling.max_tiles, 3, self.tiling.tile, self.tiling.tile)
        if images.dim() != 5 or tuple(images.shape[1:]) != want:
            raise ImageTokenMismatch(f"a tiled model takes images [n, {', '.join(map(str, want))}] (the model's "
                                     f"preprocess_images), got shape {tuple(images.shape)}")
        if image_sizes is None or tuple(image_sizes.shape) != (n, 2):
            got = None if image_sizes is None else tuple(image_sizes.shape)
            raise ImageTokenMismatch(f"a tiled model needs image_sizes [{n}, 2] (original height, width of each "
                                     f"image), got {got}")
        return [self.tiling.tokens(int(h), int(w)) for h, w in image_sizes.tolist()]

    def encode_tiled(self, images: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """[n, max_tiles, 3, t, t] + sizes [n, 2] -> [sum of tiling.tokens, llm_hidden]: every image's own tiles
        through the tower in one batch, then base + unpadded grid + newlines per image."""
        from nemo_neva.modules.anyres import image_tiles, pack_images

        sizes = image_sizes.tolist()
        feats = self.encode_images(image_tiles(images, sizes, self.tiling))
        return pack_images(feats, sizes, self.tiling, self.image_newline)

    def _image_mask_and_features(self, tokens: torch.Tensor, images: Optional[torch.Tensor],
                                 num_images: Optional[torch.Tensor] = None, image_sizes=None, video_frames=None):
        mask = tokens == self.image_token_id
        counts = self.image_token_counts(images, image_sizes, video_frames)
        per_image = "tokens by image size" if self.tiling is not None else f"{self.tokens_per_image} tokens per image"
        if self.frame_pool is not None:
            per_image += f" ({self.tokens_per_frame} per pooled video frame)"
        if num_images is not None:
            num_images = num_images.to("cpu")
            if int(num_images.sum()) != len(counts):
                raise ImageTokenMismatch(f"num_images adds up to {int(num_images.sum())} but {len(counts)} "
                                         "image(s) were given")
            # each sample's own images' counts (images are in sample order)
            ends = torch.cumsum(torch.tensor([0] + counts, dtype=torch.long), 0)[torch.cumsum(num_images, 0)]
            expected = ends - torch.cat([ends.new_zeros(1), ends[:-1]])
            per_sample = mask.sum(dim=1).to("cpu")
            bad = (per_sample != expected).nonzero().flatten()
            if bad.numel():
                i = int(bad[0])
                raise ImageTokenMismatch(
                    f"sample {i} of the batch has {int(per_sample[i])} image placeholder tokens but "
                    f"{int(num_images[i])} image(s) x {per_image} = {int(expected[i])}"
                )
        n_placeholders = int(mask.sum())
        expected = sum(counts)
        if n_placeholders != expected:
            raise ImageTokenMismatch(
                f"prompt has {n_placeholders} image placeholder tokens but {len(counts)} image(s) x "
                f"{per_image} = {expected} were expected"
            )
        if not counts:
            return None
        if self.tiling is not None:
            return mask, self.encode_tiled(images, image_sizes)
        return mask, self.encode_media(images, video_frames)

    def forward(self, tokens, position_ids, attention_mask=None, images=None, labels=None,
                inference_context=None, runtime_gather_output=None, num_images=None, packed_seq_params=None,
                image_sizes=None, video_frames=None):
        """Logits [b, s, vocab/tp] (or per-token loss [b, s] when labels are given). `image_sizes` [n, 2]:
        each image's original (height, width), for a tiled model only; `video_frames` [n] bool: which images
        are video frames (pooled with `frame_pool`; None: none are)."""
        decoder_input = None
        if self.pre_process:
            spliced = self._image_mask_and_features(tokens, images, num_images, image_sizes, video_frames)
            input_ids = tokens.masked_fill(tokens == self.image_token_id, 0)
            if spliced is not None:
                decoder_input = embed_with_images(self.language_model.embedding, input_ids, position_ids, *spliced)
        else:
            input_ids = tokens
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            inference_context=inference_context,
            runtime_gather_output=runtime_gather_output,
            packed_seq_params=packed_seq_params,
        )


def _frame_flags(video_frames, n: int) -> Optional[torch.Tensor]:
    """`video_frames` as a [n] bool CPU tensor (None stays None), its length checked."""
    if video_frames is None:
        return None
    flags = torch.as_tensor(video_frames).to("cpu", torch.bool).reshape(-1)
    if flags.numel() != n:
        raise ImageTokenMismatch(f"video_frames has {flags.numel()} entries for {n} image(s)")
    return flags
