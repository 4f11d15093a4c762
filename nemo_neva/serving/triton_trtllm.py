"""GPU backend of the Triton model: the TensorRT vision engine + the TensorRT-LLM engine, fed the image features
through the prompt table (`trt_engine_dir=` in conf/neva_triton.yaml).

It reads only the export folder of `scripts/export_to_trtllm.py --build` (nemo_neva_export.json, tokenizer/,
vision/ image processor, engines/llm, engines/vision.engine): no .nemo, no PyTorch model. The request contract
(inputs, checks, batching) is `NevaTritonModel`'s, as with the PyTorch backend. Where TensorRT-LLM or TensorRT
is not installed it is refused at start-up with a clear message. See docs/TRTLLM.md for the prompt table.
Pixels are made as the .nemo model makes them (the export's processor and image_aspect_ratio). A tiled export
(anyres) sizes each prompt by its images' sizes (`Tiling.tokens`), runs every image's own tiles through the vision
engine and packs them with vision/image_newline.safetensors (`trtllm_prompt.tiled_prompt_table`).

Not runnable on the CPU machines of this project; `scripts/trtllm_gpu_check.sh` drives it on a GPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional

import torch

from nemo_neva.serving.errors import RequestError

META_FILE = "nemo_neva_export.json"  # nemo_neva.export.trtllm.META_FILE (not imported: it pulls the exporters)
ENGINES_DIR = "engines"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_tensorrt_llm(export_dir: str) -> None:
    missing = [m for m in ("tensorrt_llm", "tensorrt") if not _installed(m)]
    if missing:
        raise ValueError(f"trt_engine_dir={export_dir} runs TensorRT engines, which needs "
                         f"{' and '.join(missing)} (not installed in this environment; TensorRT-LLM needs an "
                         "NVIDIA GPU). Serve the .nemo with PyTorch instead: neva_model_file=M.nemo")
    if not torch.cuda.is_available():
        raise ValueError(f"trt_engine_dir={export_dir}: the TensorRT engines need a CUDA GPU; none is visible")


class VisionEngine:
    """engines/vision.engine, deserialized once: pixel values [n, 3, H, W] -> features [n, tokens, hidden]."""

    def __init__(self, path: str, input_name: str, output_name: str):
        import tensorrt as trt

        with open(path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT could not load this engine (built with another TensorRT?)")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name
        try:  # the batch range of the build's optimisation profile
            self.max_batch = int(self.engine.get_tensor_profile_shape(input_name, 0)[2][0])
        except Exception:
            self.max_batch = 1

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in torch.split(pixels, max(1, self.max_batch)):
            x = chunk.cuda().float().contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32,
                              device="cuda")
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("vision engine execution failed")
            stream.synchronize()
            outs.append(out)
        return torch.cat(outs)


def _refuse_tensor_parallel(export_dir: str, meta: dict) -> None:
    tp = int(meta.get("tp_size", 1))
    if tp > 1:  # a TP engine needs one process per rank under MPI; this backend is one process
        raise ValueError(f"{export_dir}: the engines were built for tp_size={tp}, but this Triton backend runs one "
                         "process without MPI: export with --tp-size 1 (or serve TP engines with TensorRT-LLM's own "
                         "Triton backend under mpirun)")


def _max_positions(export_dir: str, meta: dict) -> int:
    """The exported LM's `max_position_embeddings` (its .nemo's encoder_seq_length), from the checkpoint config."""
    with open(os.path.join(export_dir, meta.get("llm_checkpoint", "llm"), "config.json")) as f:
        return int(json.load(f)["max_position_embeddings"])


class TrtllmBackend:
    name = "tensorrt-llm"

    def __init__(self, export_dir: str, meta: dict, tokenizer, processor, vision: VisionEngine, runner,
                 image_newline: Optional[torch.Tensor] = None):
        from nemo_neva.data.image_io import check_aspect_ratio
        from nemo_neva.data.processor import NevaProcessor
        from nemo_neva.export.trtllm_prompt import export_tiling

        _refuse_tensor_parallel(export_dir, meta)
        self.export_dir, self.meta = export_dir, meta
        self.tokenizer, self.processor, self.vision, self.runner = tokenizer, processor, vision, runner
        self.aspect_ratio = check_aspect_ratio(meta.get("image_aspect_ratio"))
        self.tiling, self.image_newline = export_tiling(meta), image_newline
        if self.tiling is not None and image_newline is None:
            raise ValueError(f"{export_dir}: a tiled export (image_tiling in {META_FILE}) needs its image_newline")
        self.template = meta["conv_template"]
        self.stop_ids = [int(i) for i in meta["stop_token_ids"]] or [int(tokenizer.eos_token_id)]
        self.stop_strings = list(meta.get("stop_strings") or [])
        self.vocab_size = int(meta["vocab_size"])
        self.max_batch_size = int(getattr(runner, "max_batch_size", 1) or 1)
        self.max_input_len = getattr(runner, "max_input_len", None)
        # the engine's max_seq_len, never past the model's positions (a learned table has no rows beyond them)
        self.context = min(int(getattr(runner, "max_seq_len", None) or getattr(runner, "max_sequence_length")),
                           _max_positions(export_dir, meta))
        # prompts are encoded and counted as the .nemo model's processor does it (a tiled one: by image size);
        # pixels come from the export's own image processor (`_pixels`)
        # (only its encoding is used: a tiled export's processor makes tiles already, `_prompt_table`)
        per_image = meta["tokens_per_image"] if self.tiling is None else self.tiling.base_tokens  # one tile's
        self.prompt_processor = NevaProcessor(tokenizer, processor, int(per_image),
                                              image_aspect_ratio=self.aspect_ratio, tiling=self.tiling)
        self.image_token_id = int(meta["image_token_id"])
        if self.prompt_processor.image_token_id != self.image_token_id:
            raise ValueError(f"{export_dir}: image_token_id {self.image_token_id} in {META_FILE} is not the "
                             f"tokenizer's <image> id {self.prompt_processor.image_token_id}: re-export the model")

    @classmethod
    def from_export_dir(cls, export_dir: str) -> "TrtllmBackend":
        require_tensorrt_llm(export_dir)
        meta_path = os.path.join(export_dir, META_FILE)
        engines = os.path.join(export_dir, ENGINES_DIR)
        for path in (meta_path, os.path.join(engines, "llm"), os.path.join(engines, "vision.engine")):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: trt_engine_dir must be a folder written by "
                                        "scripts/export_to_trtllm.py --build with both engines built")
        with open(meta_path) as f:
            meta = json.load(f)
        _refuse_tensor_parallel(export_dir, meta)  # before ModelRunner loads rank 0 of a TP engine alone
        from tensorrt_llm.runtime import ModelRunner

        vision = VisionEngine(os.path.join(engines, "vision.engine"), meta["vision_input"], meta["vision_output"])
        runner = ModelRunner.from_dir(os.path.join(engines, "llm"))
        return cls.from_files(export_dir, vision, runner)

    @classmethod
    def from_files(cls, export_dir: str, vision, runner) -> "TrtllmBackend":
        """The export folder's meta, tokenizer, image processor (and a tiled export's image_newline) around the
        given engines: `vision` (pixel values -> features) and `runner` (ModelRunner's `generate`)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        from nemo_neva.export.trtllm_prompt import load_image_newline

        with open(os.path.join(export_dir, META_FILE)) as f:
            meta = json.load(f)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(export_dir, meta.get("tokenizer", "tokenizer")))
        processor = AutoImageProcessor.from_pretrained(os.path.join(export_dir, meta["image_processor"]))
        newline = load_image_newline(export_dir, meta) if meta.get("image_tiling") else None
        return cls(export_dir, meta, tokenizer, processor, vision, runner, newline)

    # ------------------------------------------------------------------------------------------ contract
    def _ids(self, prompt: str, images) -> torch.Tensor:
        return self.prompt_processor.encode(prompt, images)

    def prompt_tokens(self, prompt: str, images) -> int:
        """`images`: the prompt's images (a list) or their count."""
        return self._checked(self._ids(prompt, images)).numel()

    def _checked(self, ids: torch.Tensor) -> torch.Tensor:
        n = int(ids.numel())
        if self.max_input_len is not None and n > int(self.max_input_len):
            raise RequestError(f"the prompt is {n} tokens; the engine was built for at most {self.max_input_len} "
                               "(--max-input-len of scripts/export_to_trtllm.py --build)", "input_text",
                               code="context_length_exceeded")
        return ids

    def prepare(self, prompt: str, images: list):
        """((the prompt's ids, its images), its tokens): encoded once, here; `generate` runs those ids."""
        ids = self._checked(self._ids(prompt, images))
        return (ids, list(images)), int(ids.numel())

    def generate(self, rows: list, s) -> list[str]:
        """`rows`: `prepare`'s (ids, images in `<image>` order) of each prompt."""
        out = []
        for start in range(0, len(rows), self.max_batch_size):
            out += self._generate(rows[start:start + self.max_batch_size], s)
        return out

    def _prompt_table(self, images: list) -> torch.Tensor:
        """PIL images (the batch's, row by row, each row's in tag order) -> their prompt-table rows, in order."""
        from nemo_neva.data.image_io import preprocess
        from nemo_neva.export.trtllm_prompt import image_tiles, prompt_table, tiled_prompt_table
        from nemo_neva.modules.tiling import image_size_of

        pixels = preprocess(images, self.processor, self.aspect_ratio, self.tiling)
        if self.tiling is None:
            return prompt_table(self.vision(pixels))  # features [n_images, tokens_per_image, hidden]
        sizes = [image_size_of(im) for im in images]
        feats = self.vision(image_tiles(pixels, sizes, self.tiling))  # every image's own tiles, in order
        return tiled_prompt_table(feats, sizes, self.tiling, self.image_newline)

    def _generate(self, encoded: list, s) -> list[str]:
        from nemo_neva.export.trtllm_prompt import fake_prompt_ids

        rows, images = [ids for ids, _ in encoded], [im for _, im in encoded]
        table, tasks = None, None
        flat = [im for row_images in images for im in row_images]  # row by row, each row's in tag order
        if flat:
            table = self._prompt_table(flat)
            # The Python session takes one table for the whole batch: row b's fake ids continue after the
            # image positions of the rows before it (nemo_neva.export.trtllm_prompt).
            offset = 0
            for b in range(len(rows)):
                fake = fake_prompt_ids(rows[b].unsqueeze(0), self.image_token_id, self.vocab_size)[0]
                n_img = int((rows[b] == self.image_token_id).sum())
                rows[b] = torch.where(fake >= self.vocab_size, fake + offset, fake)
                offset += n_img
            table = table.unsqueeze(0)
            tasks = ",".join("0" for _ in rows)
        greedy = s.temperature == 0.0
        seed = s.seed if s.seed is not None else int(torch.randint(0, 2 ** 62, (1,)))
        result = self.runner.generate(
            [r.to(torch.int32) for r in rows], max_new_tokens=s.max_new_tokens, end_id=self.stop_ids[0],
            pad_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0],
            temperature=1.0 if greedy else s.temperature, top_k=1 if greedy else s.top_k,
            top_p=0.0 if greedy else s.top_p, repetition_penalty=s.repetition_penalty, random_seed=seed,
            prompt_table=table, prompt_tasks=tasks, return_dict=True, output_sequence_lengths=True)
        torch.cuda.synchronize()
        ids, lengths = result["output_ids"], result["sequence_lengths"]
        answers = []
        for b, row in enumerate(rows):
            tokens = ids[b, 0, row.numel():int(lengths[b, 0])].tolist()
            stop = next((i for i, t in enumerate(tokens) if t in self.stop_ids), len(tokens))
            answers.append(self._text(tokens[:stop]))
        return answers

    def _text(self, tokens: list) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut: Optional[int] = None
        for marker in self.stop_strings:
            at = text.find(marker)
            if at >= 0 and (cut is None or at < cut):
                cut = at
        return (text if cut is None else text[:cut]).strip()
