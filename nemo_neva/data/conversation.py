"""Chat templates: a conversation becomes ordered `(text, trainable)` segments.

Only assistant content plus its end marker is trainable. `render_prompt` returns exactly the text that
precedes an assistant reply in `render`, so what the model sees at generation time is what it was
trained on. Templates that want a BOS/EOS write it as text (the tokenizer adds none by itself).

Spaces between a prompt and its reply belong to the reply ("ASSISTANT: a" is "ASSISTANT:" + " a", LLaVA's
generation prompt): BPE and SentencePiece tokenizers glue a space to the word after it, so the whole rendered
conversation (tokenised in one call, see data/tokenizer.py) then has a token boundary exactly where the
generation prompt ends. `hf_chat_template` renders with the tokenizer's own chat template instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

from nemo_neva.data.constants import IMAGE_TOKEN, VIDEO_TOKEN

Segment = tuple[str, bool]
Turn = Mapping[str, str]

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")

# LLaVA-1.5's vicuna_v1 and NeMo's nvgpt share this default system prompt.
CHAT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# SteerLM attributes, 0-9. Training default = the label line NeMo's NeVA rendered; inference default =
# the NGC card's values. Rendering follows the defaults' order, extra attributes are appended.
STEERLM_TRAIN_DEFAULTS = {"quality": 4, "toxicity": 0, "humor": 0, "creativity": 0, "helpfulness": 4,
                          "correctness": 4, "coherence": 4, "complexity": 4, "verbosity": 4}
STEERLM_INFERENCE_DEFAULTS = {"quality": 9, "toxicity": 0, "humor": 6, "creativity": 6, "violence": 0,
                              "helpfulness": 6, "not_appropriate": 0}
STEERLM_ATTRIBUTES = tuple(dict.fromkeys([*STEERLM_TRAIN_DEFAULTS, *STEERLM_INFERENCE_DEFAULTS]))


class ConversationError(ValueError):
    """A conversation that cannot be rendered; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


Attributes = Union[Mapping[str, int], str, None]


