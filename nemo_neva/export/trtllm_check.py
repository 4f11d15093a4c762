"""Compare the built TensorRT engines with the .nemo model on one image + question (GPU + TensorRT-LLM needed).

    python -m nemo_neva.export.trtllm_check --nemo-path IN.nemo --export-dir OUT [--image IMG] [--question Q]

1. pixel values from the exported image processor and the recorded image_aspect_ratio (the training
   preprocessing; must equal the .nemo model's) -> vision engine (TensorRT) -> image features; compared with
   the .nemo model's own `encode_images` (fp32, CPU)
2. prompt rendered with the exported template; image placeholders -> fake ids vocab_size..; the features are
   the prompt table (nemo_neva.export.trtllm_prompt)
3. LLM engine via tensorrt_llm.runtime.ModelRunner: greedy tokens + first-step logits, against the .nemo
   model's greedy decode and last-position logits
Exit status 1 when the first greedy token differs or the vision features are off; later divergence in a
bf16/fp16 engine is reported, not failed.
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


def main(argv=None) -> int:
    from PIL import Image

    from nemo_neva import MegatronNevaModel
    from nemo_neva.data.constants import IMAGE_TOKEN
    from nemo_neva.export.trtllm import export_pixels
    from nemo_neva.export.trtllm_prompt import fake_prompt_ids, prompt_table
    from nemo_neva.inference.generate import encode_prompt

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nemo-path", required=True)
    ap.add_argument("--export-dir", required=True, help="folder written by scripts/export_to_trtllm.py --build")
    ap.add_argument("--image", default=os.path.join(root, "data", "shapes_demo", "images", "eval_00000.png"))
    ap.add_argument("--question", default="What is in the image?")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible", file=sys.stderr)
        return 2
    meta = json.load(open(os.path.join(args.export_dir, "nemo_neva_export.json")))
    engines = os.path.join(args.export_dir, "engines")

    model = MegatronNevaModel.restore_from(args.nemo_path).eval()  # fp32 reference (CPU is fine)
    image = Image.open(args.image).convert("RGB")
    pixels = export_pixels(args.export_dir, image, meta)
    same = meta["image_aspect_ratio"] == model.image_aspect_ratio
    if not same or not torch.equal(pixels[0], model.preprocess_images(image)):
        print(f"error: the export preprocesses images as {meta['image_aspect_ratio']!r}, the .nemo as "
              f"{model.image_aspect_ratio!r} (different pixel values): export this .nemo again", file=sys.stderr)
        return 1
    with torch.no_grad():
        ref_feats = model.model.encode_images(pixels)
    feats = _vision_engine_features(os.path.join(engines, "vision.engine"), pixels, meta)
    vis_err = float((feats - ref_feats).abs().max() / ref_feats.abs().max())
    print(f"vision engine vs .nemo: max |diff| / max |ref| = {vis_err:.2e}")

    prompt = meta["prompt_example"].replace("{question}", args.question)
    ids = encode_prompt(model, prompt, prompt.count(IMAGE_TOKEN))
    fake = fake_prompt_ids(ids.unsqueeze(0), meta["image_token_id"], meta["vocab_size"])[0]
    with torch.no_grad():
        ref_logits = model.model(ids.unsqueeze(0), torch.arange(ids.numel()).unsqueeze(0), images=pixels,
                                 runtime_gather_output=True)[0, -1, : meta["vocab_size"]]
    ref_text = model.generate([pixels[0]], [prompt], max_new_tokens=args.max_new_tokens,
                              stop_token_ids=meta["stop_token_ids"], stop_strings=meta["stop_strings"])[0]

    from tensorrt_llm.runtime import ModelRunner

    runner = ModelRunner.from_dir(os.path.join(engines, "llm"))
    end_id = meta["stop_token_ids"][0] if meta["stop_token_ids"] else model.tokenizer.eos_token_id
    out = runner.generate([fake.to(torch.int32)], max_new_tokens=args.max_new_tokens, end_id=end_id,
                          pad_id=model.tokenizer.pad_token_id or end_id, prompt_table=prompt_table(feats).unsqueeze(0),
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
