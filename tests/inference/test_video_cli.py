"""examples/neva_generate.py with video_path / prompts-file "video" lines, run as a user runs it: the answer is
the library's answer for the video's frames with one `<image>` tag per frame (the model's
model.data.video.num_frames), and bad videos are one-line errors or counted skips."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.data.constants import IMAGE_TOKEN
from nemo_neva.data.video_io import sample_indices
from nemo_neva.data.video_writer import write_video
from nemo_neva.inference.prompting import build_prompt, stop_markers
from tests.inference.test_video_generation import moving_square
from tests.model.helpers import ROOT, tiny_model_cfg
from tests.optional import require

require("av")
SCRIPT = os.path.join(ROOT, "examples", "neva_generate.py")
QUESTION = "Which way does it move?"
TEMPLATE = "vicuna_v1"  # a chat template (the tiny model's own, `plain`, replaces the question by the image)


def _run(*args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=str(cwd), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_cli")
    torch.manual_seed(4)
    build_model(tiny_model_cfg(encoder_seq_length=128, **{"data.video.num_frames": 3})).save_to(
        str(root / "m.nemo"))
    drawn = moving_square(7)
    write_video(root / "clip.mp4", drawn)
    (root / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    write_video(root / "empty.avi", [], container="avi")
    return root, MegatronNevaModel.restore_from(str(root / "m.nemo")), drawn


def _expected(model, drawn, num_frames):
    """The library's answer for the drawn frames at the uniform indices, as images with one tag each."""
    template = TEMPLATE
    stop_ids, stop_strings = stop_markers(model.tokenizer, template)
    frames = [drawn[i] for i in sample_indices(len(drawn), num_frames)]
    prompt = build_prompt(template, f"{IMAGE_TOKEN * num_frames}\n{QUESTION}", True)
    return model.generate([frames], [prompt], max_new_tokens=6, stop_token_ids=stop_ids, stop_strings=stop_strings)[0]


def test_video_path_prints_the_answer_only(saved, tmp_path):
    root, model, drawn = saved
    proc = _run(f"neva_model_file={root / 'm.nemo'}", f"video_path={root / 'clip.mp4'}", f"prompt={QUESTION}",
                "inference.tokens_to_generate=6", f"conv_template={TEMPLATE}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == _expected(model, drawn, 3) + "\n", proc.stdout[-2000:]


def test_prompts_file_video_lines_with_skips_and_a_frame_override(saved, tmp_path):
    root, model, drawn = saved
    lines = [{"video": str(root / "clip.mp4"), "prompt": QUESTION}, {"video": str(root / "garbage.mp4"), "prompt": "?"},
             {"video": str(root / "empty.avi"), "prompt": "?"},
             {"video": str(root / "clip.mp4"), "image": "a.png", "prompt": "?"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    proc = _run(f"neva_model_file={root / 'm.nemo'}", f"prompts_file={tmp_path / 'in.jsonl'}",
                f"output_file={tmp_path / 'out.jsonl'}", "inference.tokens_to_generate=6", "video.num_frames=2",
                f"conv_template={TEMPLATE}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(r) for r in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["answer"] == _expected(model, drawn, 2)
    assert [r["error"].split(":")[0] for r in rows[1:]] == ["corrupt", "no_frames", "give 'image' or 'video', not both"]
    assert "1 of 4 lines answered, 3 skipped" in proc.stderr
    # checked before the model loads
    proc = _run(f"neva_model_file={root / 'm.nemo'}", "prompt=hi", "video.num_frames=0", cwd=tmp_path)
    assert proc.returncode == 2 and "error: video num_frames must be an integer >= 1" in proc.stderr, proc.stderr[-2000:]
