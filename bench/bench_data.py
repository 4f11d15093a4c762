"""Data pipeline throughput, supply vs a training step's demand, and padding waste.

1. samples/s of NevaDataset + NevaCollator on the shipped demo set (vicuna_v1, CLIP 336px processor,
   576 image tokens, like LLaVA-1.5) with 0 and 2 DataLoader workers.
2. Supply vs demand, measured in the same run: the model's own training loader (conf/neva_pretrain.yaml,
   the tiny CPU config, data.num_workers=2) delivering batches vs `train_on_batch` consuming them (one
   optimizer step of the same config). Supply is timed on a fresh epoch after the first batch (worker
   start-up reported separately); demand is the median of timed steps after a warm-up step.
3. Pad tokens with right-padded random batches vs first-fit-decreasing packing, on a synthetic length mix
   modelled on LLaVA-665K (assumed: ~94% image samples = 576 image tokens + log-normal text, ~6% longer
   text-only conversations); "removed" counts pad *tokens* (1 - pad after / pad before), at seq 2048 and
   4096, for global FFD (what PackedNevaDataset does) and FFD within windows of consecutive samples
   (what packed shards do, model.data.pack_window). The mix is an assumption, not measured on the real file.
4. Streamed readers side by side on the same tar shards (the demo set converted once by
   scripts/convert_llava_to_energon.py, which leaves both our index.json and Energon's .nv-meta/): our
   ShardedNevaDataset + ShardedLoader vs Energon's loader + our task encoder (nemo_neva/data/energon.py), same
   encoding (vicuna_v1, 336 px, 576 image tokens), 0 and 2 workers, plus the cost of the per-batch savable-state
   snapshot that exact resume needs; and supply vs demand with the tiny config's training loader on Energon data.
5. Supply vs a real recipe's demand (`--only-streamed` includes it): Energon's loader on photo-sized JPEGs
   (640x480, written once) with the LLaVA-1.5 encoding (336 px, pad, 576 image tokens), per CPU core (0 workers),
   against the samples/s one H100 consumes in the NGC 8B NeVA finetune as the paper model predicts it
   (nemo_neva/perf/paper_model.py: bf16, seq 4096, MFU 0.4, packed rows of the length mix above). The tiny CPU
   config's step (part 2) is so short that its ratio says little about a real run.
"""
import argparse
import dataclasses
import math
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def throughput(workers: int, batch_size: int, epochs: int) -> float:
    import torch

    from nemo_neva.data.collate import NevaCollator
    from nemo_neva.data.dataset import NevaDataset

    tok, processor, settings = _encoder_args()
    demo = os.path.join(REPO, "data", "shapes_demo")
    ds = NevaDataset(os.path.join(demo, "stage2_instruct.json"), processor,
                     dataclasses.replace(settings, image_folder=os.path.join(demo, "images")))
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=True,
                                     collate_fn=NevaCollator(tok.pad_token_id))
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in dl:
            n += batch["tokens"].shape[0]
    return n / (time.perf_counter() - start)


def supply_vs_demand(steps: int, workers: int = 2, data_path: str | None = None) -> dict:
    """Samples/s the tiny config's training loader delivers with `workers` workers vs samples/s one
    training step of that config consumes."""
    import statistics

    import torch
    from omegaconf import open_dict

    from nemo_neva.cli import shipped_config

    from nemo_neva import build_model

    cfg = shipped_config("neva_pretrain").model
    with open_dict(cfg):
        cfg.tokenizer.path = os.path.join(REPO, "data", "tokenizer")
        cfg.data.data_path = data_path or os.path.join(REPO, "data", "shapes_demo", "stage1_captions.json")
        cfg.data.image_folder = os.path.join(REPO, "data", "shapes_demo", "images")
        cfg.data.num_workers = workers
    model = build_model(cfg)
    model.setup_training_data(cfg.data)
    dl = model._train_dl
    it = iter(dl)
    t0 = time.perf_counter()
    next(it)
    startup = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for _, batch in zip(range(len(dl) - 1), it):  # one epoch (Energon's stream repeats: stop at its length)
        n += batch["tokens"].shape[0]
    supply = n / (time.perf_counter() - t1)
    opt = model.configure_optimizers()
    batches = [b for _, b in zip(range(steps + 1), iter(dl))]
    times = []
    for k, batch in enumerate(batches):
        t = time.perf_counter()
        model.train_on_batch(batch, opt)
        if k:  # the first step builds buffers
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    demand = cfg.global_batch_size / step
    return {"supply": supply, "startup": startup, "step": step, "demand": demand, "ratio": supply / demand,
            "batch": cfg.global_batch_size, "samples": n, "torch_threads": torch.get_num_threads()}


