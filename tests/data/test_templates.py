"""Templates: exact formats, label masks decode to exactly the replies, SteerLM attributes."""
import pytest
import torch

from neva_data_helpers import conv, json_dataset, write_json
from nemo_neva.data.constants import IGNORE_INDEX, IMAGE_TOKEN
from nemo_neva.data.conversation import (CHAT_SYSTEM, TEMPLATE_NAMES, ConversationError, render,
                                         render_prompt)

END = {"plain": "\n", "vicuna_v1": "</s>", "llama_2": " </s>", "llama_3": "<|eot_id|>", "mistral": "</s>",
       "chatml": "<|im_end|>", "nvgpt": "\n<extra_id_1>", "nv_steerlm": "\n<extra_id_1>"}
# The space between a prompt and its reply is the reply's (its first word's token carries it), so the generation
# prompt ends before it ("... ASSISTANT:", as LLaVA's) and training and generation tokenise the prompt alike.
LEAD = {"vicuna_v1": " ", "llama_2": " ", "mistral": " "}
STEER_DEFAULT = ("<extra_id_2>quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,"
                 "coherence:4,complexity:4,verbosity:4\n")


def trained_runs(item, tok):
    """Decoded text of each contiguous run of trainable labels."""
    mask = (item["labels"] != IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        if not m and start is not None:
            ids = item["input_ids"][start:i]
            assert torch.equal(ids, item["labels"][start:i])  # labels are the tokens themselves, unshifted
            runs.append(tok.decode(ids, skip_special_tokens=False))
            start = None
    return runs


def test_all_templates_listed():
    assert set(TEMPLATE_NAMES) == set(END)


@pytest.mark.parametrize("name", sorted(END))
def test_trainable_tokens_are_exactly_the_replies(name, tok, proc, tmp_path, image_dir):
    if name == "plain":
        turns = conv("<image>", "a red square at the top")
        replies = ["a red square at the top"]
    else:
        turns = conv("<image>\nWhat colour is it?", "red", "And its shape, please?", "a square. Sure!")
        replies = ["red", "a square. Sure!"]
    path = write_json(tmp_path / "d.json", [{"id": "s0", "image": "red.png", "conversations": turns}])
    ds = json_dataset(path, str(image_dir), tok, proc, template=name, seq_length=512, tokens_per_image=5)
    item = ds[0]
    assert trained_runs(item, tok) == [LEAD.get(name, "") + r + END[name] for r in replies]
    assert (item["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == 5


@pytest.mark.parametrize("name", sorted(END))
def test_generation_prompt_is_the_training_prefix(name):
    turns = conv("q1", "a1", "q2", "a2")
    full = "".join(t for t, _ in render(name, turns))
    prompt = render_prompt(name, turns[:3])
    assert full.startswith(prompt)
    assert full[len(prompt):] == LEAD.get(name, "") + "a2" + END[name] + ("\n" if name == "chatml" else "")
    assert not prompt.endswith(" ")


def test_nvgpt_exact_format():
    got = "".join(t for t, _ in render("nvgpt", conv("Hi?", "Hello.", "Bye?", "Bye.")))
    assert got == (f"<extra_id_0>System\n{CHAT_SYSTEM}\n\n<extra_id_1>User\nHi?\n<extra_id_1>Assistant\n"
                   "Hello.\n<extra_id_1>User\nBye?\n<extra_id_1>Assistant\nBye.\n<extra_id_1>")
    assert CHAT_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The "
                           "assistant gives helpful, detailed, and polite answers to the user's questions.")


def test_nv_steerlm_exact_format_and_attributes():
    got = "".join(t for t, _ in render("nv_steerlm", conv("Hi?", "Hello."), system="S"))
    assert got == f"<extra_id_0>System\nS\n\n<extra_id_1>User\nHi?\n<extra_id_1>Assistant\n{STEER_DEFAULT}Hello.\n<extra_id_1>"
    # sample attributes override the defaults, keep their order; a turn's own label wins
    turns = conv("a", "b", "c", "d")
    turns[3]["label"] = "quality:2,humor:9"
    segs = render("nv_steerlm", turns, attributes={"quality": 9, "violence": 1})
    labels = [t for t, _ in segs if t.startswith("<extra_id_2>")]
    assert labels[0] == STEER_DEFAULT.replace("quality:4", "quality:9")[:-1] + ",violence:1\n"
    assert labels[1].startswith("<extra_id_2>quality:2,toxicity:0,humor:9,")
    prompt = render_prompt("nv_steerlm", conv("q"), attributes="quality:9,toxicity:0")
    assert prompt.endswith("<extra_id_1>Assistant\n" + STEER_DEFAULT.replace("quality:4", "quality:9"))


@pytest.mark.parametrize("attrs,needle", [({"sarcasm": 3}, "sarcasm"), ({"quality": 10}, "quality"),
                                          ({"humor": True}, "humor"), ("quality:x", "quality"),
                                          ("quality", "quality")])
def test_steerlm_attribute_validation(attrs, needle):
    with pytest.raises(ValueError, match=needle):
        render("nv_steerlm", conv("q", "a"), attributes=attrs)


def test_vicuna_v1_format():
    got = "".join(t for t, _ in render("vicuna_v1", conv("q1", "a1", "q2", "a2"), system="SYS"))
    assert got == "<s>SYS USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"


def test_plain_format_masks_the_image_part():
    segs = render("plain", conv("Describe this.\n<image>", "a cat"))
    assert segs == [("<image>", False), ("a cat\n", True)]


def test_plain_keeps_every_media_tag_in_order():
    segs = render("plain", conv("Compare <video> with <image> and <image>.", "same"))
    assert segs == [("<video><image><image>", False), ("same\n", True)]
    assert render_prompt("plain", conv("<image>\n<video>\nWhich way?")) == "<image><video>"


def test_roles_and_order():
    ok = [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]
    assert render("chatml", ok) == render("chatml", conv("q", "a"))
    with pytest.raises(ConversationError, match="'robot'") as e:
        render("chatml", [{"from": "robot", "value": "q"}])
    assert e.value.reason == "unknown_role"
    with pytest.raises(ConversationError, match="bad_turn_order"):
        render("chatml", conv("q", "a")[::-1])
    with pytest.raises(ValueError, match="unknown conversation template"):
        render("nope", conv("q", "a"))


def test_tokenizer_special_tokens_and_no_auto_bos(tok):
    from nemo_neva.data.tokenizer import SPECIAL_TOKENS

    for t in SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    ids = tok("hello", add_special_tokens=True)["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    text = "Grüße 🙂\t<image> [INST] x\r\n"  # byte-level: anything round-trips
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=False) == text
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
