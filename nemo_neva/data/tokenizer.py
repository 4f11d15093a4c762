"""A small byte-level BPE tokenizer for the demo, trained locally (no downloads).

BOS/EOS policy: the tokenizer never inserts BOS or EOS by itself (no post-processor). A chat template
that wants them writes them as text (`<s>`, `</s>`, `<|begin_of_text|>`), so the token stream is exactly
what the template renders and segment-by-segment tokenization stays label-exact.
"""
from __future__ import annotations

import os
import re
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nemo_neva.data.constants import IMAGE_TOKEN

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# Every marker a template in conversation.py emits must be a single token, so they are all special.
SPECIAL_TOKENS = [
    PAD, UNK, BOS, EOS, IMAGE_TOKEN, "<extra_id_0>", "<extra_id_1>", "<extra_id_2>",
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>",
]


def train_demo_tokenizer(texts: Iterable[str], out_dir: str | None = None,
                         vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on `texts`; save it to `out_dir` when given."""
    tok = Tokenizer(models.BPE(unk_token=None))
    # No prefix space: decode(encode(x)) == x exactly, which the dataset's round-trip check relies on.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Special tokens are matched whole at encode time; cut them out so no merges are spent on them.
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    pieces = [p for text in texts for p in split.split(text) if p]
    tok.train_from_iterator(pieces, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[4:], clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str):
    """Load a tokenizer from a local directory only (never the Hub)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
