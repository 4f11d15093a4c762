"""Response objects in the OpenAI chat-completions wire format."""
from __future__ import annotations

import time
import uuid

from nemo_neva.serving.worker import Finished


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def completion(cid: str, model_id: str, done: Finished) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                     "logprobs": None, "finish_reason": done.finish_reason}],
        "usage": usage(done),
    }


def chunk(cid: str, model_id: str, delta: dict, finish_reason=None) -> dict:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(cid: str, model_id: str, done: Finished) -> dict:
    """The extra last chunk of `stream_options={'include_usage': true}`: no choices, only usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
            "choices": [], "usage": usage(done)}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "nemo-neva"}
