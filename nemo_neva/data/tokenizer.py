"""A small byte-level BPE tokenizer for the demo, trained locally (no downloads).

BOS/EOS policy: the tokenizer never inserts BOS or EOS by itself (no post-processor). A chat template
that wants them writes them as text (`<s>`, `</s>`, `<|begin_of_text|>`), so the token stream is exactly
what the template renders.

`encode_segments` / `encode_text` are how training and generation tokenise (any fast tokenizer: byte-level
BPE, SentencePiece/Metaspace): the whole text in one call, labels from character offsets, so the same prompt
gives the same ids in both.
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


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as one piece (`<image>` and template markers are special tokens: one id each)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_segments(tokenizer, segments) -> tuple[list[int], list[bool], str]:
    """(ids, trainable per id, text) for rendered `(text, trainable)` segments: the concatenated text is
    tokenised in one call (as generation tokenises a prompt), and a token is trainable when its characters
    (offset mapping) overlap a trainable segment's."""
    text = "".join(t for t, _ in segments)
    spans, pos = [], 0
    for piece, trainable in segments:
        if trainable and piece:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    flags, k = [], 0
    for start, end in enc["offset_mapping"]:  # offsets ascend: walk the spans once
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        flags.append(k < len(spans) and (spans[k][0] < end if end > start else spans[k][0] <= start))
    return enc["input_ids"], flags, text


def load_tokenizer(path: str):
    """Load a tokenizer from a local directory only (never the Hub)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
