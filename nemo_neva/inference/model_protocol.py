"""What generation needs of a model, stated once: `GenerationModel` (a `typing.Protocol`).

`MegatronNevaModel` satisfies it; so may anything else that wraps a `NevaModule` (tests, another front end).
inference/ reads nothing of a model beyond this, and of the network (`model.model`) only what `NetworkForGeneration`
lists: the decoders call it as `NevaModule.forward` (tokens, positions, attention_mask, images, inference_context,
runtime_gather_output, image_sizes, video_frames) and `compiled_step.py` calls its `language_model` directly.
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class NetworkForGeneration(Protocol):
    """The network (`NevaModule`) as generation uses it."""
    language_model: torch.nn.Module  # megatron-core GPTModel: its config (sequence_parallel, fp8), compiled steps

    def __call__(self, tokens, position_ids, attention_mask=None, images=None, inference_context=None,
                 runtime_gather_output=None, image_sizes=None, video_frames=None) -> torch.Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...  # the device requests are moved to


@runtime_checkable
class GenerationModel(Protocol):
    """A model `inference.generate` can answer with."""
    model: NetworkForGeneration
    tokenizer: object  # HF tokenizer: vocabulary size, EOS, detokenising the stream
    image_token_id: int  # never sampled
    training: bool

    @property
    def processor(self):  # nemo_neva.data.processor.NevaProcessor: encoding, pixels, the context check
        ...

    @property
    def pads_in_cached_steps(self) -> bool:
        """Whether the network's attention honours a padding mask in cached decode steps (our CPU core attention
        does; Transformer Engine's drops it there): only then do prompts of different lengths share a batch."""
        ...

    def eval(self): ...

    def train(self, mode: bool = True): ...