def parse_attributes(attrs: Attributes, defaults: Mapping[str, int] | None = None) -> dict[str, int]:
    """Merge `attrs` ("k:v,..." or dict) over `defaults`; names must be known, values ints 0-9."""
    merged = dict(STEERLM_TRAIN_DEFAULTS if defaults is None else defaults)
    if isinstance(attrs, str):
        pairs = [p.split(":", 1) for p in attrs.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ConversationError("bad_attribute", f"cannot parse attribute string {attrs!r}")
        attrs = {k.strip(): v.strip() for k, v in pairs}
    for name, value in (attrs or {}).items():
        merged[name] = value
    for name, value in merged.items():
        if name not in STEERLM_ATTRIBUTES:
            raise ConversationError("bad_attribute", f"unknown SteerLM attribute {name!r}")
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
            raise ConversationError("bad_attribute", f"attribute {name!r}={value!r} is not an int 0-9")
        merged[name] = value
    return merged


def steerlm_label(attrs: Mapping[str, int]) -> str:
    return "<extra_id_2>" + ",".join(f"{k}:{v}" for k, v in attrs.items()) + "\n"


@dataclass(frozen=True)
class Template:
    """Text pieces around each turn; `reply_end` is the trainable end marker after assistant content."""
    name: str
    default_system: str | None
    begin: Callable[[str | None], str]            # system -> text before the first user turn
    user: Callable[[str, int, str | None], str]   # (question, turn index, system) -> text up to the reply
    reply_end: str
    after_reply: str = ""                         # untrainable text after the end marker (chatml's "\n")
    steerlm: bool = False


_MEDIA_TAG = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")


def _plain_user(q: str, i: int, s: str | None) -> str:
    """plain keeps a user turn's media tags only (every `<image>` and `<video>`, in order), else the text."""
    return "".join(_MEDIA_TAG.findall(q)) or q


def _llama2_user(q: str, i: int, s: str | None) -> str:
    # Meta's format: the system block lives inside the first [INST]; later turns restart with <s>.
    sys_block = f"<<SYS>>\n{s}\n<</SYS>>\n\n" if (s and i == 0) else ""
    return f"{'<s>' if i else ''}[INST] {sys_block}{q} [/INST] "


def _mistral_user(q: str, i: int, s: str | None) -> str:
    # Mistral has no system role: a system prompt is prepended to the first question.
    return f"[INST] {s}\n\n{q} [/INST] " if (s and i == 0) else f"[INST] {q} [/INST] "


def _llama3_begin(s: str | None) -> str:
    sys_block = f"<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>" if s else ""
    return "<|begin_of_text|>" + sys_block


def _llama3_user(q: str, i: int, s: str | None) -> str:
    return (f"<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _nv_begin(s: str | None) -> str:
    return f"<extra_id_0>System\n{s}\n\n<extra_id_1>"


def _nv_user(q: str, i: int, s: str | None) -> str:
    return f"User\n{q}\n<extra_id_1>Assistant\n"


TEMPLATES: dict[str, Template] = {t.name: t for t in [
    # LLaVA pretraining: "<image>{caption}\n"; the human text is replaced by its image tag(s) alone.
    Template("plain", None, lambda s: "", _plain_user, "\n"),
    Template("vicuna_v1", CHAT_SYSTEM, lambda s: f"<s>{s} ",
             lambda q, i, s: f"USER: {q} ASSISTANT: ", "</s>"),
    Template("llama_2", None, lambda s: "<s>", _llama2_user, " </s>"),
    Template("llama_3", None, _llama3_begin, _llama3_user, "<|eot_id|>"),
    Template("mistral", None, lambda s: "<s>", _mistral_user, "</s>"),
    Template("chatml", None, lambda s: f"<|im_start|>system\n{s}<|im_end|>\n" if s else "",
             lambda q, i, s: f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", "\n"),
    Template("nvgpt", CHAT_SYSTEM, _nv_begin, _nv_user, "\n<extra_id_1>"),
    Template("nv_steerlm", CHAT_SYSTEM, _nv_begin, _nv_user, "\n<extra_id_1>", steerlm=True),
]}
TEMPLATE_NAMES = tuple(TEMPLATES)
# The tokenizer's own chat template (`tokenizer.apply_chat_template`): an instruct LM finetuned in its own format.
HF_CHAT_TEMPLATE = "hf_chat_template"
_HF = Template(HF_CHAT_TEMPLATE, None, lambda s: "", lambda q, i, s: q, "")


def get_template(name: str) -> Template:
    if name == HF_CHAT_TEMPLATE:
        return _HF  # its end marker is the tokenizer's EOS (inference/prompting.py)
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: "
                         f"{', '.join(TEMPLATE_NAMES + (HF_CHAT_TEMPLATE,))}")
    return TEMPLATES[name]


def template_markers(name: str, candidates: Sequence[str]) -> list[str]:
    """The `candidates` (special marker strings) that template `name` writes; none for hf_chat_template."""
    if name == HF_CHAT_TEMPLATE:
        return []
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}] * 2
    text = "".join(t for t, _ in render(name, turns, system="s"))
    return [c for c in candidates if c in text]


def _normalise_turns(turns: Sequence[Turn]) -> list[tuple[str, str]]:
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ConversationError("bad_turn", f"turn {k} is not a {{'from', 'value': str}} mapping")
        role = turn.get("from", turn.get("role"))
        if role in USER_ROLES:
            role = "user"
        elif role in ASSISTANT_ROLES:
            role = "assistant"
        else:
            raise ConversationError("unknown_role", f"turn {k} has unknown role {role!r}")
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError("bad_turn_order", f"turn {k} is {role!r}, expected {expected!r}")
        out.append((role, turn["value"]))
    if not out:
        raise ConversationError("empty_conversation", "no turns")
    return out


def _spaces_to_replies(segs: list[Segment], prompt_only: bool) -> list[Segment]:
    """Trailing spaces of a prompt segment move to the reply after it (the generation prompt drops them)."""
    out: list[Segment] = []
    for k, (text, trainable) in enumerate(segs):
        nxt = segs[k + 1] if k + 1 < len(segs) else None
        if not trainable and text.endswith(" ") and (nxt[1] if nxt else prompt_only):
            stripped = text.rstrip(" ")
            if nxt:
                segs[k + 1] = (text[len(stripped):] + nxt[0], True)
            text = stripped
        if text:
            out.append((text, trainable))
    return out


