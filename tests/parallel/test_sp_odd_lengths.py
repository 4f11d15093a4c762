"""Sequence parallelism on batches of any length: TP=2 + SP trains 20 steps on odd-length batches (torchrun, 2
processes, gloo) with the per-step losses of an unpadded TP=1 run.

Collated batches are as long as their longest sample; megatron-core's SP scatter needs S % TP == 0. The step
pads each batch (`megatron_step.pad_sequence_to_multiple`) with loss-free positions, so the loss, its token
count and the gradients are those of the unpadded batch.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_neva.parallel.init import free_port
from nemo_neva.training import megatron_step as mt
from tests.model.helpers import ROOT, batch_for, tiny_model_cfg

WORKER = os.path.join(ROOT, "tests", "parallel", "scripts", "sp_train_worker.py")
STEPS = 20


def _odd_batches(model, steps):
    """`steps` batches of 4 rows, each of its own odd length (the padding a collator leaves: loss-free tails)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for step in range(steps):
        seq = 2 * int(torch.randint(20, 31, (1,), generator=g)) + 1  # 41..61 tokens
        batch = batch_for(model, n=4, seq=seq, seed=step)
        batch["loss_mask"][torch.arange(4), -1 - torch.arange(4)] = 0  # rows end at different places
        out.append(batch)
    return out


def test_tp2_sequence_parallel_trains_odd_lengths_with_the_unpadded_loss(tmp_path):
    from nemo_neva import MegatronNevaModel, build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(global_batch_size=4, micro_batch_size=2))
    nemo = str(tmp_path / "model.nemo")
    model.save_to(nemo)
    batches = _odd_batches(model, STEPS)
    assert all(b["tokens"].shape[1] % 2 for b in batches)
    torch.save(batches, str(tmp_path / "batches.pt"))

    reference = MegatronNevaModel.restore_from(nemo)  # one process, TP=1: no padding
    optimizer = reference.configure_optimizers()
    expected_sums = [reference._run_batch(b, forward_only=True).tolist() for b in batches[:3]]
    expected = [float(reference.train_on_batch(b, optimizer)) for b in batches]

    out = str(tmp_path / "losses.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, nemo, str(tmp_path / "batches.pt"), out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.load(open(out))
    losses, sums = result["losses"], result["sums"]
    # the padding adds no loss token: the token counts are exactly the unpadded batches'
    assert [s[1] for s in sums] == [s[1] for s in expected_sums]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    # fp32 on both sides; TP=2 splits the GEMMs' reductions (another summation order): measured max |diff|
    # 1e-6 over the 20 steps (loss ~6.5), so 1e-4 is ~100x that noise
    assert [s[0] for s in sums] == pytest.approx([s[0] for s in expected_sums], rel=1e-5)
    assert losses == pytest.approx(expected, abs=1e-4), (losses, expected)


@pytest.mark.parametrize("tp,sp,fp8,multiple", [(1, False, False, 1), (2, False, False, 1), (2, True, False, 2),
                                                (4, True, False, 4), (1, False, True, 8), (2, False, True, 8),
                                                (2, True, True, 16)])
def test_sequence_multiple(tp, sp, fp8, multiple):
    assert mt.sequence_multiple(tp, sp, fp8) == multiple


def test_padding_keeps_the_batch_and_its_packed_segments():
    from nemo_neva.data.packing import PackedCollator, cu_seqlens_from_segments

    ids = [torch.arange(5, 5 + n) for n in (4, 6, 3)]
    items = [{"input_ids": i, "labels": i.clone(), "id": k} for k, i in enumerate(ids)]
    packed = PackedCollator(pad_id=0)([[items[0], items[1]], [items[2]]])  # rows of 3+5 and 2 tokens -> S = 8
    out = mt.pad_sequence_to_multiple(packed, 16, pad_id=0)
    assert out["tokens"].shape == (2, 16)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        assert torch.equal(out[key][:, :8], packed[key]), key
    assert out["loss_mask"][:, 8:].sum() == 0 and out["labels"][:, 8:].sum() == 0
    assert torch.equal(out["position_ids"][:, 8:], packed["position_ids"][:, -1:].expand(2, 8))
    assert (out["segment_ids"][:, 8:] == packed["segment_ids"][:, -1:] + 1).all()  # a segment of its own
    assert torch.equal(out["cu_seqlens"], cu_seqlens_from_segments(out["segment_ids"]))
    mask = out["attention_mask"]  # True = masked: the old block unchanged, no real query sees the padding
    assert torch.equal(mask[..., :8, :8], packed["attention_mask"]) and mask[..., :8, 8:].all()
    assert not mask[..., 8:, :].all(-1).any()  # no fully masked row
    assert mt.pad_sequence_to_multiple(out, 16) is out  # already a multiple: untouched
