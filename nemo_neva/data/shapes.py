"""Synthetic "coloured shapes" task: tiny images with known answers, generated from a seed.

Small enough to learn on CPU in minutes, rich enough that a model must look at the image: colour,
shape, position and count questions have a single right answer that only the pixels reveal.
"""
from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
           "yellow": (230, 200, 20), "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle")
# Single shapes sit in one half; several shapes take distinct halves (so "left" stays unambiguous).
POSITIONS = ("left", "right", "top", "bottom")
_CONFLICT = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUND = (245, 245, 245)

TEXT_ONLY = [
    ("What colours can the shapes have?", "red, green, blue, yellow or purple"),
    ("Which shapes can appear in the pictures?", "circles, squares and triangles"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("Is a circle round?", "yes"),
]


WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def _centre(position: str, size: int) -> tuple[float, float]:
    # Centres at 20%/80%: neighbours (e.g. right + bottom) are 0.3*size apart on both axes, so shapes
    # of radius 0.14*size never touch.
    a, b, h = size * 0.2, size * 0.8, size / 2
    return {"left": (a, h), "right": (b, h), "top": (h, a), "bottom": (h, b)}[position]


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, position: str, size: int) -> None:
    cx, cy = _centre(position, size)
    r = size * 0.14
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


SCENE_SIZE_WEIGHTS = (6, 3, 1)  # how often a scene has 1, 2 or 3 shapes


