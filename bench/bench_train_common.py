"""Shared pieces of the training benchmarks: the same weights in our model and in transformers'
LlavaForConditionalGeneration, the same batches for both, one optimizer step each, and per-step peak memory.

Peak memory per step = the process's resident-set high-water mark during the step minus its resident set
just before it (Linux: the mark is reset by writing 5 to /proc/self/clear_refs). So it counts activations,
gradients and, on the first step, the optimizer state; it does not count weights already resident.
Time is CPU time of the process per step (see paired_times). Memory: each side runs in its own process so that one allocator's cached pages do not hide the other's
peak. Time: both models live in one process and take turns, step by step, on the same batch, so that load
from other processes on a shared machine hits both alike; the ratio is the median of the per-batch ratios.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# LLaMA-style so that the HF export applies (rope, RMSNorm, swiglu, no bias, mlp2x_gelu projector).
PRESETS = {
    # ~6M LM params + CLIP 64px/8 (64 image tokens): the "small" realistic-shape run.
    "small": dict(hidden=256, layers=4, heads=8, groups=4, ffn=688, vis_hidden=128, vis_layers=2,
                  image=64, patch=8, seq=1024),
    # ~100M params (LM ~98M): the MFU run.
    "100m": dict(hidden=768, layers=13, heads=12, groups=12, ffn=2560, vis_hidden=128, vis_layers=2,
                 image=64, patch=8, seq=1024),
}


def model_cfg(preset: str, batch_size: int):
    from omegaconf import open_dict

    from nemo_neva.cli import shipped_config

    p = PRESETS[preset]
    cfg = shipped_config("neva_pretrain").model
    with open_dict(cfg):
        cfg.tokenizer.path = os.path.join(REPO, "data", "tokenizer")
        cfg.data.data_path = os.path.join(REPO, "data", "shapes_demo", "stage2_instruct.json")
        cfg.data.image_folder = os.path.join(REPO, "data", "shapes_demo", "images")
        cfg.update(encoder_seq_length=p["seq"], num_layers=p["layers"], hidden_size=p["hidden"],
                   ffn_hidden_size=p["ffn"], num_attention_heads=p["heads"], num_query_groups=p["groups"],
                   position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", bias=False,
                   micro_batch_size=batch_size, global_batch_size=batch_size,
                   make_vocab_size_divisible_by=64)  # 576 = 9 x 64: no padded vocabulary rows, so both
        # softmaxes run over the same 576 entries and the losses agree
        cfg.mm_cfg.llm.freeze = False  # stage 2: LM + projector learn, the vision tower stays frozen
        cfg.mm_cfg.vision_encoder.config.update(hidden_size=p["vis_hidden"], intermediate_size=4 * p["vis_hidden"],
                                                 num_hidden_layers=p["vis_layers"], image_size=p["image"],
                                                 patch_size=p["patch"])
        cfg.optim.update(lr=1e-4, clip_grad=1.0)
        cfg.optim.sched.update(name="constant", warmup_steps=0, min_lr=1e-5)
    return cfg


def prepare(preset: str, batch_size: int, out_dir: str) -> dict:
    """Build our model once, save it as .nemo and export the same weights as an HF LLaVA folder."""
    from nemo_neva import build_model
    from nemo_neva.export.hf import export_neva_to_hf
    from nemo_neva.perf.paper_model import from_model_cfg, neva_params

    model = build_model(model_cfg(preset, batch_size))
    nemo = os.path.join(out_dir, "ours.nemo")
    model.save_to(nemo)
    hf_dir = export_neva_to_hf(model, os.path.join(out_dir, "hf"))
    vocab = model.model.language_model.embedding.word_embeddings.weight.shape[0]
    shape = from_model_cfg(model.cfg, vocab, model.vision_config)
    return {"nemo": nemo, "hf": hf_dir, "vocab": len(model.tokenizer), "image_token_id": model.image_token_id,
            "tokens_per_image": model.tokens_per_image, "image_size": PRESETS[preset]["image"],
            "params": neva_params(shape), "shape": shape}


def length_mix(n: int, seed: int, lo: int = 32, hi: int = 448) -> list:
    """Text lengths of an instruction-tuning mix: mostly short answers, a long tail (log-uniform)."""
    rng = random.Random(seed)
    return [int(lo * (hi / lo) ** rng.random()) for _ in range(n)]


def make_batch(info: dict, text_lengths: list, images_per_sample: int, seed: int) -> dict:
    """Right-padded batch: image placeholders first, then text; loss on the text after the first 8 tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    P, k = info["tokens_per_image"], images_per_sample
    lengths = [k * P + t for t in text_lengths]
    S, B = max(lengths), len(lengths)
    ids = torch.zeros(B, S + 1, dtype=torch.long)  # pad id 0 (never trained)
    mask = torch.zeros(B, S)
    for i, n in enumerate(lengths):
        ids[i, :n + 1] = torch.randint(20, info["vocab"], (n + 1,), generator=g)
        ids[i, :k * P] = info["image_token_id"]
        mask[i, k * P + 8:n - 1] = 1.0  # predict tokens k*P+9 .. n-1 (HF cannot predict past its input)
    n_img = B * k
    images = torch.randn(n_img, 3, info["image_size"], info["image_size"], generator=g) if n_img else None
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    hf_labels = torch.full_like(tokens, -100)
    hf_labels[:, 1:] = torch.where(mask[:, :-1] > 0, tokens[:, 1:], torch.full_like(tokens[:, 1:], -100))
    return {
        "ours": {"tokens": tokens, "labels": labels, "loss_mask": mask,
                 "position_ids": torch.arange(S).expand(B, S).contiguous(), "images": images,
                 "num_images": torch.full((B,), k, dtype=torch.long)},
        "hf": {"input_ids": tokens, "labels": hf_labels, "pixel_values": images},
        "real_tokens": sum(lengths), "padded_tokens": B * S, "text_lengths": list(text_lengths),
    }


