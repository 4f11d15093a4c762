"""A `/v1/chat/completions` JSON body -> a validated `ChatRequest` with the rendered prompt.

Everything a client can get wrong is checked here, before the request reaches the model: schema, roles and
turn order, parameter ranges (OpenAI's), the configured limits, SteerLM attributes, the images and videos
(each `image_url` part puts its `<image>` tag where the part stands, each `video_url` part its `<video>` tag,
so text, images and videos interleave in order). Videos are decoded here too (sampled with the model's
`model.data.video` settings), off the generation thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nemo_neva.data.constants import IMAGE_TOKEN, VIDEO_TOKEN
from nemo_neva.data.conversation import (
    STEERLM_INFERENCE_DEFAULTS,
    ConversationError,
    get_template,
    parse_attributes,
    render_prompt,
)
from nemo_neva.data.video_io import VideoSettings
from nemo_neva.inference.generation_config import GenerationConfig
from nemo_neva.serving.errors import RequestError
from nemo_neva.serving.images import image_from_url
from nemo_neva.serving.limits import RANGES, ServerLimits, check_range
from nemo_neva.serving.videos import video_from_url

MAX_STOP_STRINGS = 4  # as the OpenAI API
# Accepted and ignored at their "off" value; anything else a client sends that we do not implement is a 400,
# so a client never silently gets something other than what it asked for.
_IGNORED_AT = {"user": None, "metadata": None, "store": False, "logprobs": False, "frequency_penalty": 0,
               "presence_penalty": 0, "parallel_tool_calls": None, "service_tier": None}
_KNOWN = {"model", "messages", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed",
          "stop", "n", "stream", "stream_options", "steerlm"}


@dataclass
class ChatRequest:
    prompt: str
    # RGB PIL images and `Video`s, one per <image> / <video> tag of `prompt`, in order (generate's form)
    images: list = field(default_factory=list)
    max_tokens: Optional[int] = None  # None = as many as the cap and the context allow
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def generation_config(self, max_new_tokens: int, stop_token_ids, stop_strings=()) -> GenerationConfig:
        """The request's sampling as a GenerationConfig: its values, already range-checked here (HTTP errors),
        with the server's stops (template end marker, EOS, image placeholder) before the request's own."""
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, seed=self.seed, stop_token_ids=tuple(sorted(stop_token_ids)),
                                stop_strings=(*stop_strings, *self.stop))


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}", name)
    return check_range(value, lo, hi, lo_open, name)


def _sampling(body: dict, limits: ServerLimits) -> dict:
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError("give max_tokens or max_completion_tokens, not both", "max_tokens")
    tokens_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    out = dict(
        temperature=float(_number(body, "temperature", 1.0, *RANGES["temperature"])),
        top_p=float(_number(body, "top_p", 1.0, *RANGES["top_p"])),
        top_k=_number(body, "top_k", 0, *RANGES["top_k"], integer=True),
        seed=_number(body, "seed", None, *RANGES["seed"], integer=True),
        max_tokens=_number(body, tokens_key, None, 1, float("inf"), integer=True),
    )
    if out["max_tokens"] is not None and out["max_tokens"] > limits.max_tokens:
        raise RequestError(f"{tokens_key}={out['max_tokens']} exceeds this server's limit of {limits.max_tokens}",
                           tokens_key, code="max_tokens_too_large")
    if _number(body, "n", 1, 1, float("inf"), integer=True) != 1:
        raise RequestError("only n=1 is supported", "n")
    return out


def _stop(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
    return stop


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream or not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError("stream_options must be {'include_usage': bool} with stream=true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError("stream_options.include_usage must be true or false", "stream_options")
    return stream, include


_MEDIA = {"image_url": ("image", IMAGE_TOKEN), "video_url": ("video", VIDEO_TOKEN)}  # part type -> (noun, tag)


def _parts(content, param: str) -> list:
    """Message content -> list of {'type': 'text'|'image_url'|'video_url', ...} parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError("content must be a string or a list of content parts", param)
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", *_MEDIA):
            raise RequestError("content parts must be {'type': 'text'}, {'type': 'image_url'} or "
                               "{'type': 'video_url'} objects", f"{param}[{j}]")
        kind = part["type"]
        if kind == "text" and not isinstance(part.get("text"), str):
            raise RequestError("a text part needs a 'text' string", f"{param}[{j}]")
        if kind in _MEDIA and not isinstance(part.get(kind), dict):
            article = "an" if kind == "image_url" else "a"
            raise RequestError(f"{article} {kind} part needs a '{kind}': {{'url': ...}} object", f"{param}[{j}]")
    return content


def _count_parts(messages: list, kind: str) -> int:
    """`kind` parts in the whole conversation (counted before any image or video is decoded)."""
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == kind)


# part type -> (noun, ServerLimits field, what a limit of 0 means, error code)
_COUNTED_PARTS = {"image_url": ("image", "max_images", "takes text only", "too_many_images"),
                  "video_url": ("video", "max_videos", "takes no video", "too_many_videos")}


