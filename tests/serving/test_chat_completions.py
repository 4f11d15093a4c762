"""The server, driven by the official `openai` client, answers as the in-process model does."""
import concurrent.futures
import json
import urllib.request

from nemo_neva.data.conversation import STEERLM_INFERENCE_DEFAULTS, render_prompt
from nemo_neva.inference.generate import encode_prompt
from nemo_neva.inference.prompting import build_prompt
from nemo_neva.serving.worker import serving_stops
from tests.serving.serving_helpers import LIMITS, TEMPLATE, coloured, png_data_url


def _user(text, image=None):
    """A user message; its image part first, so the server renders "<image>\n{text}" (build_prompt's layout)."""
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(image)}})
    return {"role": "user", "content": parts}


def _oracle(served, prompt, image, max_tokens=LIMITS["max_tokens"], stop=(), **sampling):
    ids, strings = serving_stops(served.model, TEMPLATE)
    return served.model.generate([image], [prompt], max_new_tokens=max_tokens, stop_token_ids=ids,
                                 stop_strings=[*strings, *stop], **sampling)[0]


def _ask(client, served, messages, **kw):
    return client.chat.completions.create(model=served.model_id, messages=messages, **kw)


def test_health_and_models(served):
    with urllib.request.urlopen(served.url + "/health") as r:
        assert r.status == 200 and json.load(r)["status"] == "ok"
    models = served.client().models.list()
    assert [m.id for m in models.data] == [served.model_id]


def test_answer_equals_the_cli_generation_with_usage(served):
    image = coloured(1)
    reply = _ask(served.client(), served, [_user("What colour is the shape?", image)], temperature=0, max_tokens=8)
    prompt = build_prompt(TEMPLATE, "What colour is the shape?", True, steerlm=None)
    expected = _oracle(served, prompt, image, max_tokens=8)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == expected
    assert reply.usage.prompt_tokens == len(encode_prompt(served.model, prompt, True))
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 8 else "stop")


def test_stream_joins_to_the_non_streamed_greedy_answer(served):
    client = served.client()
    messages = [_user("Describe the image.", coloured(2))]
    whole = _ask(client, served, messages, temperature=0, max_tokens=10)
    chunks = list(_ask(client, served, messages, temperature=0, max_tokens=10, stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) >= 2  # really streamed, not one blob
    assert "".join(c.choices[0].delta.content for c in text_chunks) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_max_tokens_and_stop_give_length_and_stop(served):
    client = served.client()
    messages = [_user("Tell me more.", coloured(3))]
    long = _ask(client, served, messages, temperature=0, max_tokens=12).choices[0].message.content
    short = _ask(client, served, messages, temperature=0, max_tokens=3)
    prompt = build_prompt(TEMPLATE, "Tell me more.", True)
    assert short.choices[0].message.content == _oracle(served, prompt, coloured(3), max_tokens=3)
    # the model did not stop within 3 tokens (its 12-token answer goes on), so 3 tokens were cut: "length"
    assert len(long) > len(short.choices[0].message.content) + 2
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    # a stop string that generate() detects (it checks the decoded text's end after each token)
    stop, expected = next((c, e) for c in (long[k:k + 2] for k in range(2, len(long) - 2)) if c.strip()
                          for e in [_oracle(served, prompt, coloured(3), stop=[c])] if len(e) < len(long) - 2)
    stopped = _ask(client, served, messages, temperature=0, max_tokens=12, stop=stop)
    assert stopped.choices[0].message.content == expected and stop not in expected
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens < 12

def test_multi_turn_history_with_system_and_steerlm(served):
    image = coloured(4)
    messages = [{"role": "system", "content": "You answer tersely."}, _user("What is it?", image),
                {"role": "assistant", "content": "A square."}, {"role": "user", "content": "And its colour?"}]
    steer = {"quality": 2, "humor": 0}
    reply = _ask(served.client(), served, messages, temperature=0, max_tokens=6, extra_body={"steerlm": steer})
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."},
             {"from": "human", "value": "And its colour?"}]
    prompt = render_prompt(TEMPLATE, turns, system="You answer tersely.", attributes=steer,
                           steerlm_defaults=STEERLM_INFERENCE_DEFAULTS)
    assert "quality:2," in prompt and "humor:0," in prompt and "You answer tersely." in prompt
    assert reply.choices[0].message.content == _oracle(served, prompt, image, max_tokens=6)
    assert reply.usage.prompt_tokens == len(encode_prompt(served.model, prompt, True))


def test_text_only_and_seeded_sampling(served):
    client = served.client()
    messages = [{"role": "user", "content": "Say something."}]
    kw = dict(temperature=1.0, top_p=0.9, max_tokens=8, extra_body={"top_k": 50})
    a = _ask(client, served, messages, seed=7, **kw).choices[0].message.content
    b = _ask(client, served, messages, seed=7, **kw).choices[0].message.content
    assert a == b
    prompt = build_prompt(TEMPLATE, "Say something.", False)
    assert a == _oracle(served, prompt, None, max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)


def test_concurrent_clients_get_the_sequential_answers(served):
    client = served.client()
    questions = ["What is it?", "Describe the image.", "What colour is the shape?", "Tell me more."]
    requests = [[_user(q, coloured(10 + i))] for i, q in enumerate(questions)]
    # two greedy clients, two seeded samplers: every answer is reproducible, and they differ
    sampling = [dict(temperature=0), dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=1.0, seed=2)]
    sequential = [_ask(client, served, m, max_tokens=8, **s).choices[0].message.content
                  for m, s in zip(requests, sampling)]

    def one(i):
        if i % 2 == 0:  # half of them stream
            stream = _ask(served.client(), served, requests[i], max_tokens=8, stream=True, **sampling[i])
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return _ask(served.client(), served, requests[i], max_tokens=8, **sampling[i]).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        concurrent_answers = list(pool.map(one, range(4)))
    assert concurrent_answers == sequential
    assert len(set(sequential)) == 4  # a mix-up between clients would show
