"""Resume on an Energon dataset, end to end: a pretraining run on Energon data SIGKILLed in the middle of writing
its step-4 checkpoint and relaunched with the same command trains exactly the batches (sample ids, in order) of a
run that was never interrupted, and ends with the same weights and loss (the JSON path's kill test,
tests/launch/test_resume.py, on data prepared by `energon prepare`)."""
import json
import os

import pytest
import torch

from tests.optional import require

require("megatron.energon")

from nemo_neva.checkpoint import training_checkpoint as checkpointing  # noqa: E402
from scripts.convert_llava_to_energon import convert  # noqa: E402
from tests.launch.test_resume import (KILL_AT, STEPS, _cmd, _compare, _final_state, _last_checkpoint,  # noqa: E402
                                      _run, _small_data)
from tests.model.helpers import ROOT  # noqa: E402

RECORD = os.path.join(ROOT, "tests", "launch", "record_trained_ids.py")


def _trained(path):
    with open(path, encoding="utf-8") as f:
        return {r["step"]: r["ids"] for r in map(json.loads, f)}


def _energon_data(tmp_path):
    """The resume tests' 24 captions as an Energon dataset of 5 shards (shuffled shard slices + a buffer)."""
    out = str(tmp_path / "energon")
    convert(str(_small_data(tmp_path)), os.path.join(ROOT, "data", "shapes_demo", "images"), out,
            samples_per_shard=5, workers=1)
    return out


def _recorded_run(tmp_path, monkeypatch, exp, data, log, kill):
    monkeypatch.setenv("NEVA_TEST_TRAINED_IDS", str(tmp_path / log))
    cmd = _cmd(exp, data, ("model.data.shuffle_buffer=4",), kill=kill)
    return _run([cmd[0], RECORD, *cmd[1:]], tmp_path, expect_killed=kill)


# slow (82 s in CI): the Energon loader's saved position is exact in the default suite
# (tests/data/test_energon.py::test_loader_state_roundtrip_continues_exactly), and a killed save is resumed there
# for JSON and packed tar-shard data (tests/launch/test_resume.py)
@pytest.mark.slow
def test_energon_run_killed_mid_save_trains_the_batches_of_an_uninterrupted_run(tmp_path, monkeypatch):
    data = _energon_data(tmp_path)
    ref_exp, exp = tmp_path / "uninterrupted", tmp_path / "killed"
    _recorded_run(tmp_path, monkeypatch, ref_exp, data, "reference.jsonl", kill=False)
    _recorded_run(tmp_path, monkeypatch, exp, data, "first.jsonl", kill=True)
    saved = torch.load(os.path.join(_last_checkpoint(exp), checkpointing.TRAINER_STATE), weights_only=True)
    assert saved["global_step"] == 2 < KILL_AT  # the step-4 save died: the relaunch starts after step 2
    position = saved["neva_data"]["energon"]
    assert len(position) == 1 and position[0]["trained_batches"] == 2  # the trained batches', not the prefetched
    proc = _recorded_run(tmp_path, monkeypatch, exp, data, "resumed.jsonl", kill=False)
    assert "resuming the Energon stream after 2 trained batches" in proc.stdout + proc.stderr
    reference, resumed = _trained(tmp_path / "reference.jsonl"), _trained(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(3, STEPS + 1))
    assert {s: reference[s] for s in resumed} == resumed  # the same samples, in the same rows and order
    assert len({i for ids in reference.values() for i in ids}) == 24  # the run went round the whole data
    _compare(_final_state(ref_exp), _final_state(exp))  # and ends with the same weights, optimizer and loss
