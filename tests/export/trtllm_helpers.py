"""Tiny NeVA models for the TensorRT-LLM / ONNX export tests (every weight moved off its init value)."""
import torch

from tests.model.helpers import llama_overrides, tiny_model_cfg

KINDS = {"gpt": {}, "llama": llama_overrides()}  # llama: RoPE, RMSNorm, SwiGLU, no bias, 4 heads / 2 KV heads


TILED = {"mm_cfg.image_tiling.enabled": True, "encoder_seq_length": 512}  # anyres, room for several tiled images


def tiny_neva(kind: str, seed: int = 0, **overrides):
    from nemo_neva import build_model

    model = build_model(tiny_model_cfg(**KINDS[kind], **overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norm gains, biases included: a swapped or dropped tensor must show in the logits
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def image_batch(model, rows=2, seq=30, images_per_row=1, seed=3):
    """input_ids with `images_per_row` placeholder runs per row, and the matching pixel values."""
    g = torch.Generator().manual_seed(seed)
    P = model.tokens_per_image
    ids = torch.randint(20, len(model.tokenizer), (rows, seq), generator=g)
    for j in range(images_per_row):
        start = 2 + j * (P + 3)
        ids[:, start:start + P] = model.image_token_id
    pixels = torch.randn(rows * images_per_row, 3, 32, 32, generator=g)
    return ids, pixels


def model_logits(model, ids, pixels):
    pos = torch.arange(ids.shape[1]).expand_as(ids).clone()
    with torch.no_grad():
        out = model.model(ids, pos, images=pixels, runtime_gather_output=True)
    return out[..., :len(model.tokenizer)]


def random_image(h, w, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


class OnnxVision:
    """The exported vision/vision_encoder.onnx on onnxruntime (an engine we did not write), as a callable:
    pixel values [n, 3, t, t] -> features [n, tokens, hidden]."""

    def __init__(self, export_dir, meta):
        import os

        import onnxruntime as ort

        self.session = ort.InferenceSession(os.path.join(export_dir, meta["vision_onnx"]),
                                            providers=["CPUExecutionProvider"])
        self.input, self.calls = meta["vision_input"], []

    def __call__(self, pixels):
        self.calls.append(tuple(pixels.shape))
        (out,) = self.session.run(None, {self.input: pixels.float().numpy()})
        return torch.from_numpy(out)
