"""The shapes generator's optional motion task: lossless videos of a shape crossing the picture, and records
whose answer is the way it moves. The direction is checked from the decoded pixels (the shape's centroid),
not from the generator's own bookkeeping."""
import json
import os

import numpy as np

from nemo_neva.data.shapes import BACKGROUND, MOTION_QUESTION, make_shapes_dataset
from nemo_neva.data.video_io import VideoSettings, open_video
from tests.optional import require

require("av")
FRAMES = 5


def _centroid_x(frame) -> float:
    a = np.asarray(frame).astype(int)
    ys, xs = np.nonzero(np.abs(a - np.array(BACKGROUND)).sum(-1) > 30)  # shape pixels (JPEG-free: exact)
    return float(xs.mean())


def test_motion_videos_move_the_way_their_answer_says(tmp_path):
    paths = make_shapes_dataset(str(tmp_path), n_train=3, n_eval=2, seed=1, n_video_train=6, n_video_eval=4,
                                video_frames=FRAMES)
    train = json.load(open(paths["video_stage2"]))
    evals = [json.loads(l) for l in open(paths["video_eval"])]
    assert len(train) == 6 and len(evals) == 4
    seen = set()
    for video, question, answer in ([(r["video"], r["conversations"][0]["value"], r["conversations"][1]["value"])
                                     for r in train] + [(r["video"], r["question"], r["answers"][0]) for r in evals]):
        assert MOTION_QUESTION in question
        clip = open_video(os.path.join(paths["video_folder"], video), VideoSettings(FRAMES, "first"))
        assert clip.total_frames == FRAMES
        xs = [_centroid_x(f) for f in clip.frames]
        moved = "right" if all(b > a for a, b in zip(xs, xs[1:])) else \
            "left" if all(b < a for a, b in zip(xs, xs[1:])) else "neither"
        assert moved == answer, (video, xs)
        seen.add(answer)
    assert seen == {"left", "right"}
    assert all(r["conversations"][0]["value"].startswith("<video>") for r in train)


def test_the_motion_task_is_off_by_default_and_changes_nothing_else(tmp_path):
    plain = make_shapes_dataset(str(tmp_path / "a"), n_train=4, n_eval=2, seed=3)
    with_video = make_shapes_dataset(str(tmp_path / "b"), n_train=4, n_eval=2, seed=3, n_video_train=2,
                                     video_frames=3)
    assert "video_stage2" not in plain and not os.path.exists(tmp_path / "a" / "videos")
    for key in ("stage1", "stage2", "eval"):
        assert open(plain[key], "rb").read() == open(with_video[key], "rb").read()
    for name in os.listdir(plain["image_folder"]):
        assert open(os.path.join(plain["image_folder"], name), "rb").read() == \
            open(os.path.join(with_video["image_folder"], name), "rb").read()
