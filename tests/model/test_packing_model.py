"""Packed rows give every sample the same per-token losses as running it alone: with the block-diagonal mask
(local spec default) and with THD + megatron-core PackedSeqParams (the layout the TE path runs)."""
import pytest
import torch

from nemo_neva import build_model
from nemo_neva.data.collate import NevaCollator
from nemo_neva.data.packing import PackedCollator, first_fit_decreasing, to_thd
from tests.model.helpers import ROOT, assert_trained_close, llama_overrides, tiny_model_cfg


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_packed_per_sample_losses_equal_unpacked(style):
    """Both layouts in one model build: the dense mask, then THD (q/k/v [t, h, d], cu_seqlens)."""
    overrides = llama_overrides() if style == "llama" else {}
    cfg = tiny_model_cfg(**overrides, **{
        "data.data_path": f"{ROOT}/data/shapes_demo/stage2_instruct.json", "data.conv_template": "vicuna_v1",
        "encoder_seq_length": 256, "data.seq_length": 256})
    model = build_model(cfg)
    model.eval()
    dataset = model.build_dataset(cfg.data)
    items = [dataset[i] for i in range(6)]
    assert all(it is not None for it in items)
    bins = first_fit_decreasing([len(it["input_ids"]) - 1 for it in items], 256)
    assert len(bins) < len(items)  # several samples really share a row
    packed = PackedCollator(model.tokenizer.pad_token_id, seq_length=256)([[items[i] for i in b] for b in bins])

    def per_token(batch):
        with torch.no_grad():
            return model.model(batch["tokens"], batch["position_ids"], attention_mask=batch.get("attention_mask"),
                               images=batch["images"], labels=batch["labels"], num_images=batch["num_images"])

    def per_token_thd(batch):
        thd = to_thd(batch)
        assert thd["tokens"].shape == (1, batch["tokens"].numel()) and thd["attention_mask"] is None
        with torch.no_grad():
            out = model.model(thd["tokens"], thd["position_ids"], images=thd["images"], labels=thd["labels"],
                              num_images=thd["num_images"], packed_seq_params=thd["packed_seq_params"])
        return out.reshape(batch["tokens"].shape)

    refs = {}
    for idx in {i for b in bins for i in b}:
        alone = NevaCollator(model.tokenizer.pad_token_id)([items[idx]])
        refs[idx] = per_token(alone)[0][alone["loss_mask"][0] > 0]
    for layout, packed_loss in [("mask", per_token(packed)), ("thd", per_token_thd(packed))]:
        for row, members in enumerate(bins):
            for seg, idx in enumerate(members):
                sel = (packed["segment_ids"][row] == seg) & (packed["loss_mask"][row] > 0)
                # fp32 per-token losses (~7): measured at most 4.8e-7 off (the packed row is longer, so the
                # attention softmax sums in another grouping); a leak between samples moves them by ~8e-3 (below)
                assert torch.allclose(packed_loss[row][sel], refs[idx], atol=1e-4), (style, layout, idx)
    # control: without isolation the later samples of a row see the earlier ones and their losses change
    leaky = per_token(dict(packed, attention_mask=None))
    row = next(r for r, m in enumerate(bins) if len(m) > 1)
    sel = (packed["segment_ids"][row] == 1) & (packed["loss_mask"][row] > 0)
    assert not torch.allclose(leaky[row][sel], refs[bins[row][1]], atol=1e-4)
    # the model's own step path takes THD when asked (TE does by default) and gives the same loss
    model.packed_thd = True
    with torch.no_grad():
        thd_loss, _ = model.loss_from_batch(packed)
    model.packed_thd = False
    with torch.no_grad():
        mask_loss, _ = model.loss_from_batch(packed)
    torch.testing.assert_close(thd_loss, mask_loss, atol=1e-5, rtol=1e-5)  # fp32 loss ~6.4: measured 9.5e-7
    # ... and that THD step left the rows' padding out (local spec, one pipeline stage)
    model.packed_thd = True
    real = int(packed["row_tokens"].sum())
    assert model._packed_layout(packed)["tokens"].shape == (1, real) and real < packed["tokens"].numel()


def test_thd_training_step_matches_mask_step():
    """One optimizer step through megatron-core's schedule: THD layout (as on TE) == block-diagonal mask."""
    import copy

    cfg = tiny_model_cfg(**{
        "data.data_path": f"{ROOT}/data/shapes_demo/stage2_instruct.json", "data.conv_template": "vicuna_v1",
        "encoder_seq_length": 256, "data.seq_length": 256, "data.packed_sequence": True})
    model = build_model(cfg)
    model.setup_training_data(cfg.data)
    batch = next(iter(model._train_dl))
    assert (batch["segment_ids"].amax(1) > 1).any()  # rows really hold several samples
    start = copy.deepcopy(model.state_dict())
    losses, weights = [], []
    for thd in (True, False):
        model.load_state_dict(start)
        model.packed_thd = thd
        losses.append(float(model.train_on_batch(batch, model.configure_optimizers())))
        weights.append({k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the same fp32 math per segment: measured 0.0
    # one Adam step: elements with ~0 gradient may move by up to ~lr in either layout (see assert_trained_close)
    assert_trained_close(weights[0], weights[1], float(cfg.optim.lr), 1, atol=1e-5, rtol=1e-4)


def test_core_attention_thd_per_segment_equals_block_diagonal_mask():
    """SDPACoreAttention on a THD batch attends one segment at a time (cost quadratic per sample); outputs
    and q/k/v gradients equal the dense block-diagonal mask over the whole row, GQA (2 groups) included.
    A packed batch takes this path by default on the local spec."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from nemo_neva.data.packing import packed_attention_mask
    from nemo_neva.modules.layer_specs import SDPACoreAttention

    model = build_model(tiny_model_cfg(**llama_overrides()))
    attn = next(m for m in model.modules() if isinstance(m, SDPACoreAttention))
    heads, groups = attn.heads_per_partition, attn.groups_per_partition
    assert heads > groups > 0
    lengths = [5, 1, 9, 3, 0, 6]  # an empty segment is legal in cu_seqlens
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    t, d = sum(lengths), 8
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(t, n, d, generator=g) for n in (heads, groups, groups))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)

    def run(thd):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        if thd:
            out = attn(q, k, v, None, packed_seq_params=params)
        else:
            seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
            out = attn(q[:, None], k[:, None], v[:, None], packed_attention_mask(seg))
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        return out, q.grad, k.grad, v.grad

    per_segment, masked = run(True), run(False)
    assert per_segment[0].shape == (t, 1, heads * d)
    for a, b in zip(per_segment, masked):
        # fp32, per-segment softmax against a masked one over the whole row (other sums): measured 6.6e-7 on
        # values up to ~4; a masked-out key leaking in would change outputs by ~1e-1
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cover 24 tokens, q has 23"):
        attn(q0[:-1], k0[:-1], v0[:-1], None, packed_seq_params=params)
    assert model._thd({"segment_ids": torch.zeros(1, 4, dtype=torch.long)})  # the local spec's default
