"""The GPU check (`scripts/gpu_check.sh` runs it): everything a GPU user needs to trust this package on their
machine, in one process, ending with one summary table (scripts/gpu_check_report.py says what passes).

    python scripts/gpu_check.py [--dry-run] [--out DIR] [--steps 20]

On CUDA, bf16, a LLaMA-style LM (8 layers, hidden 1024, GQA) with a 224-pixel CLIP tower, on the shipped
shapes demo data:
  pretrain / finetune  {local spec, TE spec, TE spec + FP8 (hybrid, delayed scaling)}: `--steps` optimizer steps
                       each (the LM learns in both stages, so its GEMMs run backward, FP8 ones included);
                       losses finite and falling; tokens/s, MFU (nemo_neva.perf.mfu) and peak memory.
                       TE rows are SKIP when transformer_engine does not import.
  fp8 vs bf16          FP8's last losses within FP8_REL_TOL of bf16's on the same spec, seed and batches.
  generate             the finetuned .nemo saved, restored and asked 4 questions of different prompt lengths
                       in one batch: the answers equal asking one by one (greedy, fp32, TF32 off).
  hf export            the .nemo exported as a HF LLaVA folder and loaded with transformers on the same device:
                       logits within EXPORT_ATOL of the .nemo's (fp32, TF32 off).
`--dry-run`: the same on CPU with the shipped tiny sizes (2 layers, hidden 64, a 32-pixel tower).
Exit status 1 when a row FAILs. Logs go to stderr, the table to stdout, and DIR/summary.json.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from gpu_check_report import Row, Run, export_row, failed, fp8_row, generation_row, table, training_row  # noqa: E402

log = logging.getLogger("gpu_check")

LLAMA_STYLE = {"position_embedding_type": "rope", "normalization": "RMSNorm", "activation": "swiglu",
               "bias": False}
# Dims FP8 GEMMs take (multiples of 16), 8 layers: big enough that the GEMMs dominate a step on an H100.
GPU_SIZES = {"num_layers": 8, "hidden_size": 1024, "ffn_hidden_size": 2816, "num_attention_heads": 16,
             "num_query_groups": 4, "encoder_seq_length": 512, "micro_batch_size": 8, "global_batch_size": 16}
GPU_TOWER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 4, "num_attention_heads": 12,
             "image_size": 224, "patch_size": 14}
DRY_SIZES = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
             "num_query_groups": 2, "encoder_seq_length": 128, "micro_batch_size": 4, "global_batch_size": 8}
VARIANTS = {"local bf16": {}, "TE bf16": {"transformer_engine": True},
            "TE fp8": {"transformer_engine": True, "fp8": "hybrid"}}
# Questions of different lengths (the batch is left-padded to the longest).
QUESTIONS = ["Shape?", "What colour is the shape on the right? Answer with one word.",
             "Describe the image briefly.",
             "Look at every shape in the picture and say which colours and shapes you see, and where they are."]
IMAGES = ["train_00000.png", "train_00001.png", "train_00002.png", "train_00003.png"]


def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _te_missing() -> str:
    """Why the TE rows cannot run ('' when they can)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001  (any import failure means the same: no TE rows)
        return f"transformer_engine does not import ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
    return ""


def environment_row() -> Row:
    import importlib.metadata as md
    import platform

    import torch

    dev = _device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    versions = []
    for dist in ("megatron-core", "nemo_toolkit", "transformers", "lightning", "transformer_engine"):
        try:
            versions.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            versions.append(f"{dist} -")
    import nemo_neva

    where = os.path.dirname(os.path.dirname(nemo_neva.__file__))
    return Row("environment", "INFO", f"{name}; Python {platform.python_version()}, torch {torch.__version__} "
                                      f"(CUDA {torch.version.cuda}); {', '.join(versions)}; nemo_neva from {where}")


