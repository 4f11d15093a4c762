"""The exported folder's chat template and stop ids: an engine's /v1/chat/completions prompts the model exactly as
`nemo_neva.data.conversation` rendered its training data.

The Jinja is generated from the conversation template itself: each text piece of `Template` (begin, user turn at
the first / a later turn, with / without a system prompt) is rendered with marker strings for the question and
the system prompt, and the markers become Jinja variables; everything else is emitted as string literals (so the
engines' trim_blocks / lstrip_blocks settings cannot eat a newline). A message's content is a string or a list of
parts (OpenAI / transformers style): an image part becomes `<image>\n` where it stands, as `build_prompt` puts the
tag before the question. A generation prompt drops the trailing spaces of the last user turn, as `render_prompt`
does (they belong to the reply). nv_steerlm renders its label line with the inference defaults `build_prompt`
uses. hf_chat_template keeps the tokenizer's own template.
"""
from __future__ import annotations

import json
import re
from typing import Optional

from nemo_neva.data.constants import IMAGE_TOKEN
from nemo_neva.data.conversation import (HF_CHAT_TEMPLATE, STEERLM_INFERENCE_DEFAULTS, get_template,
                                         parse_attributes, steerlm_label)

_SYS, _Q = "\x00system\x00", "\x00content\x00"


def _lit(text: str) -> str:
    # JSON escapes (\n, \", \uXXXX) are also Jinja string-literal escapes
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _piece(text: str, strip_end: bool = False) -> str:
    """Jinja for a rendered piece holding the markers; `strip_end`: without its trailing spaces."""
    if strip_end:
        text = text.rstrip(" ")
    out = []
    for part in re.split(f"({re.escape(_SYS)}|{re.escape(_Q)})", text):
        out.append("{{ system }}" if part == _SYS else "{{ ns.content }}" if part == _Q else _lit(part))
    return "".join(out)


def _branches(pieces: dict, strip_end: bool) -> str:
    """An if-chain over (first turn?, system prompt?) for the user-turn pieces."""
    conds = []
    for (first, has_sys), text in pieces.items():
        cond = " and ".join([("turn == 0" if first else "turn > 0"), ("system" if has_sys else "not system")])
        conds.append((cond, _piece(text, strip_end)))
    out = ""
    for k, (cond, body) in enumerate(conds):
        out += ("{%- if " if k == 0 else "{%- elif ") + cond + " -%}" + body
    return out + "{%- endif -%}"


def chat_template(name: str) -> Optional[str]:
    """Jinja chat template rendering conversation template `name`; None for hf_chat_template (the tokenizer's)."""
    if name == HF_CHAT_TEMPLATE:
        return None
    tpl = get_template(name)
    for has_sys in (_SYS, None):  # the turn index matters only as first / later (checked, not assumed)
        if tpl.user(_Q, 1, has_sys) != tpl.user(_Q, 2, has_sys):
            raise ValueError(f"conversation template {name!r} renders later turns differently from each other")
    if name == "plain":  # a user turn is its image tags alone (or its text when it has none)
        user = ("{%- if " + json.dumps(IMAGE_TOKEN) + " in ns.content -%}{{ " + json.dumps(IMAGE_TOKEN)
                + " * ns.content.count(" + json.dumps(IMAGE_TOKEN) + ") }}{%- else -%}{{ ns.content }}{%- endif -%}")
        user_last = user
    else:
        pieces = {(first, has_sys is not None): tpl.user(_Q, 0 if first else 1, has_sys)
                  for first in (True, False) for has_sys in (_SYS, None)}
        user, user_last = _branches(pieces, False), _branches(pieces, True)
    label = _lit(steerlm_label(parse_attributes(None, STEERLM_INFERENCE_DEFAULTS))) if tpl.steerlm else ""
    begin_sys, begin_none = _piece(tpl.begin(_SYS)), _piece(tpl.begin(None))
    default_system = json.dumps(tpl.default_system) if tpl.default_system is not None else "none"
    image = json.dumps(IMAGE_TOKEN + "\n")
    return "".join([
        "{#- nemo_neva conversation template " + name + " -#}",
        "{%- set ns = namespace(content='', system=" + default_system + ") -%}",
        "{%- set loop_messages = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}",
        "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') -%}{%- endif -%}",
        "{%- set loop_messages = messages[1:] -%}{%- endif -%}",
        "{%- set system = ns.system -%}",
        "{%- if system -%}" + begin_sys + "{%- else -%}" + begin_none + "{%- endif -%}",
        "{%- for message in loop_messages -%}",
        "{%- set ns.content = '' -%}",
        "{%- if message['content'] is string -%}{%- set ns.content = message['content'] -%}",
        "{%- else -%}{%- for part in message['content'] -%}",
        "{%- if part['type'] in ('image', 'image_url') -%}{%- set ns.content = ns.content + " + image + " -%}",
        "{%- elif part['type'] == 'text' -%}{%- set ns.content = ns.content + part['text'] -%}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        "{%- set turn = loop.index0 // 2 -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- if loop.last and add_generation_prompt -%}" + user_last + label + "{%- else -%}" + user + "{%- endif -%}",
        "{%- elif message['role'] == 'assistant' -%}",
        label + "{{ ns.content }}" + _lit(tpl.reply_end) + _lit(tpl.after_reply),
        "{%- endif -%}",
        "{%- endfor -%}",
    ])


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """The ids that end a reply (the template's end marker, EOS): generation_config.json's eos_token_id."""
    from nemo_neva.inference.prompting import stop_markers

    ids, _ = stop_markers(tokenizer, template)
    return sorted(int(i) for i in ids)