def pack_ours(batch: dict, info: dict, images_per_sample: int, capacity: int) -> dict:
    """The same samples as `batch["ours"]`, packed first-fit-decreasing into rows of at most `capacity`
    tokens (nemo_neva.data.packing, as model.data.packed_sequence packs), the rows right-padded to the
    longest one (`row_tokens`: the real tokens per row, as PackedCollator gives them), each sample attending
    only to itself (segment ids -> THD cu_seqlens, position ids restarting per sample). Same tokens, labels
    and loss mask per sample, so the masked-mean loss is the padded batch's."""
    import torch

    from nemo_neva.data.packing import first_fit_decreasing, packed_attention_mask

    ours, k = batch["ours"], images_per_sample
    lengths = [k * info["tokens_per_image"] + t for t in batch["text_lengths"]]
    bins = first_fit_decreasing(lengths, max(capacity, max(lengths)))
    rows = len(bins)
    seq = max(sum(lengths[i] for i in members) for members in bins)
    out = {key: torch.zeros(rows, seq, dtype=ours[key].dtype) for key in ("tokens", "labels", "loss_mask")}
    out["position_ids"] = torch.zeros(rows, seq, dtype=torch.long)
    segments = torch.zeros(rows, seq, dtype=torch.long)
    for r, members in enumerate(bins):
        pos = 0
        for seg, i in enumerate(members):
            n = lengths[i]
            for key in ("tokens", "labels", "loss_mask"):
                out[key][r, pos:pos + n] = ours[key][i, :n]
            out["position_ids"][r, pos:pos + n] = torch.arange(n)
            segments[r, pos:pos + n] = seg
            pos += n
        out["position_ids"][r, pos:] = torch.arange(seq - pos)  # padding: a segment of its own
        segments[r, pos:] = len(members)
    order = [i for members in bins for i in members]
    images = ours["images"]
    if images is not None:  # images follow their samples into the packed order
        images = images.view(len(lengths), k, *images.shape[1:])[order].flatten(0, 1)
    out.update(images=images, segment_ids=segments, attention_mask=packed_attention_mask(segments),
               row_tokens=torch.tensor([sum(lengths[i] for i in m) for m in bins], dtype=torch.long),
               num_images=torch.tensor([k * len(m) for m in bins], dtype=torch.long))
    return out


def _rss_kib() -> tuple:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Side:
    """One framework's training step on the shared weights."""

    def __init__(self, side: str, info: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.side = side
        if side in ("ours", "ours-packed"):
            from nemo_neva import MegatronNevaModel

            self.model = MegatronNevaModel.restore_from(info["nemo"])
            self.model.train()
            self.opt = self.model.configure_optimizers()
        else:
            from transformers import LlavaForConditionalGeneration

            self.model = LlavaForConditionalGeneration.from_pretrained(info["hf"], dtype=torch.float32)
            self.model.train()
            for p in self.model.model.vision_tower.parameters():  # frozen, as in our stage 2
                p.requires_grad_(False)
            self.model.model.vision_tower.eval()
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.params = params
            self.opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.0)

    def step(self, batch: dict) -> float:
        import torch

        if self.side == "ours":
            return float(self.model.train_on_batch(batch["ours"], self.opt))
        if self.side == "ours-packed":
            from omegaconf import open_dict

            packed = batch["ours-packed"]
            with open_dict(self.model.cfg):  # one micro-batch of however many packed rows this batch has
                self.model.cfg.micro_batch_size = packed["tokens"].shape[0]
            return float(self.model.train_on_batch(packed, self.opt))
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(**{k: v for k, v in batch["hf"].items() if v is not None}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()


def measure(side: Side, batches: list, warmup: int) -> dict:
    """Times and per-step peak memory over `batches` (the first `warmup` are not timed)."""
    times, peaks, losses, toks = [], [], [], 0
    for i, b in enumerate(batches):
        rss_before, _ = _rss_kib()
        can_reset = _reset_peak()
        t = time.perf_counter()
        losses.append(side.step(b))
        dt = time.perf_counter() - t
        _, hwm = _rss_kib()
        peaks.append((hwm - rss_before) / 1024 if can_reset else float("nan"))
        if i >= warmup:
            times.append(dt)
            toks += b["real_tokens"]
    return {"time_s": sum(times), "tokens": toks, "tokens_per_s": toks / sum(times),
            "step_times": times, "losses": losses, "peak_step_mib": max(peaks[warmup:] or peaks),
            "peak_first_step_mib": peaks[0]}


def paired_times(sides: dict, batches: list, warmup: int) -> dict:
    """Alternate the sides step by step on each batch; per-side step times and real tokens per batch.

    "times" are CPU seconds of this process per step (time.process_time): on a shared, oversubscribed
    machine they are far steadier than wall time and, with one torch thread, equal the wall time the step
    takes on an idle core (up to cache effects). "wall" keeps the wall-clock times as well.
    """
    times = {name: [] for name in sides}
    wall = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    for i, b in enumerate(batches):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]  # neither side always goes first
        for name in order:
            t, c = time.perf_counter(), time.process_time()
            losses[name].append(sides[name].step(b))
            if i >= warmup:
                times[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - t)
    return {"times": times, "wall": wall, "losses": losses, "tokens": [b["real_tokens"] for b in batches[warmup:]]}


def median(xs: list) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def run_child(script: str, args: list) -> dict:
    """Run `script --child ...` in a fresh process and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return f"{cpu}, {os.cpu_count()} cores, {platform.python_version()}, load avg {load[0]:.1f}/{load[1]:.1f}"
