"""Stage semantics: pretraining changes only the projector; finetuning changes LM + projector."""
import torch

from nemo_neva import build_model
from tests.model.helpers import batch_for, tiny_model_cfg


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def _train_steps(model, steps=3):
    """Optimizer steps through megatron-core's DDP, schedule and optimizer, as training_step does."""
    model.train()
    opt = model.configure_optimizers()
    for i in range(steps):
        loss = model.train_on_batch(batch_for(model, n=model.cfg.global_batch_size, seed=i), opt)
        assert torch.isfinite(loss)


def _changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_stage1_only_projector_learns():
    model = build_model(tiny_model_cfg(**{"mm_cfg.llm.freeze": True}))
    lm, vis, proj = (_snapshot(m) for m in (model.model.language_model, model.model.vision_tower,
                                            model.model.projector))
    _train_steps(model)
    assert not _changed(lm, model.model.language_model)  # bit-identical
    assert not _changed(vis, model.model.vision_tower)
    assert _changed(proj, model.model.projector) == set(proj)


def test_stage2_lm_and_projector_learn_vision_stays():
    model = build_model(tiny_model_cfg(**{"mm_cfg.llm.freeze": False}))
    lm, vis = _snapshot(model.model.language_model), _snapshot(model.model.vision_tower)
    _train_steps(model)
    changed = _changed(lm, model.model.language_model)
    assert any("decoder.layers" in k for k in changed) and any("word_embeddings" in k for k in changed)
    assert not _changed(vis, model.model.vision_tower)
    assert not model.model.vision_tower.training  # frozen tower stays in eval mode