def _check_counts(messages: list, limits: ServerLimits) -> None:
    for kind, (noun, key, none_allowed, code) in _COUNTED_PARTS.items():
        n, limit = _count_parts(messages, kind), getattr(limits, key)
        if n > limit:
            what = (f"this server {none_allowed} (server.{key}=0)" if limit == 0 else
                    f"this server takes at most {limit} per conversation (server.{key})")
            raise RequestError(f"{n} {noun}{'s' * (n != 1)} in this conversation; {what}", "messages", code=code)


class _Conversation:
    """Collects turns, the system text and the images (in order) while walking the messages."""

    def __init__(self, limits: ServerLimits, video: VideoSettings):
        self.limits, self.video, self.turns, self.system, self.images, self.chars = limits, video, [], None, [], 0

    def text(self, text: str, param: str) -> str:
        for kind, (noun, tag) in _MEDIA.items():
            if tag in text:
                raise RequestError(f"message text must not contain the {noun} tag {tag}; send {noun}s as "
                                   f"{kind} parts", param)
        self.chars += len(text)
        if self.chars > self.limits.max_text_chars:
            raise RequestError(f"message text exceeds the limit of {self.limits.max_text_chars} characters",
                               param, code="prompt_too_long")
        return text

    def add(self, i: int, msg) -> None:
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError("each message must be an object with 'role' and 'content'", param)
        role, parts = msg.get("role"), _parts(msg.get("content"), f"{param}.content")
        if role in ("system", "developer"):
            if self.turns:
                raise RequestError("system messages must come before the conversation", param)
            texts = [self.text(p["text"], param) for p in parts if p["type"] == "text"]
            if len(texts) != len(parts):
                raise RequestError("a system message holds text only", param)
            self.system = "\n".join(filter(None, [self.system, *texts]))
            return
        expected = "user" if len(self.turns) % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise RequestError(f"unsupported role {role!r} (system, user, assistant)", f"{param}.role")
        if role != expected:
            raise RequestError(f"expected a {expected} message here: user and assistant turns alternate, "
                               "starting with user", f"{param}.role")
        pieces = []
        for j, part in enumerate(parts):
            if part["type"] == "text":
                pieces.append(self.text(part["text"], param))
                continue
            kind, at = part["type"], f"{param}.content[{j}]"
            noun, tag = _MEDIA[kind]
            if role != "user":
                raise RequestError(f"only user messages may hold {noun}s", at)
            url = part[kind].get("url")
            self.images.append(image_from_url(url, self.limits, at) if kind == "image_url" else
                               video_from_url(url, self.limits, self.video, at))
            pieces.append(tag)
        # Interleaved: each image's (video's) tag stands where its part is, parts one per line. [image, text]
        # renders "<image>\n{text}", the LLaVA layout examples/neva_generate.py and build_prompt use.
        self.turns.append({"from": "human" if role == "user" else "gpt", "value": "\n".join(pieces)})


def parse_chat_request(body, limits: ServerLimits, template: str, model_id: str,
                       video: VideoSettings = VideoSettings()) -> ChatRequest:
    """`video`: how a video's frames are sampled (the served model's `video_settings_of(model.cfg)`)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in _KNOWN and not (k in _IGNORED_AT and body[k] == _IGNORED_AT[k]))
    if unknown:
        raise RequestError(f"unsupported parameter(s): {', '.join(unknown)}", unknown[0])
    if body.get("model") != model_id:
        raise RequestError(f"model {body.get('model')!r} is not served here; this server serves {model_id!r}",
                           "model", status=404, code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(f"at most {limits.max_messages} messages", "messages", code="too_many_messages")
    sampling = _sampling(body, limits)
    stop = _stop(body)
    stream, include_usage = _stream(body)
    _check_counts(messages, limits)
    conv = _Conversation(limits, video)
    for i, msg in enumerate(messages):
        conv.add(i, msg)
    if not conv.turns or conv.turns[-1]["from"] != "human":
        raise RequestError("the last message must be a user message", "messages")
    conv.text("".join(stop), "stop")  # stop strings count towards the text limit too
    steerlm = body.get("steerlm")
    try:
        if steerlm is not None:
            if not isinstance(steerlm, dict):
                raise RequestError("steerlm must be an object of attribute: 0-9", "steerlm")
            if not get_template(template).steerlm:
                raise RequestError(f"this model's conversation template {template!r} has no SteerLM attributes",
                                   "steerlm")
            parse_attributes(steerlm, STEERLM_INFERENCE_DEFAULTS)
        prompt = render_prompt(template, conv.turns, system=conv.system, attributes=steerlm,
                               steerlm_defaults=STEERLM_INFERENCE_DEFAULTS)
    except ConversationError as e:
        raise RequestError(e.detail, "steerlm" if e.reason == "bad_attribute" else "messages") from None
    return ChatRequest(prompt=prompt, images=conv.images, stop=stop, stream=stream, include_usage=include_usage,
                       **sampling)
