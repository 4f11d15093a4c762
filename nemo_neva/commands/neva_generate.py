"""Answer questions about images with a .nemo NeVA model.

    neva-generate neva_model_file=M.nemo image_path=img.png prompt="What colour is it?"
    neva-generate neva_model_file=M.nemo video_path=clip.mp4 prompt="Which way does it move?"
    neva-generate neva_model_file=M.nemo prompts_file=in.jsonl output_file=out.jsonl

Only answers go to stdout (one line per answer; logs, NeMo's included, go to stderr), so
`answer=$(neva-generate ...)` is the answer.

prompts_file lines: {"image": "relative/to/the/jsonl.png", "prompt": "..."} ("image" optional; or "video":
a video file, whose frames are sampled as video.num_frames / video.sampling, default: the model's). The output
has one line per input line, in order, with the input fields and "answer" -- or "error" for a line that
could not be used (bad JSON, missing prompt, unreadable image, too long); such lines are logged and counted.
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import contextlib
import json
import logging
import os
import sys

from nemo.core.config import hydra_runner
from omegaconf import OmegaConf

from nemo_neva import MegatronNevaModel
from nemo_neva.cli import CONF_DIR, user_errors
from nemo_neva.data.image_io import open_user_image
from nemo_neva.data.video_io import open_video, video_settings_of
from nemo_neva.inference.generation_config import GenerationConfig
from nemo_neva.inference.prompting import build_prompt, stop_markers
from nemo_neva.inference.prompts_file import PromptRequest, Skipped, read_prompts_file

log = logging.getLogger("neva_generate")


def _check_options(cfg):
    """Everything that can be checked without the model, before loading it."""
    if not cfg.neva_model_file:
        raise ValueError("neva_model_file=... is required")
    if not cfg.prompts_file and not cfg.prompt:
        raise ValueError("give prompt=... (with image_path=... or video_path=...) or prompts_file=...")
    if cfg.get("image_path") and cfg.get("video_path"):
        raise ValueError("give image_path=... or video_path=..., not both")
    video = cfg.get("video") or {}
    video_settings_of(None, video.get("num_frames"), video.get("sampling"))  # validates set values
    inf = cfg.inference
    if not isinstance(inf.batch_size, int) or inf.batch_size < 1:
        raise ValueError(f"inference.batch_size must be an integer >= 1, got {inf.batch_size}")
    # sampling and stop settings are checked as they are made; the context check needs the model (per request)
    return GenerationConfig(max_new_tokens=inf.tokens_to_generate, temperature=inf.temperature, top_k=inf.top_k,
                            top_p=inf.top_p, seed=inf.seed, repetition_penalty=inf.repetition_penalty,
                            stop_strings=tuple(inf.stop_strings or ()), compile_decode=bool(inf.get("compile", False)))


class _Generator:
    def __init__(self, cfg, config: GenerationConfig):
        self.model = MegatronNevaModel.restore_from(cfg.neva_model_file)
        self.template = cfg.conv_template or self.model.cfg.data.conv_template
        video = cfg.get("video") or {}
        self.video = video_settings_of(self.model.cfg, video.get("num_frames"), video.get("sampling"))
        stop_ids, stop_strings = stop_markers(self.model.tokenizer, self.template)  # the template's end marker
        inf = cfg.inference
        self.steerlm = OmegaConf.to_container(inf.steerlm, resolve=True) if inf.get("steerlm") else None
        self.config = config.replace(stop_token_ids=tuple(sorted(stop_ids)),
                                     stop_strings=(*stop_strings, *config.stop_strings))

    def prepare(self, question: str, image_path, video_path=None):
        """The request as the model takes it (`NevaInputs`: encoded, context-checked by the model's processor);
        raises ValueError (incl. image and video errors) for an unusable request."""
        # Byte and pixel limits before decoding; truncated/malformed files end with a clear message.
        image = open_user_image(image_path) if image_path else None
        video = open_video(video_path, self.video) if video_path else None
        prompt = build_prompt(self.template, question, image is not None, steerlm=self.steerlm,
                              has_video=video is not None)
        media = [m for m in (image, video) if m is not None]
        return self.model.processor(prompt, media, self.config.max_new_tokens, budget="tokens_to_generate")

    def answer(self, inputs):
        return self.model.generate([None] * len(inputs), inputs, self.config)


def _answer_file(gen: _Generator, cfg):
    entries = read_prompts_file(cfg.prompts_file)
    rows, skipped = [], 0
    batch = cfg.inference.batch_size
    for start in range(0, len(entries), batch):
        chunk, ready = [], []
        for entry in entries[start:start + batch]:
            if isinstance(entry, PromptRequest):
                try:
                    ready.append((len(chunk), gen.prepare(entry.prompt, entry.image_path, entry.video_path)))
                    entry = {**entry.record}
                except ValueError as err:  # ImageError (and VideoError, one) is a ValueError
                    entry = Skipped(entry.line, str(err), entry.record)
            if isinstance(entry, Skipped):
                log.warning("%s line %d skipped: %s", cfg.prompts_file, entry.line, entry.reason)
                skipped += 1
                entry = {**entry.record, "line": entry.line, "error": entry.reason}
            chunk.append(entry)
        if ready:
            answers = gen.answer([r[1] for r in ready])
            for (slot, _), answer in zip(ready, answers):
                chunk[slot]["answer"] = answer
        rows += chunk
    log.info("%d of %d lines answered, %d skipped", len(rows) - skipped, len(rows), skipped)
    if rows and skipped == len(rows):
        raise ValueError(f"no usable line in prompts_file={cfg.prompts_file} ({skipped} skipped, see the log)")
    return rows


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 points at stderr inside: logging handlers hold their own reference to the stdout
    stream (NeMo's do), so only redirecting the descriptor keeps every log line off stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _rows(cfg):
    gen = _Generator(cfg, _check_options(cfg))
    if cfg.prompts_file:
        return _answer_file(gen, cfg)
    inputs = gen.prepare(cfg.prompt, cfg.image_path, cfg.get("video_path"))
    source = {"video": cfg.video_path} if cfg.get("video_path") else {"image": cfg.image_path}
    return [{**source, "prompt": cfg.prompt, "answer": gen.answer([inputs])[0]}]


@hydra_runner(config_path=CONF_DIR, config_name="neva_inference")
@user_errors
def main(cfg) -> None:
    with _stdout_to_stderr():
        rows = _rows(cfg)
    if cfg.output_file:
        with open(cfg.output_file, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        for row in rows:
            print(row.get("answer", f"[skipped line {row.get('line')}: {row.get('error')}]"))


if __name__ == "__main__":
    main()
