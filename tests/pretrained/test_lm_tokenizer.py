"""The LLM's own tokenizer through data and generation: a SentencePiece/Metaspace tokenizer's samples are used
(not skipped as tokenization_mismatch), labels are exactly the reply characters, and training and generation
give the same ids for the same prompt (the whole text is tokenised in one call, labels from offsets)."""
import os

import pytest
import torch

from nemo_neva import build_model
from nemo_neva.data.constants import IGNORE_INDEX
from nemo_neva.data.dataset import NevaDataset
from nemo_neva.data.settings import DatasetSettings
from nemo_neva.inference.generate import encode_prompt
from nemo_neva.inference.prompting import build_prompt
from tests.pretrained.lm_helpers import CHATML, ROOT, make_tiny_lm, neva_cfg

IMAGES = os.path.join(ROOT, "data", "shapes_demo", "images")
QUESTION = "<image>\nWhat colour is the shape? Answer with one word."
RECORD = {"id": "s0", "image": "train_00000.png",
          "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "The shape is red."},
                            {"from": "human", "value": "And its position?"}, {"from": "gpt", "value": "top left"}]}


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    """A NeVA whose LM (and tokenizer: Metaspace, byte fallback, with a chatml chat template) is a tiny Llama."""
    path = str(tmp_path_factory.mktemp("lm") / "llama")
    make_tiny_lm("llama", path, chat_template=CHATML)
    return build_model(neva_cfg(path, **{"data.conv_template": "chatml"}))


def _dataset(tmp_path, model, template):
    import json

    data = tmp_path / "d.json"
    data.write_text(json.dumps([RECORD]))
    return NevaDataset(str(data), model.processor,
                       DatasetSettings(256, template, strict=True, image_folder=IMAGES))


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_2", "chatml", "hf_chat_template"])
def test_metaspace_sample_is_used_and_labels_are_the_replies(template, llama_model, tmp_path):
    tok = llama_model.tokenizer
    assert type(tok.backend_tokenizer.pre_tokenizer).__name__ == "Metaspace"
    ds = _dataset(tmp_path, llama_model, template)  # strict: a tokenization_mismatch would raise
    assert len(ds) == 1 and not ds.skip_counts
    item = ds[0]
    trained = item["labels"] != IGNORE_INDEX
    # the trained tokens' own strings (decode would drop the first token's ▁): exactly the reply characters
    text = "".join(tok.convert_ids_to_tokens(item["input_ids"][trained].tolist())).replace("\u2581", " ")
    end = {"vicuna_v1": "</s>", "llama_2": " </s>", "chatml": "<|im_end|>", "hf_chat_template": "<|im_end|>"}[template]
    lead = " " if template in ("vicuna_v1", "llama_2") else ""  # the space before a reply is its first token's
    want = lead + "The shape is red." + end + lead + "top left" + end
    assert text == want, (text, want)
    assert torch.equal(item["labels"][trained], item["input_ids"][trained])


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_2", "chatml", "hf_chat_template"])
def test_training_and_generation_tokenise_the_prompt_alike(template, llama_model, tmp_path):
    item = _dataset(tmp_path, llama_model, template)[0]
    first_label = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
    prompt = build_prompt(template, QUESTION, has_image=True, tokenizer=llama_model.tokenizer)
    generated = encode_prompt(llama_model, prompt, True)
    assert torch.equal(generated, item["input_ids"][:first_label])


def test_demo_tokenizer_vicuna_prompt_is_the_training_prefix(tmp_path):
    """The byte-level demo tokenizer: "<s>{system} USER:" used to be tokenised in two pieces for training."""
    from tests.model.helpers import tiny_model_cfg

    model = build_model(tiny_model_cfg())
    item = _dataset(tmp_path, model, "vicuna_v1")[0]
    first_label = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
    generated = encode_prompt(model, build_prompt("vicuna_v1", QUESTION, has_image=True), True)
    assert torch.equal(generated, item["input_ids"][:first_label])


def test_template_markers_the_lm_lacks_become_single_tokens(llama_model):
    tok = llama_model.tokenizer
    assert list(llama_model.cfg.hf.added_tokens) == ["<image>", "<|im_start|>", "<|im_end|>"]
    for marker in ("<image>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1, marker
    assert tok.pad_token is not None
