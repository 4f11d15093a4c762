"""The exported chat template prompts the model exactly as nemo_neva renders its conversation template.

Oracle: nemo_neva's own rendering (`render_prompt` / `render`, tokenised as generation and training tokenise) of a
multi-turn conversation with images; the exported folder's tokenizer and processor (`apply_chat_template`, the
call engines make for /v1/chat/completions) must give the same token ids, with the image parts of OpenAI-style
content lists where the turns' `<image>` tags stand.
"""
import json
import os

import pytest
from omegaconf import open_dict

from nemo_neva import build_model
from nemo_neva.data.conversation import STEERLM_INFERENCE_DEFAULTS, TEMPLATE_NAMES, render, render_prompt
from nemo_neva.data.tokenizer import encode_text
from nemo_neva.export.hf import export_neva_to_hf
from nemo_neva.inference.prompting import stop_markers
from tests.model.helpers import llama_overrides, tiny_model_cfg

TURNS = [{"from": "human", "value": "<image>\nWhat is in it?"}, {"from": "gpt", "value": "A red square."},
         {"from": "human", "value": "<image>\nAnd in this one, left of the {x}?"}]
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it?"}]},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "And in this one, left of the {x}?"}]}]


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_model_cfg(**llama_overrides()))


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_exported_chat_template_gives_nemo_nevas_token_ids(template, system, model, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer

    with open_dict(model.cfg):
        model.cfg.data.conv_template = template
    out = export_neva_to_hf(model, str(tmp_path / "hf"))
    tok, processor = AutoTokenizer.from_pretrained(out), AutoProcessor.from_pretrained(out)
    head = [{"role": "system", "content": system}] if system else []
    kw = dict(system=system, steerlm_defaults=STEERLM_INFERENCE_DEFAULTS)

    text = render_prompt(template, TURNS, **kw)
    ours = encode_text(model.tokenizer, text)
    assert tok.apply_chat_template(head + MESSAGES, add_generation_prompt=True, tokenize=True,
                                   return_dict=False) == ours
    # the processor (whose own tokenising would also expand the image tags) carries the same template
    assert processor.apply_chat_template(head + MESSAGES, add_generation_prompt=True, tokenize=False) == text
    # a string content (the tag written in the text) renders the same
    as_text = [{**m, "content": "<image>\n" + m["content"][1]["text"]} if isinstance(m["content"], list) else m
               for m in MESSAGES]
    assert tok.apply_chat_template(head + as_text, add_generation_prompt=True, tokenize=True,
                                   return_dict=False) == ours
    # the whole conversation (training text) too: reply and end marker where render puts them
    full = "".join(t for t, _ in render(template, TURNS[:2], **kw))
    assert tok.apply_chat_template(head + MESSAGES[:2], tokenize=False) == full

    stops, _ = stop_markers(model.tokenizer, template)
    eos = json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"]
    assert sorted(eos if isinstance(eos, list) else [eos]) == sorted(stops)
