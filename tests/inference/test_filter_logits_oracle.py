"""`filter_logits` (temperature, top-k, top-p) against transformers' own warpers, applied in the order `generate`
applies them (temperature, then top-k, then top-p), on random logits: smooth ones, and integer ones full of ties."""
import itertools

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from nemo_neva.inference.sampling import filter_logits

VOCAB = 50
# top_p values off any round number: a nucleus edge that lands exactly on a cumulative sum would be decided by
# the last bit of two summation orders, which says nothing about either implementation.
SETTINGS = list(itertools.product((0.3, 1.0, 1.7), (0, 1, 7, VOCAB, 80), (1.0, 0.0513, 0.437, 0.9137)))


def hf_filter(logits, temperature, top_k, top_p):
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores


def _probs(logits):
    return logits.softmax(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_smooth_logits_keep_the_same_tokens_with_the_same_probabilities(temperature, top_k, top_p):
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(top_k), dtype=torch.float64) * 3
    ours, theirs = filter_logits(logits, temperature, top_k, top_p), hf_filter(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    # both float64; ours subtracts the row maximum first (softmax is invariant to it): only rounding differs,
    # measured at most 8e-16 over these settings
    torch.testing.assert_close(_probs(ours), _probs(theirs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_tied_logits_keep_the_same_values(temperature, top_k, top_p):
    """Integer logits in [-3, 3]: every row is full of ties. Top-k keeps every token tied with the k-th in both.
    At a top-p edge that cuts through a run of equal tokens, which of them stays is the sort's choice in both
    libraries; what must agree is how many stay, their values, and every token strictly above or below the edge."""
    g = torch.Generator().manual_seed(100 + top_k)
    logits = torch.randint(-3, 4, (64, VOCAB), generator=g).double()
    ours, theirs = filter_logits(logits, temperature, top_k, top_p), hf_filter(logits, temperature, top_k, top_p)
    kept_ours, kept_theirs = torch.isfinite(ours), torch.isfinite(theirs)
    assert torch.equal(kept_ours.sum(-1), kept_theirs.sum(-1))
    for row in range(logits.shape[0]):
        assert sorted(logits[row][kept_ours[row]].tolist()) == sorted(logits[row][kept_theirs[row]].tolist())
        edge = logits[row][kept_ours[row]].min()
        off_edge = logits[row] != edge
        assert torch.equal(kept_ours[row][off_edge], kept_theirs[row][off_edge])
    if top_p == 1.0:  # no nucleus: no edge choice, the masks agree token for token
        assert torch.equal(kept_ours, kept_theirs)
    # probabilities of the kept tokens, compared as sorted rows (ties may sit at different token ids)
    p_ours, p_theirs = _probs(ours).sort(-1).values, _probs(theirs).sort(-1).values
    torch.testing.assert_close(p_ours, p_theirs, rtol=0, atol=1e-12)  # float64 rounding: measured 2e-16


def test_float32_logits_from_the_model_agree_too():
    """The decoding loop hands float32 logits; ours computes in float64, transformers in the input's float32."""
    logits = torch.randn(256, 1000, generator=torch.Generator().manual_seed(5)) * 4
    for temperature, top_k, top_p in ((0.7, 40, 0.9137), (1.3, 0, 0.437), (1.0, 5, 1.0)):
        ours, theirs = filter_logits(logits, temperature, top_k, top_p), hf_filter(logits, temperature, top_k, top_p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
        # float32 softmax of 1000 terms against float64: measured at most 3.6e-7
        torch.testing.assert_close(_probs(ours).float(), _probs(theirs), rtol=0, atol=1e-6)
