"""Turn a user question into the exact prompt text the model was trained on, and know where to stop."""
from __future__ import annotations

from typing import Mapping, Optional, Union

from nemo_neva.data.conversation import STEERLM_INFERENCE_DEFAULTS, get_template, render_prompt
from nemo_neva.data.processor import place_media_tags


def build_prompt(template: str, question: str, has_image: Union[bool, int], system: Optional[str] = None,
                 steerlm: Optional[Mapping[str, int]] = None, tokenizer=None,
                 has_video: Union[bool, int] = False) -> str:
    """One-turn generation prompt; the image tags go first (LLaVA style) unless the question places them
    (`data.processor.place_media_tags`; `has_image` / `has_video`: True or how many). `tokenizer`: for
    conv_template=hf_chat_template (its own chat template). A `<video>` tag is expanded into the video's
    frames by the processor.

    For `nv_steerlm`, `steerlm` attributes (validated: known names, ints 0-9) are laid over the NGC card's
    inference defaults and rendered as the `<extra_id_2>` label line; other templates have no such line.
    """
    question = place_media_tags(question, int(has_image), int(has_video))
    return render_prompt(template, [{"from": "human", "value": question}], system=system, attributes=steerlm,
                         steerlm_defaults=STEERLM_INFERENCE_DEFAULTS, tokenizer=tokenizer)


def stop_markers(tokenizer, template: str) -> tuple[set, list]:
    """(token ids, strings) that end a reply: the template's end marker and the tokenizer's EOS."""
    end = get_template(template).reply_end
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    special = set(tokenizer.all_special_tokens)
    marker_ids = [tokenizer.convert_tokens_to_ids(t) for t in special if t in end]
    ids.update(i for i in marker_ids if i is not None)
    strings = [] if marker_ids or not end else [end]  # e.g. `plain` ends a caption with "\n"; hf: EOS only
    return ids, strings
