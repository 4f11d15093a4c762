"""TextStream on the project tokenizer: deltas add up, stop strings are cut wherever they end."""
import os

import pytest
from transformers import AutoTokenizer

from nemo_neva.inference.text_stream import TextStream
from tests.model.helpers import ROOT

TEXT = "The red square sits left of a blue circle."


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(os.path.join(ROOT, "data", "tokenizer"))


def _stream(tok, stops):
    stream, out, stopped = TextStream(tok, stops), "", False
    for token in tok(TEXT, add_special_tokens=False)["input_ids"]:
        delta, stopped = stream.push(token)
        out += delta
        if stopped:
            break
    return out if stopped else out + stream.flush(), stopped


def test_deltas_join_to_the_text(tok):
    assert _stream(tok, []) == (tok.decode(tok(TEXT, add_special_tokens=False)["input_ids"]), False)


@pytest.mark.parametrize("stop", ["squ", "left", " of a b", "."])
def test_stop_string_is_cut_even_inside_a_token(tok, stop):
    text, stopped = _stream(tok, ["never-there", stop])
    assert stopped and text == TEXT[:TEXT.index(stop)]
