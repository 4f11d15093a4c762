"""Eval lines with several images ("image": [paths]) and with a "video": the shapes generator's
eval_two_image.jsonl and eval_video.jsonl are answered in full, each question's media reach `generate` in tag
order (the prediction equals generate's own answer on the media given by hand), and bad media are counted skips."""
import json
import os

import pytest
from PIL import Image

from nemo_neva import build_model
from nemo_neva.data.shapes import make_shapes_dataset
from nemo_neva.data.video_io import open_video, video_settings_of
from nemo_neva.evaluation import evaluate, read_eval_file
from nemo_neva.evaluation.run import predict
from nemo_neva.inference.prompting import build_prompt, stop_markers
from tests.model.helpers import tiny_model_cfg
from tests.optional import require

require("av")
TEMPLATE = "nvgpt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    paths = make_shapes_dataset(out, n_train=2, n_eval=2, n_two_image=3, n_video_eval=3, video_frames=4)
    cfg = tiny_model_cfg(**{"data.conv_template": TEMPLATE, "encoder_seq_length": 192, "data.video.num_frames": 4})
    model = build_model(cfg)
    model.eval()
    return model, paths


def _by_hand(model, prompt, media):
    stop_ids, stop_strings = stop_markers(model.tokenizer, TEMPLATE)
    return model.generate([media], [prompt], max_new_tokens=3, temperature=0.0, stop_token_ids=stop_ids,
                          stop_strings=stop_strings)[0].strip()


def test_two_image_questions_are_answered_with_both_images_in_order(setup):
    model, paths = setup
    eval_set = read_eval_file(paths["eval_two_image"], paths["image_folder"])
    assert len(eval_set.items) == 3 and all(isinstance(it.image, list) and len(it.image) == 2
                                            for it in eval_set.items)
    result = evaluate(model, eval_set, TEMPLATE, max_new_tokens=3)
    assert result["answered"] == 3 and result["skipped"] == {}
    rows = predict(model, read_eval_file(paths["eval_two_image"], paths["image_folder"]), TEMPLATE, 3)
    for row in rows:
        first, second = (Image.open(p).convert("RGB") for p in row["image"])
        prompt = build_prompt(TEMPLATE, row["question"], has_image=True)  # the question holds both tags
        assert row["prediction"] == _by_hand(model, prompt, [first, second])


def test_video_questions_are_answered_with_the_sampled_frames(setup):
    model, paths = setup
    eval_set = read_eval_file(paths["video_eval"], paths["image_folder"], video_folder=paths["video_folder"])
    assert len(eval_set.items) == 3 and all(it.video and it.image is None for it in eval_set.items)
    rows = predict(model, eval_set, TEMPLATE, 3)
    assert len(rows) == 3 and eval_set.skipped == {}
    for row in rows:
        assert os.path.dirname(row["video"]) == paths["video_folder"]
        video = open_video(row["video"], video_settings_of(model.cfg))
        assert len(video.frames) == 4
        prompt = build_prompt(TEMPLATE, row["question"], has_image=False, has_video=True)
        assert row["prediction"] == _by_hand(model, prompt, [video])


def test_mixed_and_bad_media_lines(setup, tmp_path):
    model, paths = setup
    img = sorted(os.listdir(paths["image_folder"]))[0]
    vid = sorted(os.listdir(paths["video_folder"]))[0]
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    lines = [
        {"id": "mixed", "image": os.path.join(paths["image_folder"], img),
         "video": os.path.join(paths["video_folder"], vid), "question": "Is the <image> shape in the <video>?", "answer": "yes"},
        {"id": "untagged", "image": os.path.join(paths["image_folder"], img),
         "video": os.path.join(paths["video_folder"], vid), "question": "Same shape?", "answer": "yes"},
        {"id": "missing", "video": "nope.mp4", "question": "Which way?", "answer": "left"},
        {"id": "junk", "video": "junk.mp4", "question": "Which way?", "answer": "left"},
        {"id": "field", "video": 7, "question": "Which way?", "answer": "left"},
        {"id": "tags", "image": [os.path.join(paths["image_folder"], img)], "question": "<image> or <image>?",
         "answer": "x"},
    ]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    eval_set = read_eval_file(str(path), str(tmp_path))
    rows = predict(model, eval_set, TEMPLATE, 3)
    assert [r["id"] for r in rows] == ["mixed", "untagged"]
    assert dict(eval_set.skipped) == {"video_missing": 1, "video_corrupt": 1, "bad_video_field": 1,
                                      "unusable_question": 1}
    image = Image.open(rows[0]["image"]).convert("RGB")
    video = open_video(rows[0]["video"], video_settings_of(model.cfg))
    assert rows[0]["prediction"] == _by_hand(
        model, build_prompt(TEMPLATE, lines[0]["question"], True, has_video=True), [image, video])
    # untagged: the video, then the image, first (as in training)
    assert rows[1]["prediction"] == _by_hand(
        model, build_prompt(TEMPLATE, lines[1]["question"], True, has_video=True), [video, image])