class _Recorder:
    """Per optimizer step: what the model logged (train_loss, tokens_per_sec, mfu, peak_mem_gib)."""

    def __new__(cls, run: Run):
        import lightning.pytorch as pl

        class Recorder(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                m = trainer.callback_metrics
                value = lambda k: float(m[k]) if k in m else None  # noqa: E731
                run.losses.append(value("train_loss"))
                for key, seq in (("tokens_per_sec", run.tokens_per_sec), ("mfu", run.mfu),
                                 ("model_tflops_per_sec", run.tflops)):
                    if value(key) is not None:
                        seq.append(value(key))
                if value("peak_mem_gib") is not None:
                    run.peak_mem_gib = value("peak_mem_gib")

        return Recorder()


def _model_overrides(dry_run: bool, variant: dict) -> dict:
    sizes = DRY_SIZES if dry_run else GPU_SIZES
    return {**sizes, **LLAMA_STYLE, "transformer_engine": False, "fp8": None, **variant}


def train(stage: str, variant_name: str, out: str, steps: int, dry_run: bool, restore: str = None):
    """One `stage` (pretrain | finetune) run; returns (Run, path of the .nemo it wrote)."""
    from omegaconf import open_dict

    from nemo_neva import MegatronNevaModel, build_model
    from nemo_neva.cli import shipped_config
    from nemo_neva.models.finetune_config import finetune_config
    from nemo_neva.training.trainer import build_trainer

    cfg = shipped_config(f"neva_{stage}")
    dev = _device()
    with open_dict(cfg):
        cfg.trainer.update(max_steps=steps, precision="bf16-true", devices=1, log_every_n_steps=1,
                           accelerator="gpu" if dev.type == "cuda" else "cpu", enable_progress_bar=False,
                           enable_model_summary=False)
        model = cfg.model
        model.update(_model_overrides(dry_run, VARIANTS[variant_name]))
        model.optim.sched.max_steps = steps
        if stage == "pretrain":
            model.mm_cfg.llm.freeze = False  # the LM learns: its GEMMs run backward (FP8 weight gradients too)
            if not dry_run:
                model.mm_cfg.vision_encoder.config.update(GPU_TOWER)
    if stage == "finetune":  # the architecture comes from the pretrain .nemo; sizes given again must agree
        model = finetune_config(restore, cfg.model)
        with open_dict(cfg):
            cfg.model = model
    run = Run(f"{stage} {variant_name}")
    trainer = build_trainer(cfg)
    trainer.callbacks.append(_Recorder(run))
    if stage == "pretrain":
        neva = build_model(cfg.model, trainer=trainer)
    else:
        neva = MegatronNevaModel.restore_from(restore, override_config_path=cfg.model, trainer=trainer)
    trainer.fit(neva)
    path = os.path.join(out, f"{stage}_{variant_name.replace(' ', '_')}.nemo")
    neva.save_to(path)
    del neva, trainer
    _free()
    return run, path


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def _exact_fp32():
    """fp32 matmuls without TF32, for the comparisons."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _restore(nemo: str):
    """The .nemo in fp32 on the check's device."""
    from nemo_neva import MegatronNevaModel

    model = MegatronNevaModel.restore_from(nemo, map_location=_device())
    return model.to(_device()).eval()


def _demo_images():
    from PIL import Image

    return [Image.open(os.path.join(ROOT, "data", "shapes_demo", "images", f)).convert("RGB") for f in IMAGES]


def generation(name: str, nemo: str) -> Row:
    from nemo_neva.inference.generate import encode_prompt
    from nemo_neva.inference.prompting import build_prompt, stop_markers

    model = _restore(nemo)
    template = model.cfg.data.conv_template
    prompts = [build_prompt(template, q, True, tokenizer=model.tokenizer) for q in QUESTIONS]
    images = _demo_images()
    stop_ids, stop_strings = stop_markers(model.tokenizer, template)
    opts = dict(max_new_tokens=12, stop_token_ids=sorted(stop_ids), stop_strings=stop_strings)
    with _exact_fp32():
        lengths = [len(encode_prompt(model, p, im)) for p, im in zip(prompts, images)]
        batched = model.generate(images, prompts, **opts)
        single = [model.generate([im], [p], **opts)[0] for im, p in zip(images, prompts)]
    del model
    _free()
    return generation_row(name, batched, single, lengths)


def hf_export(name: str, nemo: str, out: str) -> Row:
    import torch
    from transformers import LlavaForConditionalGeneration

    from nemo_neva.export.hf import export_nemo_to_hf
    from nemo_neva.inference.generate import encode_prompt
    from nemo_neva.inference.prompting import build_prompt

    folder = export_nemo_to_hf(nemo, os.path.join(out, "hf_export"), "float32")
    model = _restore(nemo)
    dev = _device()
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
    image = _demo_images()[0]
    prompt = build_prompt(model.cfg.data.conv_template, QUESTIONS[1], True, tokenizer=model.tokenizer)
    ids = encode_prompt(model, prompt, image)[None].to(dev)
    pixels = model.preprocess_images([image]).to(dev, torch.float32)
    pos = torch.arange(ids.shape[1], device=dev)[None]
    with _exact_fp32(), torch.no_grad():
        ours = model.model(ids, pos, images=pixels, runtime_gather_output=True)[..., :len(model.tokenizer)]
        theirs = hf(input_ids=ids, pixel_values=pixels).logits[..., :len(model.tokenizer)]
    diff = float((ours.float() - theirs.float()).abs().max())
    del model, hf
    _free()
    return export_row(name, diff)


def _attempt(rows: list, name: str, fn, *args):
    """Run one check; an exception is a FAIL row with its last line (the traceback goes to the log)."""
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as err:  # noqa: BLE001  (a failing check must not hide the others)
        log.error("%s failed:\n%s", name, traceback.format_exc())
        rows.append(Row(name, "FAIL", f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200] if str(err).strip() else ''}"))
        _free()
        return None
    log.info("%s: %.1f s", name, time.perf_counter() - start)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (what the test suite runs)")
    ap.add_argument("--out", default=None, help="folder for the .nemo files, the HF export and summary.json "
                                               "(default: a new temporary folder)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each training run")
    ap.add_argument("--skip-te", action="store_true", help="leave out the TE / FP8 rows even where TE imports")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    import tempfile

    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run with --dry-run to "
              "check the CPU path", file=sys.stderr)
        return 2
    out = a.out or tempfile.mkdtemp(prefix="neva_gpu_check.")
    os.makedirs(out, exist_ok=True)
    os.chdir(ROOT)  # the shipped configs name data/... relative to the checkout
    with contextlib.redirect_stdout(sys.stderr):  # NeMo logs to stdout: only the table goes there
        rows = _checks(a, out)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump([r.__dict__ for r in rows], f, indent=1)
    print(table(rows), flush=True)
    return 1 if failed(rows) else 0


