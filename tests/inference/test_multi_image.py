"""Several images in one prompt: each `<image>` tag takes the next image, in order. Oracle: transformers'
LlavaForConditionalGeneration.generate on the exported weights with the same two images (HF LLaVA expands
each image token to its feature run and fills them in order too); and batching / caching do not change it."""
import pytest
import torch

from nemo_neva import build_model
from nemo_neva.export.hf import export_neva_to_hf
from nemo_neva.inference.generate import encode_prompt, generate, generate_tokens

from tests.model.helpers import llama_overrides, tiny_model_cfg

PROMPT = "<image>\nFirst. <image>\nSecond. Which has more shapes?"


@pytest.fixture(scope="module")
def model():
    """The conftest's tiny LLaMA-style model with room for two images (2 x 16 tokens) and an answer."""
    torch.manual_seed(2)
    return build_model(tiny_model_cfg(**llama_overrides(), encoder_seq_length=128))


@pytest.fixture(scope="module")
def two_images():
    g = torch.Generator().manual_seed(9)
    return [torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)]


def test_two_images_greedy_tokens_match_hf_generate(model, two_images, tmp_path):
    from transformers import LlavaForConditionalGeneration

    export_neva_to_hf(model, str(tmp_path))
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = encode_prompt(model, PROMPT, two_images)[None]
    assert int((ids == model.image_token_id).sum()) == 2 * model.tokens_per_image
    theirs = hf.generate(input_ids=ids, pixel_values=torch.stack(two_images), max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    ours = generate_tokens(model, [two_images], [PROMPT], max_new_tokens=10, stop_token_ids=[])[0]
    assert ours == theirs
    # logits too (fp32, different kernels: 1e-4, measured 0.0 here), and the order matters: the first tag took the first image
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=torch.stack(two_images)).logits[0]
        mine = model.model(ids, pos, images=torch.stack(two_images), runtime_gather_output=True)[0, :, :ref.shape[-1]]
        swapped = model.model(ids, pos, images=torch.stack(two_images[::-1]),
                              runtime_gather_output=True)[0, :, :ref.shape[-1]]
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(swapped, mine, atol=1e-3)


def test_multi_image_requests_batch_with_others_and_the_cache_changes_nothing(model, two_images):
    single, kw = two_images[0], dict(max_new_tokens=8, stop_token_ids=[])
    requests = ([two_images, None, single, two_images[::-1]],
                [PROMPT, "Hello there", "<image>\nWhat colour?", PROMPT])
    alone = [generate_tokens(model, [im], [p], **kw)[0] for im, p in zip(*requests)]
    assert generate_tokens(model, *requests, **kw) == alone
    assert generate_tokens(model, *requests, use_cache=False, **kw) == alone
    # rows that finish leave the batch; the remaining rows keep their own images (each row's answer is its
    # one-at-a-time answer cut at the first stop token)
    stop = alone[0][3]
    cut = [a[:a.index(stop)] if stop in a else a for a in alone]
    assert len({len(c) for c in cut}) > 1  # rows really finish at different steps
    assert generate_tokens(model, *requests, max_new_tokens=8, stop_token_ids=[stop]) == cut


def test_tag_and_image_counts_must_agree(model, two_images):
    with pytest.raises(ValueError, match="exactly 2 '<image>' tag"):
        generate(model, [two_images], ["<image>\nonly one tag"])
    with pytest.raises(ValueError, match="exactly 1 '<image>' tag"):
        generate(model, [two_images[0]], [PROMPT])
