"""What the server reports per answer comes from the decoding loop: sampled-token count and finish reason."""

from nemo_neva.inference.generate import Usage, generate, generate_usage, stream_generate

PROMPT = "<image>\nWhat colour is the shape?"


def test_length_stop_token_and_stop_string(model, image):
    free = generate_usage(model, [image], [PROMPT], max_new_tokens=6, stop_token_ids=[])[0]
    assert (free.finish_reason, free.completion_tokens, len(free.tokens)) == ("length", 6, 6)
    assert free.text == generate(model, [image], [PROMPT], max_new_tokens=6, stop_token_ids=[])[0]

    # Stop on a later greedy token (the first index > 0 whose id has not appeared before).
    k = next(i for i in range(1, 6) if free.tokens[i] not in free.tokens[:i])
    stopped = generate_usage(model, [image], [PROMPT], max_new_tokens=6, stop_token_ids=[free.tokens[k]])[0]
    assert stopped.tokens == free.tokens[:k]
    assert (stopped.finish_reason, stopped.completion_tokens) == ("stop", k + 1)  # the stop token was sampled

    assert free.text  # a character of the free answer, as a stop string, must end it early
    word = free.text[-1]
    by_string = generate_usage(model, [image], [PROMPT], max_new_tokens=6, stop_token_ids=[], stop_strings=[word])[0]
    # It ends at the first token whose decoded prefix of the free answer contains the word, cut before the word.
    m = next(m for m in range(1, 7) if word in model.tokenizer.decode(free.tokens[:m], skip_special_tokens=True))
    prefix = model.tokenizer.decode(free.tokens[:m], skip_special_tokens=True)
    assert (by_string.finish_reason, by_string.completion_tokens, by_string.tokens) == ("stop", m, free.tokens[:m])
    assert by_string.text == prefix[:prefix.index(word)].strip() and word not in by_string.text


def test_streamed_usage_equals_the_non_streamed(model, image):
    for kw in (dict(stop_token_ids=[]), dict()):
        usage = Usage()
        text = "".join(stream_generate(model, image, PROMPT, max_new_tokens=5, usage=usage, **kw)).strip()
        whole = generate_usage(model, [image], [PROMPT], max_new_tokens=5, **kw)[0]
        assert (text, usage.tokens, usage.completion_tokens, usage.finish_reason) == (
            whole.text, whole.tokens, whole.completion_tokens, whole.finish_reason)