def _encoder_args(**settings):
    """(tokenizer, NevaProcessor, DatasetSettings) of a LLaVA-1.5-sized setup (336 px, 576 placeholders)."""
    from transformers import CLIPImageProcessor

    from nemo_neva.data.processor import NevaProcessor
    from nemo_neva.data.settings import DatasetSettings
    from nemo_neva.data.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(REPO, "data", "tokenizer"))
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = NevaProcessor(tok, proc, tokens_per_image=576, image_aspect_ratio="pad")
    return tok, processor, DatasetSettings(seq_length=2048, template="vicuna_v1", **settings)


def streamed_readers(folder: str, batch_size: int, batches: int, workers: int) -> dict:
    """samples/s over `batches` batches of our tar-shard reader and of Energon's, on the same shards."""
    from nemo_neva.data.collate import NevaCollator
    from nemo_neva.data.energon import build_source
    from nemo_neva.data.shards import ShardedLoader, ShardedNevaDataset

    tok, processor, settings = _encoder_args(shuffle_buffer=100, num_workers=workers)
    ours = ShardedNevaDataset(os.path.join(folder, "index.json"), processor, settings)
    dl = ShardedLoader(ours, batch_size=batch_size, num_workers=workers, drop_last=True,
                       collate_fn=NevaCollator(tok.pad_token_id, skip_source=ours.take_new_skips))
    src = build_source(folder, processor, settings, dp_rank=0, dp_size=1)
    out = {}
    for name, make in (("ours", lambda: dl), ("energon", lambda: src.loader(batch_size, training=True))):
        loader = make()
        it, n = iter(loader), 0
        t0 = time.perf_counter()
        next(it)  # worker start-up / first batch, not counted
        out[name + "_first"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(batches):
            try:
                n += next(it)["tokens"].shape[0]
            except StopIteration:  # our reader ends with the epoch: start the next one
                it = iter(loader)
                n += next(it)["tokens"].shape[0]
        out[name] = n / (time.perf_counter() - t1)
        if name == "energon":  # the snapshot EnergonLoader takes before every fetch (exact resume)
            t2, k = time.perf_counter(), 20
            for _ in range(k):
                loader.loader.save_state_rank()
            out["snapshot_ms"] = (time.perf_counter() - t2) / k * 1000
        del it
    return out


def energon_demo_folder(root: str) -> str:
    """The demo instruct set (312 samples) as one folder both readers read (built once)."""
    folder = os.path.join(root, "energon_demo")
    if not os.path.isdir(os.path.join(folder, ".nv-meta")):
        from scripts.convert_llava_to_energon import convert

        demo = os.path.join(REPO, "data", "shapes_demo")
        convert(os.path.join(demo, "stage2_instruct.json"), os.path.join(demo, "images"), folder,
                samples_per_shard=32, workers=1)
    return folder


def photo_folder(root: str, n: int = 256) -> str:
    """`n` 640x480 JPEGs (smooth random colour fields plus noise: JPEG decode cost depends on the size, and noise
    keeps the files photo-sized, ~60-90 KB) with a one-turn LLaVA question each, as an Energon dataset (built once)."""
    folder = os.path.join(root, "energon_photos")
    if os.path.isdir(os.path.join(folder, ".nv-meta")):
        return folder
    import json

    import numpy as np
    from PIL import Image

    from scripts.convert_llava_to_energon import convert

    raw = os.path.join(root, "photos_raw")
    os.makedirs(os.path.join(raw, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        field = rng.random((6, 8, 3)) * 255
        img = Image.fromarray(field.astype(np.uint8)).resize((640, 480), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (480, 640, 3))
        name = f"photo_{i:04d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(raw, "images", name), quality=90)
        records.append({"id": f"photo_{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the colours of this picture in detail."},
            {"from": "gpt", "value": "The picture shows soft patches of colour blending into each other. " * 3}]})
    with open(os.path.join(raw, "data.json"), "w") as f:
        json.dump(records, f)
    convert(os.path.join(raw, "data.json"), os.path.join(raw, "images"), folder, samples_per_shard=64, workers=1)
    return folder


def modelled_h100_demand() -> dict:
    """Samples/s one H100 consumes in the NGC 8B NeVA finetune (paper model; see the module docstring)."""
    from nemo_neva.perf.paper_model import Layout, ngc_model, tokens_per_second

    lay = Layout(tp=4, pp=1, dp=2, sequence_parallel=True, seq_length=4096, global_batch_size=128, precision="bf16")
    tps = tokens_per_second(ngc_model("8B"), lay, mfu=0.4)["tokens_per_s_per_gpu"]
    mean_tokens = sum(length_mix(20_000)) / 20_000  # packed rows: a GPU eats samples at tokens/s / tokens per sample
    return {"tokens_per_s": tps, "mean_tokens": mean_tokens, "samples_per_s": tps / mean_tokens}


def length_mix(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.94:
            out.append(min(576 + int(rng.lognormvariate(math.log(120), 0.8)), 2048))
        else:
            out.append(min(int(rng.lognormvariate(math.log(700), 0.7)), 2048))
    return out


def padded_tokens(lengths: list[int], batch_size: int, seed: int = 0) -> int:
    """Tokens of right-padded batches of randomly ordered samples."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return sum(max(lengths[i] for i in order[k:k + batch_size]) * len(order[k:k + batch_size])
               for k in range(0, len(order), batch_size))


def packed_rows(lengths: list[int], seq_length: int, window: int | None = None) -> int:
    from nemo_neva.data.packing import first_fit_decreasing

    if window is None:
        return len(first_fit_decreasing(lengths, seq_length))
    return sum(len(first_fit_decreasing(lengths[k:k + window], seq_length)) for k in range(0, len(lengths), window))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed training steps for the supply/demand ratio")
    p.add_argument("--num-lengths", type=int, default=665_000)
    p.add_argument("--stream-batches", type=int, default=30, help="timed batches per streamed reader")
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "bench_data"),
                   help="where the demo set's shards / Energon dataset are written once")
    p.add_argument("--only-streamed", action="store_true", help="only part 4 (streamed readers, Energon)")
    a = p.parse_args()
    if a.only_streamed:
        return streamed_report(a)
    for workers in (0, 2):
        print(f"throughput workers={workers}: {throughput(workers, a.batch_size, a.epochs):.1f} samples/s")
    r = supply_vs_demand(a.steps)
    print(f"supply vs demand (tiny config, batch {r['batch']}): loader with 2 workers {r['supply']:.1f} samples/s "
          f"({r['samples']} samples after the first batch; first batch {r['startup']:.2f}s), training step "
          f"{r['step'] * 1000:.0f} ms = {r['demand']:.1f} samples/s -> ratio {r['ratio']:.1f}x (target >= 5x)")
    lengths = length_mix(a.num_lengths)
    real = sum(lengths)
    t = time.perf_counter()
    padded = padded_tokens(lengths, a.batch_size)
    print(f"length mix: {a.num_lengths} samples, mean {real / len(lengths):.0f} tokens; right-padded batches of "
          f"{a.batch_size}: {1 - real / padded:.1%} pad tokens")
    for seq in (2048, 4096):
        for window in (None, 1000):
            rows = packed_rows(lengths, seq, window)
            after = rows * seq - real
            print(f"  packed into {seq}-token rows, FFD {'global' if window is None else f'window {window}'}: "
                  f"{after / (rows * seq):.1%} pad tokens, {1 - after / (padded - real):.1%} of the pad tokens removed "
                  f"(target >= 90%)")
    print(f"(padding/packing stats took {time.perf_counter() - t:.1f}s)")
    streamed_report(a)


def streamed_report(a):
    folder = energon_demo_folder(a.workdir)
    for workers in (0, 2):
        r = streamed_readers(folder, a.batch_size, a.stream_batches, workers)
        print(f"streamed shards, workers={workers}, batch {a.batch_size}: ours {r['ours']:.1f} samples/s (first batch "
              f"{r['ours_first']:.2f}s), Energon {r['energon']:.1f} samples/s (first batch {r['energon_first']:.2f}s); "
              f"Energon state snapshot {r['snapshot_ms']:.2f} ms/batch")
    r = supply_vs_demand(a.steps, data_path=folder)
    print(f"supply vs demand on Energon data (tiny config, batch {r['batch']}): loader with 2 workers "
          f"{r['supply']:.1f} samples/s (first batch {r['startup']:.2f}s), training step {r['step'] * 1000:.0f} ms = "
          f"{r['demand']:.1f} samples/s -> ratio {r['ratio']:.1f}x (target >= 5x)")
    photos = photo_folder(a.workdir)
    demand = modelled_h100_demand()
    print(f"modelled demand, NGC 8B NeVA finetune on one H100 (bf16, seq 4096, MFU 0.4): "
          f"{demand['tokens_per_s']:.0f} tokens/s / {demand['mean_tokens']:.0f} tokens per sample = "
          f"{demand['samples_per_s']:.1f} samples/s per GPU")
    for workers in (0, 2):
        r = energon_supply(photos, a.batch_size, a.stream_batches, workers)
        cores = max(1, workers)
        print(f"Energon on 640x480 JPEGs (336 px, 576 image tokens), workers={workers} ({cores} core(s)): "
              f"{r:.1f} samples/s = {r / cores / demand['samples_per_s']:.1f}x one H100's demand per core "
              f"(target >= 5x)")


def energon_supply(folder: str, batch_size: int, batches: int, workers: int) -> float:
    """samples/s of Energon's training loader + our task encoder after the first batch."""
    from nemo_neva.data.energon import build_source

    _, processor, settings = _encoder_args(shuffle_buffer=100, num_workers=workers)
    src = build_source(folder, processor, settings, dp_rank=0, dp_size=1)
    it = iter(src.loader(batch_size, training=True))
    next(it)
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        n += next(it)["tokens"].shape[0]
    return n / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
