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
    _draw_at(draw, shape, colour, *_centre(position, size), size)


def _draw_at(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, size: int) -> None:
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


DIRECTIONS = ("left", "right")
MOTION_QUESTION = "Which way does the shape move? Answer with one word."


def render_motion(shape: str, colour: str, direction: str, n_frames: int, size: int = 32) -> list[Image.Image]:
    """A shape crossing the picture, 20 % -> 80 % of the width (`right`) or back (`left`), over n_frames."""
    frames = []
    for i in range(n_frames):
        t = i / max(n_frames - 1, 1)
        img = Image.new("RGB", (size, size), BACKGROUND)
        _draw_at(ImageDraw.Draw(img), shape, colour, size * (0.2 + 0.6 * (t if direction == "right" else 1 - t)),
                 size / 2, size)
        frames.append(img)
    return frames


def _make_motion(out_dir: str, rng: random.Random, n_train: int, n_eval: int, n_frames: int, size: int) -> dict:
    """videos/ + stage2_video.json (`"video"` records) + eval_video.jsonl: "Which way does it move?"."""
    from nemo_neva.data.video_writer import write_video

    vid_dir = os.path.join(out_dir, "videos")
    os.makedirs(vid_dir, exist_ok=True)
    train, evals = [], []
    for split, n in (("train", n_train), ("eval", n_eval)):
        for i in range(n):
            shape, colour, direction = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(DIRECTIONS)
            name = f"{split}_{i:05d}.mp4"
            write_video(os.path.join(vid_dir, name), render_motion(shape, colour, direction, n_frames, size))
            if split == "train":
                train.append({"id": f"motion_{i:05d}", "video": name, "conversations": [
                    {"from": "human", "value": f"<video>\n{MOTION_QUESTION}"}, {"from": "gpt", "value": direction}]})
            else:
                evals.append({"id": f"eval_motion_{i:05d}", "video": name, "question": MOTION_QUESTION,
                              "answers": [direction], "category": "motion"})
    paths = {"video_folder": vid_dir, "video_stage2": os.path.join(out_dir, "stage2_video.json"),
             "video_eval": os.path.join(out_dir, "eval_video.jsonl")}
    _write_json(paths["video_stage2"], train)
    _write_jsonl(paths["video_eval"], evals)
    return paths


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
                        image_size: int = 32, train_size_weights=SCENE_SIZE_WEIGHTS, n_two_image: int = 0,
                        n_video_train: int = 0, n_video_eval: int = 0, video_frames: int = 4) -> dict:
    """Write images/ + stage1_captions.json + stage2_instruct.json + eval.jsonl; return their paths.

    `train_size_weights`: how often a training scene has 1, 2 or 3 shapes (more multi-shape scenes teach
    which colour sits where, the hard part); eval scenes always use SCENE_SIZE_WEIGHTS.
    `n_video_train` / `n_video_eval` > 0 (off by default) also write the motion task: lossless mp4s of
    `video_frames` frames in videos/, stage2_video.json and eval_video.jsonl (drawn after everything else,
    so the image files are the same with or without it).
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
    if n_video_train or n_video_eval:
        paths.update(_make_motion(out_dir, rng, n_video_train, n_video_eval, video_frames, image_size))
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
