"""Generation prompts: the exact training-time text, SteerLM attributes of the NGC card, stop markers."""
import pytest

from nemo_neva.data.conversation import CHAT_SYSTEM, ConversationError
from nemo_neva.data.tokenizer import load_tokenizer
from nemo_neva.inference.prompting import build_prompt, stop_markers
from tests.model.helpers import ROOT

NGC = "<extra_id_2>quality:9,toxicity:0,humor:6,creativity:6,violence:0,helpfulness:6,not_appropriate:0\n"


def test_nv_steerlm_prompt_renders_the_ngc_attributes_by_default():
    prompt = build_prompt("nv_steerlm", "What is it?", has_image=True)
    assert prompt == (f"<extra_id_0>System\n{CHAT_SYSTEM}\n\n<extra_id_1>User\n<image>\nWhat is it?\n"
                      f"<extra_id_1>Assistant\n{NGC}")


def test_steerlm_overrides_are_validated():
    prompt = build_prompt("nv_steerlm", "Hi", has_image=False, steerlm={"humor": 0, "quality": 4})
    assert "quality:4,toxicity:0,humor:0," in prompt
    with pytest.raises(ConversationError, match="sarcasm"):
        build_prompt("nv_steerlm", "Hi", has_image=False, steerlm={"sarcasm": 3})
    with pytest.raises(ConversationError, match="0-9"):
        build_prompt("nv_steerlm", "Hi", has_image=False, steerlm={"quality": 12})


def test_image_tag_without_image_is_refused():
    with pytest.raises(ValueError, match="no image"):
        build_prompt("nvgpt", "<image> what?", has_image=False)


def test_stop_markers_follow_the_template():
    tok = load_tokenizer(f"{ROOT}/data/tokenizer")
    ids, strings = stop_markers(tok, "nvgpt")
    assert tok.convert_tokens_to_ids("<extra_id_1>") in ids and tok.eos_token_id in ids and strings == []
    ids, strings = stop_markers(tok, "plain")
    assert strings == ["\n"]


def test_generate_cli_rejects_bad_sampling_before_loading_anything(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, f"{ROOT}/examples/neva_generate.py", "neva_model_file=/nonexistent.nemo",
                           "prompt=hi", "inference.temperature=0.7", "inference.top_p=1.5"], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    # the bad top_p is reported, not the missing model file: validation ran first
    assert proc.returncode == 2 and "top_p" in proc.stderr and "Traceback" not in proc.stderr
