"""The published OpenAPI document (`GET /openapi.json`): request and response shapes, for clients and fuzzers.

The models here document; they do not validate. Requests are checked by `chat_request.py` (so a client gets
the OpenAI-style error naming the field, never FastAPI's 422), and the schema says what that check accepts:
a body the schema allows is answered 200 or refused for a reason the schema cannot say (turn order, context
length, image contents, ...); a body it forbids is refused with a 400. The served model id and the configured
limits are filled in per server.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from nemo_neva.data.conversation import STEERLM_ATTRIBUTES
from nemo_neva.serving.chat_request import MAX_STOP_STRINGS
from nemo_neva.serving.limits import MAX_SEED, ServerLimits


# ------------------------------------------------------------------------------------------------ request
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="an inline image, `data:image/<type>;base64,<data>`; remote URLs and local "
                                 "paths are refused")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str = Field(description="an inline video, `data:video/<type>;base64,<data>` (mp4/mov, Matroska/WebM or "
                                 "AVI); remote URLs and local paths are refused. The server samples the model's "
                                 "`model.data.video.num_frames` frames from it, each costing an image's tokens "
                                 "(fewer with `model.mm_cfg.video.pool`)")


class VideoPart(BaseModel):
    """Extension (OpenAI has no video part): user messages only, at most `max_videos` (GET /config) per
    conversation; its `<video>` tag stands where the part stands."""
    type: Literal["video_url"]
    video_url: VideoURL


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart, VideoPart]]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completions body, as far as this server implements it (anything else is a 400)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1, description="user and assistant turns alternate, starting and "
                                    "ending with user; system messages first; each `image_url` (`video_url`) part "
                                    "puts its image (video) where the part stands (text, images and videos "
                                    "interleave), at most `max_images` (`max_videos`, GET /config) per "
                                    "conversation")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="default 1")
    top_k: Optional[int] = Field(None, ge=0, le=1 << 20, description="extension; 0 (default) = off")
    max_tokens: Optional[int] = Field(None, ge=1, description="default: as many as the cap and the context allow")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="max_tokens under its newer name")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Union[str, list[str], None] = Field(None, min_length=1)
    n: Optional[int] = Field(None, ge=1, le=1)
    stream: Optional[bool] = Field(None, description="server-sent chat.completion.chunk events, then [DONE]")
    stream_options: Optional[StreamOptions] = Field(None, description="with stream=true only")
    steerlm: Optional[dict[str, int]] = Field(None, description="nv_steerlm models only: attribute -> 0-9")
    # Accepted at their "off" value only.
    user: None = None
    metadata: None = None
    store: Literal[False] = False
    logprobs: Literal[False] = False
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0
    parallel_tool_calls: None = None
    service_tier: None = None


# ------------------------------------------------------------------------------------------------ replies
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    model: str


class SamplingDefaults(BaseModel):
    temperature: float
    top_p: float
    top_k: int
    max_tokens: Optional[int] = Field(description="null: as many as the cap (limits.max_tokens) and the context "
                                                  "allow")
    seed: Optional[int] = Field(description="null: a fresh random seed per request")


class PageLimits(BaseModel):
    max_tokens: int
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_videos: int
    max_video_bytes: int
    max_video_frames: int
    max_video_pixels: int
    max_body_bytes: int
    max_text_chars: int
    max_messages: int


class ServerConfig(BaseModel):
    """What the chat page needs to know: the model, the server's sampling defaults and limits, and the SteerLM
    attributes with their defaults (null unless the model's template is nv_steerlm)."""
    model: str
    template: str
    defaults: SamplingDefaults
    limits: PageLimits
    steerlm: Optional[dict[str, int]]


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in [
    (400, "refused: a limit, a malformed body or an unsupported parameter (`error.param` names the field)"),
    (404, "no such model (`model_not_found`)"),
    (500, "internal error; the server log has the cause"),
    (503, "more than `max_pending` requests in progress (`overloaded`): retry later"),
]}


def request_schemas(model_id: str, limits: ServerLimits, steerlm: bool) -> dict:
    """`components.schemas` entries for the chat request, with this server's model id and limits."""
    schemas = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schemas.pop("$defs")
    props = schemas["properties"]
    props["model"] = {"type": "string", "enum": [model_id], "title": "Model",
                      "description": "the served model id (GET /v1/models)"}
    props["messages"]["maxItems"] = limits.max_messages
    for name in ("max_tokens", "max_completion_tokens"):
        props[name]["anyOf"][0]["maximum"] = limits.max_tokens
    props["stop"]["anyOf"] = [{"type": "string", "minLength": 1},
                              {"type": "array", "items": {"type": "string", "minLength": 1},
                               "maxItems": MAX_STOP_STRINGS},
                              {"type": "null"}]
    props["stop"].pop("minLength", None)
    if steerlm:
        props["steerlm"]["anyOf"][0] = {
            "type": "object", "additionalProperties": False,
            "properties": {k: {"type": "integer", "minimum": 0, "maximum": 9} for k in STEERLM_ATTRIBUTES}}
    else:
        del props["steerlm"]
    return {"ChatCompletionRequest": schemas, **defs}
