"""The prompt-table contract, emulated on CPU: fake ids vocab_size.. + a table of image features reproduce the
.nemo model's input embeddings exactly (the lookup written here follows TensorRT-LLM's PromptTuningEmbedding:
id < vocab_size -> word embedding, else table row id - vocab_size, for each request's own table)."""
import pytest
import torch

from nemo_neva.export.trtllm_prompt import fake_prompt_ids, max_prompt_embedding_table_size, prompt_table
from tests.export.trtllm_helpers import image_batch, tiny_neva

V = 576


def test_fake_ids_per_request_and_per_batch():
    ids = torch.tensor([[1, 9, 9, 2, 9, 9], [9, 9, 3, 4, 5, 6]])
    per_request = fake_prompt_ids(ids, 9, V)
    assert per_request.tolist() == [[1, V, V + 1, 2, V + 2, V + 3], [V, V + 1, 3, 4, 5, 6]]
    batch = fake_prompt_ids(ids, 9, V, per_request=False)  # one table for the batch: row 1 continues
    assert batch.tolist() == [[1, V, V + 1, 2, V + 2, V + 3], [V + 4, V + 5, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="already contain ids >= vocab_size"):
        fake_prompt_ids(torch.tensor([[V]]), 9, V)


def test_table_size():
    assert max_prompt_embedding_table_size(4, 2, 576) == 4608
    with pytest.raises(ValueError, match="max_images_per_request"):
        max_prompt_embedding_table_size(1, 0, 576)


def _emulated_lookup(ids, word, table, vocab):
    rows = torch.where(ids < vocab, ids, 0)
    out = word[rows]
    fake = ids >= vocab
    out[fake] = table[ids[fake] - vocab]
    return out


@pytest.fixture(scope="module", params=["llama", "gpt"])
def model(request):
    return tiny_neva(request.param, seed=5)


@pytest.mark.parametrize("images_per_row", [1, 2])
def test_emulated_lookup_reproduces_model_input_embeddings(model, images_per_row):
    ids, pixels = image_batch(model, rows=2, seq=50, images_per_row=images_per_row)
    captured = {}
    emb = model.model.language_model.embedding
    hook = model.model.language_model.decoder.register_forward_pre_hook(  # the decoder's input: spliced embeddings
        lambda m, a, kw: captured.__setitem__("x", kw["hidden_states"].detach().clone()), with_kwargs=True)
    pos = torch.arange(ids.shape[1]).expand_as(ids).clone()
    try:
        with torch.no_grad():
            model.model(ids, pos, images=pixels)
    finally:
        hook.remove()
    ours = captured["x"].transpose(0, 1)  # megatron: [s, b, h]
    word = emb.word_embeddings.weight.detach()[:V]
    with torch.no_grad():
        feats = model.model.encode_images(pixels)  # [rows * images_per_row, tokens, hidden], row-major
    fake = fake_prompt_ids(ids, model.image_token_id, V)  # per request: each row has its own table
    for row in range(ids.shape[0]):
        table = prompt_table(feats[row * images_per_row:(row + 1) * images_per_row])
        theirs = _emulated_lookup(fake[row], word, table, V)
        if hasattr(emb, "position_embeddings"):  # GPT-style: learned positions are added after the lookup
            theirs = theirs + emb.position_embeddings.weight.detach()[: ids.shape[1]]
        assert torch.equal(theirs, ours[row]), row
    assert int((fake >= V).sum()) == ids.shape[0] * images_per_row * model.tokens_per_image


def test_llm_build_command_sizes_the_prompt_table():
    from nemo_neva.export.trtllm_build import llm_build_command

    meta = {"llm_checkpoint": "llm", "tokens_per_image": 576}
    cmd = llm_build_command("/x", meta, max_batch_size=4, max_input_len=2048, max_output_len=512,
                            max_images_per_request=2)
    args = dict(zip(cmd[::1], cmd[1:]))
    assert args["--checkpoint_dir"] == "/x/llm" and args["--output_dir"] == "/x/engines/llm"
    assert args["--max_prompt_embedding_table_size"] == str(4 * 2 * 576)
    assert (args["--max_batch_size"], args["--max_input_len"], args["--max_seq_len"]) == ("4", "2048", "2560")