def random_scene(rng: random.Random, size_weights=SCENE_SIZE_WEIGHTS) -> list[dict]:
    """1 shape most of the time, otherwise 2-3 in positions that never face each other twice."""
    count = rng.choices([1, 2, 3], weights=size_weights)[0]
    scene, used = [], set()
    for _ in range(count):
        free = [p for p in POSITIONS if p not in used and _CONFLICT[p] not in used] or \
               [p for p in POSITIONS if p not in used]
        pos = rng.choice(free)
        used.add(pos)
        scene.append({"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "position": pos})
    return scene


def render_scene(scene: list[dict], size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene:
        _draw(draw, obj["shape"], obj["colour"], obj["position"], size)
    return img


def _phrase(obj: dict) -> str:
    return f"a {obj['colour']} {obj['shape']} {WHERE[obj['position']]}"


def caption(scene: list[dict]) -> str:
    return " and ".join(_phrase(o) for o in scene)


def questions(scene: list[dict], rng: random.Random) -> list[tuple[str, list[str], str]]:
    """(question, accepted answers (first = canonical reply), category) about one scene."""
    obj = rng.choice(scene)
    where = WHERE[obj["position"]]
    n = len(scene)
    qa = [
        (f"What colour is the shape {where}? Answer with one word.", [obj["colour"]], "colour"),
        (f"What shape is {where}? Answer with one word.", [obj["shape"]], "shape"),
        ("How many shapes are there? Answer with a number.", [str(n), NUMBER_WORDS[n]], "count"),
    ]
    # Position is only well-defined when the colour+shape pair is unique in the scene.
    if sum(o["colour"] == obj["colour"] and o["shape"] == obj["shape"] for o in scene) == 1:
        qa.append((f"Where is the {obj['colour']} {obj['shape']}? Answer with one word.",
                   [obj["position"], where], "position"))
    rng.shuffle(qa)
    return qa


TWO_IMAGE_PREFIX = "<image>\n<image>\n"  # the first tag takes the first image, the second the second


def two_image_questions(first: list[dict], second: list[dict], rng: random.Random) -> list[tuple[str, list[str], str]]:
    """(question, accepted answers, category) about a pair of scenes, only those with one right answer:
    which image has more shapes (counts differ), the colour of the shape in an image that has one."""
    qa = []
    if len(first) != len(second):
        more = "first" if len(first) > len(second) else "second"
        qa.append(("Which image has more shapes? Answer first or second.", [more], "more_shapes"))
    for which, scene in (("first", first), ("second", second)):
        if len(scene) == 1:
            qa.append((f"What colour is the shape in the {which} image? Answer with one word.",
                       [scene[0]["colour"]], "colour_in_image"))
    rng.shuffle(qa)
    return qa


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def make_shapes_dataset(out_dir: str, n_train: int, n_eval: int, seed: int = 0,
                        image_size: int = 32, train_size_weights=SCENE_SIZE_WEIGHTS, n_two_image: int = 0) -> dict:
    """Write images/ + stage1_captions.json + stage2_instruct.json + eval.jsonl; return their paths.

    `train_size_weights`: how often a training scene has 1, 2 or 3 shapes (more multi-shape scenes teach
    which colour sits where, the hard part); eval scenes always use SCENE_SIZE_WEIGHTS.
    `n_two_image` (default 0: the outputs are exactly those without it): that many two-image samples
    (`"image": [first, second]`, `two_image_questions`) appended to stage 2, and as many held-out pairs in
    eval_two_image.jsonl; drawn from their own random stream, so the single-image samples do not change.
    """
    rng = random.Random(seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    stage1, stage2, evals = [], [], []

    def new_image(name: str, size_weights=SCENE_SIZE_WEIGHTS) -> tuple[str, list[dict]]:
        scene = random_scene(rng, size_weights)
        render_scene(scene, image_size).save(os.path.join(img_dir, name), format="PNG")
        return name, scene

    for i in range(n_train):
        name, scene = new_image(f"train_{i:05d}.png", train_size_weights)
        stage1.append({"id": f"cap_{i:05d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}]})
        qa = questions(scene, rng)[: rng.randint(1, 3)]
        if rng.random() < 0.25:  # some samples also ask for a description, as LLaVA's mixture does
            qa.insert(0, ("Describe the image briefly.", [caption(scene)], "caption"))
            qa = qa[:3]
        turns = []
        for k, (q, answers, _) in enumerate(qa):
            turns += [{"from": "human", "value": ("<image>\n" + q) if k == 0 else q},
                      {"from": "gpt", "value": answers[0]}]
        stage2.append({"id": f"inst_{i:05d}", "image": name, "conversations": turns})
        if i % 25 == 24:  # a few text-only samples: the pipeline must handle samples without an image
            q, a = TEXT_ONLY[(i // 25) % len(TEXT_ONLY)]
            stage2.append({"id": f"text_{i:05d}", "conversations": [
                {"from": "human", "value": q}, {"from": "gpt", "value": a}]})

    for i in range(n_eval):
        name, scene = new_image(f"eval_{i:05d}.png")
        q, answers, cat = questions(scene, rng)[0]
        evals.append({"id": f"eval_{i:05d}", "image": name, "question": q, "answers": answers,
                      "category": cat})

    paths = {"image_folder": img_dir,
             "stage1": os.path.join(out_dir, "stage1_captions.json"),
             "stage2": os.path.join(out_dir, "stage2_instruct.json"),
             "eval": os.path.join(out_dir, "eval.jsonl")}
    if n_two_image:
        pairs, pair_evals = _two_image_samples(random.Random(f"{seed}:two_image"), img_dir, image_size, n_two_image)
        stage2 += pairs
        paths["eval_two_image"] = os.path.join(out_dir, "eval_two_image.jsonl")
        _write_jsonl(paths["eval_two_image"], pair_evals)
    _write_json(paths["stage1"], stage1)
    _write_json(paths["stage2"], stage2)
    _write_jsonl(paths["eval"], evals)
    return paths


def _write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _two_image_samples(rng: random.Random, img_dir: str, image_size: int, n: int) -> tuple[list, list]:
    """n training samples and n held-out questions, each about a fresh pair of scenes."""
    def pair(name: str):
        while True:  # a pair with at least one question that has a single right answer
            scenes = [random_scene(rng), random_scene(rng)]
            qa = two_image_questions(*scenes, rng)
            if qa:
                break
        names = [f"{name}_a.png", f"{name}_b.png"]
        for scene, file in zip(scenes, names):
            render_scene(scene, image_size).save(os.path.join(img_dir, file), format="PNG")
        return names, qa

    train, evals = [], []
    for i in range(n):
        names, qa = pair(f"pair_{i:05d}")
        turns = []
        for k, (q, answers, _) in enumerate(qa):
            turns += [{"from": "human", "value": (TWO_IMAGE_PREFIX + q) if k == 0 else q},
                      {"from": "gpt", "value": answers[0]}]
        train.append({"id": f"pair_{i:05d}", "image": names, "conversations": turns})
    for i in range(n):
        names, qa = pair(f"pair_eval_{i:05d}")
        q, answers, cat = qa[0]
        evals.append({"id": f"pair_eval_{i:05d}", "image": names, "question": TWO_IMAGE_PREFIX + q,
                      "answers": answers, "category": cat})
    return train, evals
