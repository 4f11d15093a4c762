"""Forward/backward of the tiny NeVA model on real megatron-core + HF CLIP (CPU)."""
import pytest
import torch

from nemo_neva import build_model
from nemo_neva.modules.neva_module import ImageTokenMismatch
from nemo_neva.modules.projector import build_projector
from tests.model.helpers import batch_for, llama_overrides, tiny_model_cfg


@pytest.fixture(scope="module", params=["gpt", "llama"])
def model(request):
    overrides = llama_overrides() if request.param == "llama" else {}
    return build_model(tiny_model_cfg(**overrides))


def test_forward_backward_reaches_projector_not_frozen_parts(model):
    batch = batch_for(model)
    loss, n_tokens = model.loss_from_batch(batch)
    assert torch.isfinite(loss) and n_tokens.item() == batch["loss_mask"].sum().item()
    model.zero_grad(set_to_none=True)
    loss.backward()
    proj_grads = [p.grad for p in model.model.projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in proj_grads)
    # stage-1 config: LM and vision frozen -> no grads at all
    assert all(p.grad is None for p in model.model.language_model.parameters())
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_llama_style_uses_rope_rmsnorm_gqa(model):
    cfg = model.model.language_model.config
    if model.cfg.position_embedding_type == "rope":
        assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and cfg.num_query_groups == 2
        assert not hasattr(model.model.language_model.embedding, "position_embeddings")
    else:
        assert model.model.language_model.embedding.position_embeddings.weight.shape[0] == 64


def test_image_features_only_affect_positions_from_the_image_on(model):
    model.eval()
    batch = batch_for(model)
    P = model.tokens_per_image
    logits = model(batch["tokens"], batch["position_ids"], images=batch["images"])
    images = batch["images"].clone()
    images[1] = torch.rand_like(images[1])
    logits2 = model(batch["tokens"], batch["position_ids"], images=images)
    assert torch.equal(logits[0], logits2[0])  # other sample untouched
    assert torch.equal(logits[1, :1], logits2[1, :1])  # causal: before the image nothing changes
    assert (logits[1, 1 + P:] - logits2[1, 1 + P:]).abs().max() > 1e-4


def test_spliced_embeddings_are_the_projected_features(model):
    """The decoder's input: the projected features (plus their learned position embedding, as a word gets) at the
    placeholders, megatron-core's own embedding of the prompt everywhere else."""
    batch = batch_for(model, n=1)
    gpt = model.model.language_model
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"]

    handle = gpt.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(batch["tokens"], batch["position_ids"], images=batch["images"])
    finally:
        handle.remove()
    P = model.tokens_per_image
    hidden = captured["hidden"][:, 0]  # [s, h] of the one sample
    feats = model.model.encode_images(batch["images"])[0]
    positions = batch["position_ids"][0]
    if gpt.embedding.add_position_embedding:
        feats = feats + gpt.embedding.position_embeddings(positions[1:1 + P])
    text = torch.cat([batch["tokens"][:, :1], batch["tokens"][:, 1 + P:]], 1)
    text_pos = torch.cat([batch["position_ids"][:, :1], batch["position_ids"][:, 1 + P:]], 1)
    words = gpt.embedding(input_ids=text, position_ids=text_pos)[:, 0]
    # the same operations on the same values (eval mode: no dropout): measured 0.0
    torch.testing.assert_close(hidden[1:1 + P], feats, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([hidden[:1], hidden[1 + P:]]), words, rtol=0, atol=0)


def test_placeholder_count_mismatch_is_a_clear_error(model):
    batch = batch_for(model)
    with pytest.raises(ImageTokenMismatch, match="image placeholder tokens"):
        model(batch["tokens"], batch["position_ids"], images=batch["images"][:1])
    with pytest.raises(ImageTokenMismatch):
        model(batch["tokens"], batch["position_ids"], images=None)


def test_no_trainable_token_gives_finite_zero_loss(model):
    batch = batch_for(model)
    batch["loss_mask"].zero_()
    loss, n = model.loss_from_batch(batch)
    assert n.item() == 0 and loss.item() == 0.0 and torch.isfinite(loss)


@pytest.mark.parametrize("kind,n_linear", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_kinds(kind, n_linear):
    proj = build_projector(kind, 16, 32)
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == n_linear and proj(torch.randn(2, 5, 16)).shape == (2, 5, 32)


def test_unknown_projector_is_refused():
    with pytest.raises(ValueError, match="mm_mlp_adapter_type"):
        build_projector("qformer", 16, 32)
