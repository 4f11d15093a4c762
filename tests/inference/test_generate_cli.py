"""examples/neva_generate.py with a prompts file, run as a user runs it; its answers must equal the library's
answers for the same prompts and settings (repetition penalty, extra stop strings)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.data.image_io import open_user_image
from nemo_neva.inference.prompting import build_prompt, stop_markers
from tests.model.helpers import ROOT, tiny_model_cfg

IMAGE = os.path.join(ROOT, "data", "shapes_demo", "images", "eval_00000.png")
SCRIPT = os.path.join(ROOT, "examples", "neva_generate.py")


def _run(*args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=str(cwd), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(4)
    build_model(tiny_model_cfg()).save_to(str(root / "m.nemo"))
    return root, MegatronNevaModel.restore_from(str(root / "m.nemo"))


def _expected(model, questions, images, **kw):
    template = model.cfg.data.conv_template
    stop_ids, stop_strings = stop_markers(model.tokenizer, template)
    prompts = [build_prompt(template, q, img is not None) for q, img in zip(questions, images)]
    return model.generate(images, prompts, max_new_tokens=6, stop_token_ids=stop_ids,
                          stop_strings=stop_strings + kw.pop("extra_stops", []), **kw)


def test_prompts_file_answers_in_order_with_skips_and_settings(saved, tmp_path):
    root, model = saved
    (tmp_path / "imgs").mkdir()
    shutil.copy(IMAGE, tmp_path / "imgs" / "a.png")
    questions = ["What colour is it?", "Hello there", "What shape?"]
    images = [open_user_image(IMAGE), None, open_user_image(IMAGE)]
    free = _expected(model, questions, images, repetition_penalty=1.3)
    stop = next(m.group(0) for a in free for m in re.finditer(r"[A-Za-z]{2}", a[1:]))  # cuts some answer short
    expected = _expected(model, questions, images, repetition_penalty=1.3, extra_stops=[stop])
    assert expected != free
    lines = [{"image": "imgs/a.png", "prompt": questions[0]}, "{not json", {"prompt": questions[1], "id": 7},
             {"image": "imgs/missing.png", "prompt": "Where?"}, {"image": "imgs/a.png"},
             {"image": os.path.abspath(IMAGE), "prompt": questions[2]}]
    (tmp_path / "in.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n\n")
    proc = _run(f"neva_model_file={root / 'm.nemo'}", f"prompts_file={tmp_path / 'in.jsonl'}",
                f"output_file={tmp_path / 'out.jsonl'}", "inference.tokens_to_generate=6",
                "inference.repetition_penalty=1.3", f"inference.stop_strings=[{stop}]", "inference.batch_size=2",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(r) for r in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # one per non-blank line, same order
    assert [rows[i]["answer"] for i in (0, 2, 5)] == expected
    assert rows[2]["id"] == 7 and rows[0]["image"] == "imgs/a.png"  # input fields are echoed as written
    assert [rows[i]["line"] for i in (1, 3, 4)] == [2, 4, 5] and all("answer" not in rows[i] for i in (1, 3, 4))
    assert "not valid JSON" in rows[1]["error"] and "missing" in rows[3]["error"] and "prompt" in rows[4]["error"]
    assert "3 of 6 lines answered, 3 skipped" in proc.stdout + proc.stderr


def test_a_file_without_usable_lines_and_bad_options_are_clear_errors(saved, tmp_path):
    root, _ = saved
    (tmp_path / "bad.jsonl").write_text('[1, 2]\n{"prompt": ""}\n')
    proc = _run(f"neva_model_file={root / 'm.nemo'}", f"prompts_file={tmp_path / 'bad.jsonl'}", cwd=tmp_path)
    assert proc.returncode == 2 and "error: no usable line" in proc.stderr, proc.stderr[-2000:]
    proc = _run(f"neva_model_file={root / 'm.nemo'}", "prompt=hi", "inference.repetition_penalty=0", cwd=tmp_path)
    assert proc.returncode == 2 and "error: repetition_penalty must be > 0" in proc.stderr, proc.stderr[-2000:]


def test_stdout_is_the_answer_and_temperature_alone_samples(saved, tmp_path):
    """`answer=$(python examples/neva_generate.py ...)` is the answer (NeMo's restore line and all logs go to
    stderr), and `inference.temperature` > 0 samples without any other switch (the CLI's defaults: top_p 0.9,
    seed 1234), giving the library's seeded answer."""
    root, model = saved
    image = open_user_image(IMAGE)
    greedy = _expected(model, ["What colour is it?"], [image])[0]
    sampled = _expected(model, ["What colour is it?"], [image], temperature=0.7, top_p=0.9, seed=1234)[0]
    assert sampled != greedy  # so the second run below can tell sampling from greedy
    common = (f"neva_model_file={root / 'm.nemo'}", f"image_path={IMAGE}", "prompt=What colour is it?",
              "inference.tokens_to_generate=6")
    proc = _run(*common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == greedy + "\n", proc.stdout[-2000:]
    assert "Model MegatronNevaModel was successfully restored" in proc.stderr
    proc = _run(*common, "inference.temperature=0.7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == sampled + "\n", proc.stdout[-2000:]
