"""Compare the built TensorRT engines with the .nemo model on one image + question (GPU + TensorRT-LLM needed).

    python -m nemo_neva.export.trtllm_check --nemo-path IN.nemo --export-dir OUT [--image IMG] [--question Q]

1. pixel values from the exported image processor and the recorded image_aspect_ratio (the training
   preprocessing; must equal the .nemo model's) -> vision engine (TensorRT) -> image features; compared with
   the .nemo model's own `encode_images` (fp32, CPU)
2. prompt rendered with the exported template, the images leading (as Triton places them); image placeholders
   -> fake ids vocab_size..; the features are the prompt table (nemo_neva.export.trtllm_prompt)
3. LLM engine via tensorrt_llm.runtime.ModelRunner: greedy tokens + first-step logits, against the .nemo
   model's greedy decode and last-position logits
A tiled (anyres) export is checked on two images of different sizes: IMG and its top half (non-square), each
image's own tiles through the vision engine, the table packed with the exported newline
(`trtllm_prompt.tiled_prompt_table`); the LLM engine must take 2 images per request
(`--max-images-per-request 2`, as scripts/trtllm_gpu_check.sh builds it).
Exit status 1 when the first greedy token differs or the vision features are off; later divergence in a
bf16/fp16 engine is reported, not failed. `engine_inputs` (steps 1-2) runs on CPU in the tests with onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _vision_engine_features(engine_path: str, pixels: torch.Tensor, meta: dict) -> torch.Tensor:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    with open(engine_path, "rb") as f:
        engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
    ctx = engine.create_execution_context()
    x = pixels.cuda().float().contiguous()
    ctx.set_input_shape(meta["vision_input"], tuple(x.shape))
    out = torch.empty(tuple(ctx.get_tensor_shape(meta["vision_output"])), dtype=torch.float32, device="cuda")
    ctx.set_tensor_address(meta["vision_input"], x.data_ptr())
    ctx.set_tensor_address(meta["vision_output"], out.data_ptr())
    stream = torch.cuda.current_stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("vision engine execution failed")
    stream.synchronize()
    return out.cpu()


def _request_images(image, tiled: bool) -> list:
    """The check's images: IMG, and for a tiled export also its top half (another size and aspect ratio)."""
    if not tiled:
        return [image]
    return [image, image.crop((0, 0, image.width, max(1, image.height // 2)))]


class CheckFailed(ValueError):
    """The export does not fit the .nemo model (pixels, placeholders): nothing to compare the engines on."""


def engine_inputs(model, export_dir: str, meta: dict, image, question: str, vision) -> dict:
    """Steps 1-2, all but the LLM engine: the request's images and prompt, the vision features (`vision`: pixel
    values -> features, the TensorRT engine here, onnxruntime in the CPU tests) against the .nemo's, the prompt
    table, the fake ids and the .nemo's last-position logits. Raises CheckFailed for an export of another model."""
    from nemo_neva.data.constants import IMAGE_TOKEN
    from nemo_neva.export.placement import on_module
    from nemo_neva.export.trtllm import export_pixels
    from nemo_neva.export.trtllm_prompt import (export_tiling, fake_prompt_ids, image_tiles, load_image_newline,
                                                prompt_table, tiled_prompt_table)
    from nemo_neva.inference.prompting import build_prompt
    from nemo_neva.modules.tiling import image_size_of

    tiling = export_tiling(meta)
    images = _request_images(image, tiling is not None)
    pixels = torch.cat([export_pixels(export_dir, im, meta) for im in images])
    same = meta["image_aspect_ratio"] == model.image_aspect_ratio and (tiling is None) == (model.tiling is None)
    if not same or not all(torch.equal(p, model.processor.preprocess_images(im)) for p, im in zip(pixels, images)):
        raise CheckFailed(f"the export preprocesses images as {meta['image_aspect_ratio']!r}"
                          f"{' tiled' if tiling else ''}, the .nemo as {model.image_aspect_ratio!r}"
                          f"{' tiled' if model.tiling else ''} (different pixel values): export this .nemo again")
    sizes = [image_size_of(im) for im in images]
    vision_input = pixels if tiling is None else image_tiles(pixels, sizes, tiling)  # a tiled image: its own tiles
    tower, module = model.model.vision_tower, model.model
    with torch.no_grad():  # the reference inputs on the model's device, pixels in its vision tower's dtype
        ref_feats = module.encode_images(on_module(vision_input, tower)).float().cpu()
    feats = vision(vision_input).float().cpu()
    vis_err = float((feats - ref_feats).abs().max() / ref_feats.abs().max())
    table = prompt_table(feats) if tiling is None else \
        tiled_prompt_table(feats, sizes, tiling, load_image_newline(export_dir, meta))
    # the exported template, the images leading one per line: the prompt Triton makes of them (query_triton.py)
    prompt = build_prompt(meta["conv_template"], "\n".join([IMAGE_TOKEN] * len(images) + [question]), True)
    ids = model.processor.encode(prompt, images)
    n_placeholders = int((ids == meta["image_token_id"]).sum())
    if n_placeholders != table.shape[0]:
        raise CheckFailed(f"{n_placeholders} image placeholders but {table.shape[0]} prompt-table rows")
    image_sizes = None if tiling is None else on_module(torch.tensor(sizes, dtype=torch.long), module)
    with torch.no_grad():
        ref_logits = module(on_module(ids.unsqueeze(0), module), on_module(torch.arange(ids.numel()).unsqueeze(0),
                            module), images=on_module(pixels, tower), image_sizes=image_sizes,
                            runtime_gather_output=True)[0, -1, : meta["vocab_size"]].float().cpu()
    return {"images": images, "prompt": prompt, "ids": ids, "vision_inputs": vision_input.shape[0],
            "vis_err": vis_err, "table": table, "ref_logits": ref_logits,
            "fake": fake_prompt_ids(ids.unsqueeze(0), meta["image_token_id"], meta["vocab_size"])[0]}


def main(argv=None) -> int:
    from PIL import Image

    from nemo_neva import MegatronNevaModel

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nemo-path", required=True)
    ap.add_argument("--export-dir", required=True, help="folder written by scripts/export_to_trtllm.py --build")
    ap.add_argument("--image", default=os.path.join(root, "data", "shapes_demo", "images", "eval_00000.png"))
    ap.add_argument("--question", default="What is in the image?")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--images-out", default=None, help="write the request's images there (image_0.png, ...: "
                                                       "IMG, and its top half for a tiled export) to send them on")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible", file=sys.stderr)
        return 2
    meta = json.load(open(os.path.join(args.export_dir, "nemo_neva_export.json")))
    engines = os.path.join(args.export_dir, "engines")

    model = MegatronNevaModel.restore_from(args.nemo_path).eval()  # fp32 reference (CPU is fine)
    engine = os.path.join(engines, "vision.engine")
    try:
        got = engine_inputs(model, args.export_dir, meta, Image.open(args.image).convert("RGB"), args.question,
                            lambda px: _vision_engine_features(engine, px, meta))
    except CheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    ids, fake, table, ref_logits, vis_err = (got[k] for k in ("ids", "fake", "table", "ref_logits", "vis_err"))
    if args.images_out:
        os.makedirs(args.images_out, exist_ok=True)
        for k, im in enumerate(got["images"]):
            im.save(os.path.join(args.images_out, f"image_{k}.png"))
    print(f"vision engine vs .nemo on {got['vision_inputs']} input(s): max |diff| / max |ref| = {vis_err:.2e}")
    ref_text = model.generate([got["images"]], [got["prompt"]], max_new_tokens=args.max_new_tokens,
                              stop_token_ids=meta["stop_token_ids"], stop_strings=meta["stop_strings"])[0]

    from tensorrt_llm.runtime import ModelRunner

    runner = ModelRunner.from_dir(os.path.join(engines, "llm"))
    end_id = meta["stop_token_ids"][0] if meta["stop_token_ids"] else model.tokenizer.eos_token_id
    out = runner.generate([fake.to(torch.int32)], max_new_tokens=args.max_new_tokens, end_id=end_id,
                          pad_id=model.tokenizer.pad_token_id or end_id, prompt_table=table.unsqueeze(0),
                          prompt_tasks="0", return_dict=True, output_generation_logits=True)
    tokens = out["output_ids"][0, 0, ids.numel():].tolist()
    tokens = tokens[: next((i for i, t in enumerate(tokens) if t in meta["stop_token_ids"]), len(tokens))]
    trt_text = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    first = out["generation_logits"][0, 0, 0, : meta["vocab_size"]].float().cpu()
    logit_err = float((first - ref_logits).abs().max())
    print(f"first-step logits: max |diff| = {logit_err:.3e} (logit range {float(ref_logits.abs().max()):.2f}); "
          f"argmax engine {int(first.argmax())} vs .nemo {int(ref_logits.argmax())}")
    print(f".nemo   : {ref_text!r}\nengine : {trt_text!r}")
    ok = int(first.argmax()) == int(ref_logits.argmax()) and vis_err < 5e-2
    if trt_text != ref_text:
        print("note: the greedy texts diverge after the first token (expected sometimes in fp16/bf16)")
    print("trtllm_check: " + ("OK" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
