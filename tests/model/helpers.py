"""Tiny NeVA configs for tests: built from the shipped pretrain config so tests exercise real keys."""
import os

import torch
from omegaconf import OmegaConf, open_dict

from nemo_neva.cli import shipped_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model_cfg(**overrides):
    cfg = shipped_config("neva_pretrain").model
    with open_dict(cfg):
        cfg.tokenizer.path = os.path.join(ROOT, "data", "tokenizer")
        cfg.data.data_path = os.path.join(ROOT, "data", "shapes_demo", "stage1_captions.json")
        cfg.data.image_folder = os.path.join(ROOT, "data", "shapes_demo", "images")
        cfg.encoder_seq_length = 64
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def llama_overrides():
    return {
        "position_embedding_type": "rope",
        "normalization": "RMSNorm",
        "activation": "swiglu",
        "bias": False,
        "num_query_groups": 2,
    }


def batch_for(model, n=2, seq=40, seed=0, images_per_row=None):
    """A random batch with one image per sample placed at a fixed offset; `images_per_row` (a list, cycled over
    the rows, e.g. [2, 0, 1]) gives rows 0, 1 or 2 images instead: runs at offsets 1 and 2 + P, loss after them."""
    g = torch.Generator().manual_seed(seed)
    P = model.tokens_per_image
    vocab = len(model.tokenizer)
    counts = [1] * n if images_per_row is None else [images_per_row[i % len(images_per_row)] for i in range(n)]
    if max(counts) > 2 or seq <= 2 * (P + 1):
        raise ValueError(f"at most 2 images per row, and seq > {2 * (P + 1)}")
    tokens = torch.randint(20, vocab, (n, seq), generator=g)
    loss_mask = torch.zeros(n, seq)
    for row, count in enumerate(counts):
        for k in range(count):
            tokens[row, 1 + k * (P + 1):1 + k * (P + 1) + P] = model.image_token_id
        loss_mask[row, (1 + P) if images_per_row is None else 2 * (P + 1):] = 1.0
    labels = torch.randint(20, vocab, (n, seq), generator=g)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq).expand(n, seq).clone(),
        "images": torch.randn(sum(counts), 3, 32, 32, generator=g) if sum(counts) else None,
        "num_images": torch.tensor(counts, dtype=torch.long),
    }


def restore_at_layout(nemo_path, tp=1, pp=1, sp=False, **overrides):
    """Restore a .nemo at a TP/PP/SP layout (megatron-core reshards); `overrides` are further `model.` keys."""
    from nemo_neva import MegatronNevaModel

    cfg = MegatronNevaModel.restore_from(nemo_path, return_config=True)
    with open_dict(cfg):
        cfg.tensor_model_parallel_size = tp
        cfg.pipeline_model_parallel_size = pp
        cfg.sequence_parallel = sp
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return MegatronNevaModel.restore_from(nemo_path, override_config_path=cfg)


def assert_trained_close(state, ref_state, lr, steps, atol, rtol=0.0):
    """Weights after `steps` Adam steps in two computations that differ only in fp32 reduction order (another
    layout, attention kernel or CPU vendor). Adam divides by sqrt(v): where a gradient is ~0 that noise is
    amplified up to ~lr per step (tests/parallel/mp_utils.assert_adam_trained_close shows it against recorded
    gradients). So per tensor at most one element or 0.1 % may exceed `atol + rtol * |ref|`, none Adam's bound
    of 2 * lr * steps; a real bug (a layout or masking error) moves whole slices and fails."""
    assert state.keys() == ref_state.keys(), sorted(set(state) ^ set(ref_state))
    for k, ref in ref_state.items():
        diff = (state[k] - ref).abs().float()
        assert float(diff.max()) <= 2 * lr * steps, (k, float(diff.max()))
        beyond = diff > atol + rtol * ref.abs().float()
        assert int(beyond.sum()) <= max(1, diff.numel() // 1000), (k, int(beyond.sum()), float(diff.max()))


# (height, width) of each row's images for tiled batches: 1, 2 or 0 images of different placeholder counts
TILED_SIZES = [[(40, 90)], [(90, 40), (32, 32)], [], [(20, 100)]]


def tiled_batch_for(model, sizes_per_row, seq, seed=0):
    """A batch for a tiled model (model.mm_cfg.image_tiling): row r holds one image per (height, width) in
    sizes_per_row[r] (random pixels, preprocessed by the model), each a run of its own placeholder count."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    vocab, n = len(model.tokenizer), len(sizes_per_row)
    tokens = torch.randint(20, vocab, (n, seq), generator=g)
    labels = torch.randint(20, vocab, (n, seq), generator=g)
    loss_mask = torch.zeros(n, seq)
    images = []
    for r, sizes in enumerate(sizes_per_row):
        pos = 1
        for h, w in sizes:
            images.append(Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()))
            count = model.image_token_count(images[-1])
            tokens[r, pos:pos + count] = model.image_token_id
            pos += count + 2
        assert pos < seq, f"row {r} needs more than {seq} tokens"
        loss_mask[r, pos:] = 1.0
    flat = [s for sizes in sizes_per_row for s in sizes]
    return {
        "tokens": tokens, "labels": labels, "loss_mask": loss_mask,
        "position_ids": torch.arange(seq).expand(n, seq).clone(),
        "images": model.preprocess_images(images) if images else None,
        "image_sizes": torch.tensor(flat, dtype=torch.long).reshape(-1, 2) if flat else None,
        "num_images": torch.tensor([len(s) for s in sizes_per_row], dtype=torch.long),
    }


def video_model(folder, both_question: str, frames: int, **overrides):
    """(model, cfg) of the tiny model whose `model.data` reads four records written to `folder`: a video
    (clip.mp4, 6 random 32x32 frames), an image, text only, and an image + the video asked `both_question`
    (its tags set their order); `frames` sampled per video, `overrides` on the config."""
    import json

    import numpy as np

    from nemo_neva import build_model
    from nemo_neva.data.video_writer import write_video

    def conv(*pairs):
        return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]

    rng = np.random.default_rng(0)
    write_video(folder / "clip.mp4", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)])
    records = [
        {"id": "video", "video": "clip.mp4", "conversations": conv("<video>\nWhich way?", "left to right")},
        {"id": "image", "image": "train_00000.png", "conversations": conv("<image>\nColour?", "red")},
        {"id": "text", "conversations": conv("Say hi.", "hi there")},
        {"id": "both", "image": "train_00001.png", "video": "clip.mp4", "conversations": conv(both_question, "no")},
    ]
    (folder / "v.json").write_text(json.dumps(records))
    cfg = tiny_model_cfg(**{"mm_cfg.llm.freeze": False, "encoder_seq_length": 128, "data.conv_template": "vicuna_v1",
                            "data.data_path": str(folder / "v.json"),
                            "data.image_folder": os.path.join(ROOT, "data", "shapes_demo", "images"),
                            "data.video_folder": str(folder), "data.video.num_frames": frames,
                            "global_batch_size": 4, "micro_batch_size": 2, "optim.sched": None, **overrides})
    torch.manual_seed(0)
    return build_model(cfg), cfg
