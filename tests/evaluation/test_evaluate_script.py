"""examples/neva_evaluate.py as a user runs it, on a tiny random .nemo and the shipped demo images."""
import json
import os
import subprocess
import sys

import pytest

from nemo_neva import build_model
from nemo_neva.evaluation.scores import exact_match_vqa
from nemo_neva.evaluation.vqa import vqa_accuracy
from tests.model.helpers import ROOT, tiny_model_cfg

IMAGES = os.path.join(ROOT, "data", "shapes_demo", "images")


def _run(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", "neva_evaluate.py"), *args],
                          cwd=str(cwd), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_nemo(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("nemo") / "tiny.nemo")
    build_model(tiny_model_cfg(**{"data.conv_template": "nvgpt", "encoder_seq_length": 192})).save_to(path)
    return path


def test_evaluate_writes_predictions_and_metrics_and_counts_skips(tiny_nemo, tmp_path):
    with open(os.path.join(ROOT, "data", "shapes_demo", "eval.jsonl")) as f:
        lines = [line.strip() for line in f][:4]
    lines += [
        json.dumps({"image": "eval_00005.png", "question": "Is there a shape?", "answer": "yes",
                    "question_type": "exists"}),
        json.dumps({"image": "eval_00006.png", "question": "Is there a dog?", "answers": ["no"],
                    "question_type": "exists"}),
        json.dumps({"image": "no_such.png", "question": "What colour?", "answers": ["red"]}),
        "{broken",
        json.dumps({"image": "eval_00007.png", "question": "Why? " * 200, "answers": ["no"]}),  # > 192 tokens
    ]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = _run(f"neva_model_file={tiny_nemo}", f"eval_file={eval_file}", f"image_folder={IMAGES}",
                f"output_dir={out}", "max_new_tokens=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(preds) == 6 and metrics["answered"] == 6
    assert metrics["skipped"] == {"image_missing": 1, "bad_json": 1, "too_long": 1}
    # lost questions are said next to the scores, loudly (3 of 9 is far above a few percent), with the fix
    assert "answered 6 questions; skipped 3 of 9 questions (33.3 %)" in proc.stdout
    assert "WARNING: skipped 3 of 9" in proc.stderr and "raise model.encoder_seq_length" in proc.stderr
    assert {p["question_type"] for p in preds} == {"shape", "colour", "position", "exists"}
    overall = metrics["overall"]
    assert overall["n"] == 6
    # the same per-question scores summed in another order: float rounding only (approx's default 1e-6)
    assert overall["vqa"] == pytest.approx(sum(vqa_accuracy(p["prediction"], p["answers"]) for p in preds) / 6)
    assert overall["exact_match"] == pytest.approx(
        sum(exact_match_vqa(p["prediction"], p["answers"]) for p in preds) / 6)
    yn = overall["yes_no"]
    assert yn["n"] == 2 and yn["tp"] + yn["fn"] == 1 and yn["fp"] + yn["tn"] <= 1
    assert set(metrics["by_question_type"]) == {"shape", "colour", "position", "exists"}
    assert "yes_no" in metrics["by_question_type"]["exists"] and "yes_no" not in metrics["by_question_type"]["colour"]

    # Only the requested metrics are computed.
    proc = _run(f"neva_model_file={tiny_nemo}", f"eval_file={eval_file}", f"image_folder={IMAGES}",
                f"output_dir={tmp_path / 'out2'}", "max_new_tokens=2", "metrics=[exact_match]", "limit=2",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m2 = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert set(m2["overall"]) == {"n", "exact_match"} and m2["answered"] == 2


@pytest.mark.parametrize("args,message", [
    (["eval_file=x.jsonl", "output_dir=o"], "neva_model_file=... is required"),
    (["neva_model_file=missing.nemo", "eval_file=x.jsonl", "output_dir=o"], "no such file"),
    (["neva_model_file=m.nemo", "eval_file=x.jsonl", "output_dir=o", "metrics=[bleu]"], "choose from"),
])
def test_evaluate_user_errors(tmp_path, args, message):
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
