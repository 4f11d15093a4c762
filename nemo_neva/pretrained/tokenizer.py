"""The pretrained LM's own tokenizer, made ready for NeVA: `<image>` and the conversation template's markers the
LM lacks become special tokens (single ids), and a pad token exists. The model's embedding and output rows of
the added ids start at the mean of the checkpoint's rows (`hf_lm.load_lm(added_rows=...)`); the vocabulary is
padded for TP as for any NeVA model.
"""
from __future__ import annotations

from nemo_neva.data.constants import IMAGE_TOKEN


def prepare_tokenizer(path: str, vocab_size: int, template: str | None, where: str):
    """(tokenizer, added token strings, size before adding) for the tokenizer folder `path`."""
    from nemo_neva.data.conversation import template_markers
    from nemo_neva.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

    tok = load_tokenizer(path)
    if not tok.is_fast:
        raise ValueError(f"{path}: a slow (Python) tokenizer; nemo_neva needs a fast one (tokenizer.json) for "
                         "character offsets")
    before = len(tok)
    if before > vocab_size:
        raise ValueError(f"the tokenizer at {path} has {before} tokens but {where} has only {vocab_size} vocabulary "
                         "rows (config.json vocab_size): they do not belong together")
    wanted = [IMAGE_TOKEN] + template_markers(template, SPECIAL_TOKENS[2:]) if template else [IMAGE_TOKEN]
    vocab = tok.get_vocab()
    missing = [t for t in dict.fromkeys(wanted) if t not in vocab]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:  # batches are padded (the loss mask hides it); reuse an existing token
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok, missing, before
