"""The one thread that runs the model: requests queue up here and are generated one at a time.

The model is not thread-safe (nor is the fast tokenizer), so only this thread touches it; HTTP handling
stays concurrent. A streamed reply is handed back delta by delta through the job's event queue, so a slow
client never holds the model, and a client that disconnects stops its generation at the next token.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from nemo_neva.inference.generate import Usage, generate_usage, stream_generate
from nemo_neva.inference.prompting import stop_markers
from nemo_neva.serving.chat_request import ChatRequest
from nemo_neva.serving.errors import RequestError, internal_error
from nemo_neva.serving.limits import token_budget

log = logging.getLogger(__name__)


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    request: ChatRequest
    # ("delta", str) | ("done", Finished) | ("error", RequestError)
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def strip_deltas(deltas: Iterable[str]) -> Iterator[str]:
    """Deltas whose concatenation is `"".join(deltas).strip()` (what `generate` returns): leading
    whitespace is dropped and trailing whitespace is only sent once text follows it."""
    started, pending = False, ""
    for d in deltas:
        if not started:
            d = d.lstrip()
            if not d:
                continue
            started = True
        body = d.rstrip()
        if body:
            yield pending + body
            pending = d[len(body):]
        else:
            pending += d


def serving_stops(model, template: str) -> tuple[set, list]:
    """The template's end markers and EOS, plus the image placeholder: a sampled placeholder would make
    the next step's prompt hold more image tokens than images, so the reply ends there instead."""
    ids, strings = stop_markers(model.tokenizer, template)
    return ids | {model.image_token_id}, strings


class GenerationWorker:
    def __init__(self, model, template: str, max_tokens_cap: int):
        self.model, self.max_tokens_cap = model, max_tokens_cap
        self.context = int(model.cfg.encoder_seq_length)
        self.stop_ids, self.stop_strings = serving_stops(model, template)
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="neva-generation", daemon=True)

    def start(self) -> "GenerationWorker":
        self.model.eval()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: ChatRequest, events=None) -> Job:
        """Queue a request; `events` (anything with `put`) replaces the job's default queue.Queue."""
        job = Job(request) if events is None else Job(request, events=events)
        self._jobs.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except RequestError as e:
                job.events.put(("error", e))
            except Exception:  # requests are fully checked before generate: what fails here is ours
                log.exception("generation failed")
                job.events.put(("error", internal_error()))

    def _prepare(self, r: ChatRequest):
        """(the request as the model takes it, max new tokens), or a RequestError when it does not fit the
        context. Encoded once, by the model's processor (a video: its frames' placeholders)."""
        inputs = self.model.processor(r.prompt, list(r.images) or None)
        n_prompt = int(inputs.ids.numel())
        return inputs, token_budget(n_prompt, self.context, r.max_tokens, self.max_tokens_cap, "messages",
                                    "max_tokens", what="conversation")

    def _run(self, job: Job) -> None:
        r = job.request
        inputs, max_new = self._prepare(r)
        n_prompt = int(inputs.ids.numel())
        config = r.generation_config(max_new, stop_token_ids=self.stop_ids, stop_strings=self.stop_strings)
        if r.stream:
            usage, parts = Usage(), []
            for delta in strip_deltas(stream_generate(self.model, None, inputs, config, usage=usage)):
                if job.cancelled.is_set():
                    log.info("client went away; generation stopped")
                    return
                parts.append(delta)
                job.events.put(("delta", delta))
            usage.text = "".join(parts)
        else:
            usage = generate_usage(self.model, [None], [inputs], config)[0]
        job.events.put(("done", Finished(usage.text, usage.finish_reason, n_prompt, usage.completion_tokens)))
