"""The shipped demo set: regenerates byte-identically, has the promised content, pixels match captions."""
import json
import os

from PIL import Image

from neva_data_helpers import REPO
from nemo_neva.data.demo import make_demo
from nemo_neva.data.shapes import COLOURS, WHERE, _centre, render_scene

SHIPPED = os.path.join(REPO, "data", "shapes_demo")


def test_regeneration_is_byte_identical(tmp_path):
    make_demo(str(tmp_path / "d"), str(tmp_path / "t"))  # the script's defaults
    for name in ("stage1_captions.json", "stage2_instruct.json", "eval.jsonl"):
        assert (tmp_path / "d" / name).read_bytes() == open(os.path.join(SHIPPED, name), "rb").read(), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "t" / name).read_bytes() == open(os.path.join(REPO, "data", "tokenizer", name), "rb").read()
    shipped_imgs = sorted(os.listdir(os.path.join(SHIPPED, "images")))
    assert sorted(os.listdir(tmp_path / "d" / "images")) == shipped_imgs
    for name in shipped_imgs[::37]:
        assert Image.open(tmp_path / "d" / "images" / name).tobytes() == \
            Image.open(os.path.join(SHIPPED, "images", name)).tobytes()


def test_shipped_content_and_size():
    stage1 = json.load(open(os.path.join(SHIPPED, "stage1_captions.json")))
    stage2 = json.load(open(os.path.join(SHIPPED, "stage2_instruct.json")))
    evals = [json.loads(line) for line in open(os.path.join(SHIPPED, "eval.jsonl"))]
    assert len(stage1) == 300 and len(evals) == 60
    assert all(r["conversations"][0]["value"] == "<image>" for r in stage1)
    text_only = [r for r in stage2 if "image" not in r]
    assert 0 < len(text_only) < 20
    for r in stage2:
        turns = r["conversations"]
        assert 2 <= len(turns) <= 6 and turns[0]["value"].startswith("<image>\n") == ("image" in r)
    assert {e["category"] for e in evals} == {"colour", "shape", "position", "count"}
    assert all(e["answers"] and e["image"].startswith("eval_") for e in evals)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(REPO, "data")) for f in fs)
    assert total < 1_000_000


def test_caption_matches_pixels():
    stage1 = json.load(open(os.path.join(SHIPPED, "stage1_captions.json")))
    rev_where = {v: k for k, v in WHERE.items()}
    for rec in stage1[:40]:
        img = Image.open(os.path.join(SHIPPED, "images", rec["image"])).convert("RGB")
        for part in rec["conversations"][1]["value"].split(" and "):
            _, colour, shape, *where = part.split()
            cx, cy = _centre(rev_where[" ".join(where)], img.size[0])
            # the centre of a triangle's box is inside it too
            assert img.getpixel((int(cx), int(cy) + 1)) == COLOURS[colour], (rec["id"], part)


def test_render_scene_draws_every_shape():
    scene = [{"shape": s, "colour": "red", "position": p}
             for s, p in zip(("circle", "square", "triangle"), ("left", "right", "top"))]
    img = render_scene(scene, 64)
    red = {colour: n for n, colour in img.getcolors()}[COLOURS["red"]]
    assert 3 * 150 < red < 3 * 500


def test_train_size_weights_change_only_the_training_scenes(tmp_path):
    from nemo_neva.data.shapes import make_shapes_dataset

    paths = make_shapes_dataset(str(tmp_path), 100, 200, seed=1, train_size_weights=(0, 0, 1))
    captions = [r["conversations"][1]["value"] for r in json.load(open(paths["stage1"]))]
    assert all(c.count(" and ") == 2 for c in captions)  # every training scene has 3 shapes
    counts = [r["answers"][0] for r in map(json.loads, open(paths["eval"])) if r["category"] == "count"]
    assert {"1", "2"} <= set(counts)  # eval scenes keep the default mix