def _checks(a, out: str) -> list:
    start = time.perf_counter()
    rows = [environment_row()]
    te_reason = "--skip-te" if a.skip_te else _te_missing()
    runs = {}
    for variant in VARIANTS:
        if variant.startswith("TE") and te_reason:
            rows += [Row(f"{stage} {variant}", "SKIP", te_reason) for stage in ("pretrain", "finetune")]
            continue
        done = _attempt(rows, f"pretrain {variant}", train, "pretrain", variant, out, a.steps, a.dry_run)
        if done is None:
            rows.append(Row(f"finetune {variant}", "SKIP", "no pretrain .nemo"))
            continue
        runs["pretrain", variant], pre_nemo = done
        rows.append(training_row(runs["pretrain", variant], a.steps))
        done = _attempt(rows, f"finetune {variant}", train, "finetune", variant, out, a.steps, a.dry_run, pre_nemo)
        if done is None:
            continue
        runs["finetune", variant], runs["nemo", variant] = done
        rows.append(training_row(runs["finetune", variant], a.steps))
    for stage in ("pretrain", "finetune"):
        if (stage, "TE fp8") in runs and (stage, "TE bf16") in runs:
            rows.append(fp8_row(f"{stage} fp8 vs bf16", runs[stage, "TE fp8"], runs[stage, "TE bf16"]))
    for variant in ("local bf16", "TE bf16"):
        if ("nemo", variant) in runs:
            row = _attempt(rows, f"generate {variant}", generation, f"generate {variant}", runs["nemo", variant])
            if row is not None:
                rows.append(row)
    if ("nemo", "local bf16") in runs:
        row = _attempt(rows, "hf export", hf_export, "hf export vs .nemo", runs["nemo", "local bf16"], out)
        if row is not None:
            rows.append(row)
    else:
        rows.append(Row("hf export vs .nemo", "SKIP", "no finetuned .nemo"))
    rows.append(Row("total", "INFO", f"{time.perf_counter() - start:.0f} s; files in {out}"))
    return rows


if __name__ == "__main__":  # the guard matters: checkpoint saving starts worker processes
    sys.exit(main())
