"""The shapes generator's two-image task: off by default (outputs unchanged), answers true to the pixels, and the
records are valid two-image samples for NevaDataset."""
import filecmp
import json
import os

from PIL import Image

from neva_data_helpers import json_dataset
from nemo_neva.data.shapes import BACKGROUND, COLOURS, make_shapes_dataset


def _blobs(path):
    """Colours of the 4-connected non-background regions of an image (the generator's shapes never touch)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    px = img.load()
    seen, out = set(), []
    for y in range(h):
        for x in range(w):
            if (x, y) in seen or px[x, y] == BACKGROUND:
                continue
            colour, stack = px[x, y], [(x, y)]
            seen.add((x, y))
            while stack:
                cx, cy = stack.pop()
                for nx, ny in ((cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)):
                    if 0 <= nx < w and 0 <= ny < h and (nx, ny) not in seen and px[nx, ny] != BACKGROUND:
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            out.append(colour)
    return out


def _answer_from_pixels(question, files):
    blobs = [_blobs(f) for f in files]
    if "Which image has more shapes?" in question:
        return "first" if len(blobs[0]) > len(blobs[1]) else "second"
    which = 0 if "first image" in question else 1
    (colour,) = set(blobs[which])
    return next(name for name, rgb in COLOURS.items() if rgb == colour)


def test_off_by_default_and_single_image_outputs_unchanged(tmp_path):
    plain = make_shapes_dataset(str(tmp_path / "plain"), n_train=12, n_eval=4, seed=3)
    two = make_shapes_dataset(str(tmp_path / "two"), n_train=12, n_eval=4, seed=3, n_two_image=6)
    assert "eval_two_image" not in plain
    for key in ("stage1", "eval"):
        assert filecmp.cmp(plain[key], two[key], shallow=False)
    with open(plain["stage2"]) as f, open(two["stage2"]) as g:
        base, extended = json.load(f), json.load(g)
    assert extended[: len(base)] == base and len(extended) == len(base) + 6
    for name in os.listdir(plain["image_folder"]):
        assert filecmp.cmp(os.path.join(plain["image_folder"], name), os.path.join(two["image_folder"], name),
                           shallow=False)


def test_two_image_answers_are_true_to_the_pixels(tmp_path, tok, proc):
    paths = make_shapes_dataset(str(tmp_path / "d"), n_train=4, n_eval=2, seed=5, n_two_image=20)
    folder = paths["image_folder"]
    with open(paths["stage2"]) as f:
        pairs = [r for r in json.load(f) if isinstance(r.get("image"), list)]
    with open(paths["eval_two_image"]) as f:
        evals = [json.loads(line) for line in f]
    assert len(pairs) == len(evals) == 20
    categories = set()
    for rec in pairs:
        turns = rec["conversations"]
        for q, a in zip(turns[0::2], turns[1::2]):
            assert _answer_from_pixels(q["value"], [os.path.join(folder, n) for n in rec["image"]]) == a["value"]
    for rec in evals:
        categories.add(rec["category"])
        assert _answer_from_pixels(rec["question"], [os.path.join(folder, n) for n in rec["image"]]) == \
            rec["answers"][0]
    assert categories == {"more_shapes", "colour_in_image"}
    ds = json_dataset(paths["stage2"], folder, tok, proc, template="vicuna_v1", seq_length=256, tokens_per_image=4)
    assert not ds.skip_counts
    two = [i for i, r in enumerate(ds.records) if isinstance(r.get("image"), list)]
    assert len(two) == 20 and all(ds[i]["images"].shape[0] == 2 for i in two[:3])
