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

from nemo_neva.inference.generate import Usage, encode_prompt, generate_usage, stream_generate
from nemo_neva.inference.prompting import stop_markers
from nemo_neva.serving.chat_request import ChatRequest
from nemo_neva.serving.errors import RequestError, internal_error
from nemo_neva.serving.limits import token_budget

log = logging.getLogger("nemo_neva.serving")


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

    def _budget(self, r: ChatRequest) -> tuple[int, int]:
        """(prompt tokens, max new tokens), or a RequestError when they do not fit the context."""
        n_prompt = len(encode_prompt(self.model, r.prompt, list(r.images)))  # a video: its frames' tags
        return n_prompt, token_budget(n_prompt, self.context, r.max_tokens, self.max_tokens_cap, "messages",
                                      "max_tokens", what="conversation")

    def _run(self, job: Job) -> None:
        r = job.request
        n_prompt, max_new = self._budget(r)
        images = list(r.images) or None  # generate's form: one per <image>/<video> tag in order, or None
        kwargs = dict(max_new_tokens=max_new, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                      seed=r.seed, stop_token_ids=sorted(self.stop_ids),
                      stop_strings=[*self.stop_strings, *r.stop])
        if r.stream:
            usage, parts = Usage(), []
            for delta in strip_deltas(stream_generate(self.model, images, r.prompt, usage=usage, **kwargs)):
                if job.cancelled.is_set():
                    log.info("client went away; generation stopped")
                    return
                parts.append(delta)
                job.events.put(("delta", delta))
            usage.text = "".join(parts)
        else:
            usage = generate_usage(self.model, [images], [r.prompt], **kwargs)[0]
        job.events.put(("done", Finished(usage.text, usage.finish_reason, n_prompt, usage.completion_tokens)))
