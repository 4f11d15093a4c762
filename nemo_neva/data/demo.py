"""The shipped demo: shapes data + a tokenizer trained on its text and on every template's markup."""
from __future__ import annotations

import json

from nemo_neva.data.constants import IMAGE_TOKEN
from nemo_neva.data.conversation import (STEERLM_ATTRIBUTES, TEMPLATE_NAMES, render)
from nemo_neva.data.shapes import make_shapes_dataset
from nemo_neva.data.tokenizer import train_demo_tokenizer


def demo_corpus(paths: dict) -> list[str]:
    """Every text the demo can feed the tokenizer: data, eval questions, template scaffolding."""
    texts = []
    for key in ("stage1", "stage2"):
        with open(paths[key], encoding="utf-8") as f:
            for rec in json.load(f):
                texts += [t["value"].replace(IMAGE_TOKEN, "") for t in rec["conversations"]]
    with open(paths["eval"], encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            texts += [rec["question"], *rec["answers"]]
    example = [{"from": "human", "value": "question"}, {"from": "gpt", "value": "answer"}] * 2
    for name in TEMPLATE_NAMES:
        texts.append("".join(t for t, _ in render(name, example, system=None)))
        texts.append("".join(t for t, _ in render(name, example, system="You are a helpful assistant.")))
    texts += [",".join(f"{a}:{v}" for a in STEERLM_ATTRIBUTES) for v in range(10)]
    return texts


def make_demo(data_dir: str, tokenizer_dir: str, n_train: int = 300, n_eval: int = 60, seed: int = 0,
              vocab_size: int = 1024, image_size: int = 32) -> dict:
    paths = make_shapes_dataset(data_dir, n_train, n_eval, seed, image_size)
    train_demo_tokenizer(demo_corpus(paths), tokenizer_dir, vocab_size)
    return dict(paths, tokenizer=tokenizer_dir)
