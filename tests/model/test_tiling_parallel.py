"""anyres tiling at TP=2 (2 processes over gloo, torchrun): the splice is TP-agnostic, so a tiled model with
rows of different image-token counts trains as on one process. Same .nemo, same global batches (rows with 1, 2
or 0 images of different sizes), 3 optimizer steps; losses, probe logits and trained weights compared with
the single-process run (the tolerance of tests/model/test_model_parallel.py: TP=2 splits the matmuls' sums)."""
import os

import pytest
import torch

from nemo_neva import MegatronNevaModel
from tests.model.helpers import assert_trained_close, llama_overrides, tiny_model_cfg
from tests.model.test_model_parallel import STEPS, _torchrun, _trained_state

ATOL = 2e-5


@pytest.mark.slow
def test_tiled_model_at_tp2_matches_one_process(tmp_path):
    cfg = tiny_model_cfg(**llama_overrides(), **{"mm_cfg.llm.freeze": False, "mm_cfg.image_tiling.enabled": True,
                                                  "encoder_seq_length": 256, "global_batch_size": 4,
                                                  "micro_batch_size": 2})
    torch.manual_seed(0)
    path = str(tmp_path / "base.nemo")
    MegatronNevaModel(cfg).save_to(path)
    ref = _torchrun(1, str(tmp_path / "ref"), path)
    tp2 = _torchrun(2, str(tmp_path / "tp2"), path, "--tp", "2")
    assert tp2 == pytest.approx(ref, abs=ATOL)
    ref_logits, tp2_logits = (torch.load(os.path.join(tmp_path, d, "logits.pt")) for d in ("ref", "tp2"))
    torch.testing.assert_close(tp2_logits, ref_logits, atol=ATOL, rtol=0)
    state = _trained_state(str(tmp_path / "tp2" / "trained.nemo"))
    ref_state = _trained_state(str(tmp_path / "ref" / "trained.nemo"))
    assert "model.image_newline" in state and not torch.equal(
        state["model.image_newline"], _trained_state(path)["model.image_newline"])  # it trained
    assert_trained_close(state, ref_state, float(cfg.optim.lr), STEPS, ATOL)