def _hf_walk(turns: Sequence[Turn], system, tokenizer, prompt_only: bool):
    """Segments from the tokenizer's chat template: each reply is what rendering it adds after the generation
    prompt of its turn (trailing whitespace stays untrainable)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConversationError("no_chat_template", "conv_template=hf_chat_template needs a tokenizer with a chat "
                                                    "template (tokenizer_config.json / chat_template.jinja)")
    pairs = _normalise_turns(turns)
    if prompt_only and pairs[-1][0] != "user":
        raise ConversationError("bad_turn_order", "a generation prompt must end with a user turn")
    head = [{"role": "system", "content": system}] if system else []
    msgs = head + [{"role": r, "content": t} for r, t in pairs]

    def text(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    if prompt_only:
        return [(text(msgs, True), False)]
    full, segs, done = text(msgs, False), [], 0
    for k, (role, _) in enumerate(pairs):
        if role != "assistant":
            continue
        upto = len(head) + k
        before, through = text(msgs[:upto], True), text(msgs[:upto + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ConversationError("chat_template_not_prefix", "the chat template renders a conversation's start "
                                    "differently from the whole conversation; use a built-in conv_template")
        reply = through[len(before):].rstrip()
        segs += [(full[done:len(before)], False), (reply, True)]
        done = len(before) + len(reply)
    segs.append((full[done:], False))
    return [s for s in segs if s[0]]


def _walk(name: str, turns: Sequence[Turn], system, attributes, steerlm_defaults, prompt_only: bool,
          tokenizer=None):
    if name == HF_CHAT_TEMPLATE:
        return _hf_walk(turns, system, tokenizer, prompt_only)
    tpl = get_template(name)
    system = tpl.default_system if system is None else system
    pairs = _normalise_turns(turns)
    if prompt_only and pairs[-1][0] != "user":
        raise ConversationError("bad_turn_order", "a generation prompt must end with a user turn")
    base_attrs = parse_attributes(attributes, steerlm_defaults) if tpl.steerlm else None
    begin = tpl.begin(system)
    segs: list[Segment] = [(begin, False)] if begin else []
    for k, (role, text) in enumerate(pairs):
        if role == "user":
            segs.append((tpl.user(text, k // 2, system), False))
            continue
        if tpl.steerlm:
            label = turns[k].get("label")
            segs.append((steerlm_label(parse_attributes(label, base_attrs) if label is not None
                                       else base_attrs), False))
        segs.append((text + tpl.reply_end, True))
        if tpl.after_reply:
            segs.append((tpl.after_reply, False))
    if prompt_only and tpl.steerlm:
        segs.append((steerlm_label(base_attrs), False))
    return _spaces_to_replies(segs, prompt_only)


def render(template: str, turns: Sequence[Turn], system: str | None = None,
           attributes: Attributes = None, steerlm_defaults: Mapping[str, int] | None = None,
           tokenizer=None) -> list[Segment]:
    """Segments of a full conversation; adjacent segments concatenate to the rendered text.

    `system=None` uses the template's default system prompt. `attributes` (nv_steerlm only) is merged
    over `steerlm_defaults` (STEERLM_TRAIN_DEFAULTS when None); a gpt turn's own "label" wins over both.
    `tokenizer`: needed by hf_chat_template only.
    """
    return _walk(template, turns, system, attributes, steerlm_defaults, prompt_only=False, tokenizer=tokenizer)


def render_prompt(template: str, turns: Sequence[Turn], system: str | None = None,
                  attributes: Attributes = None, steerlm_defaults: Mapping[str, int] | None = None,
                  tokenizer=None) -> str:
    """Text of all turns so far (ending with a user turn) plus the assistant header."""
    return "".join(t for t, _ in _walk(template, turns, system, attributes, steerlm_defaults, prompt_only=True,
                                       tokenizer=tokenizer))
