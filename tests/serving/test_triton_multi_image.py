"""Several images per Triton prompt without a server: input_media [rows, N, H, W, 3] in `<image>` order, images of
different sizes through input_media_sizes, tags placed by the client or leading, and the refusals. The oracle is
`generate` called directly with the same images (PIL, cropped from the arrays the client sent) and prompt."""
import numpy as np
import pytest
import torch
from PIL import Image

from nemo_neva import build_model
from nemo_neva.data.constants import IMAGE_TOKEN
from nemo_neva.inference.generate import generate
from nemo_neva.inference.prompting import build_prompt
from nemo_neva.serving.limits import ServerLimits
from nemo_neva.serving.triton_model import InvalidInput, NevaTritonModel, TorchBackend
from nemo_neva.serving.worker import serving_stops
from tests.model.helpers import tiny_model_cfg
from tests.serving.test_triton_model import FakeBackend, llm_export_dir, pixels

TEMPLATE = "nv_steerlm"
LIMITS = ServerLimits(max_tokens=8, max_image_pixels=4096, max_text_chars=300, max_images=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(encoder_seq_length=192)).eval()


def request(text, media=None, sizes=None, **scalars):
    data = {"input_text": np.array([[text.encode()]], dtype=np.object_)}
    if media is not None:
        data["input_media"] = media[np.newaxis]
    if sizes is not None:
        data["input_media_sizes"] = np.array([sizes], dtype=np.int64)
    for name, value in scalars.items():
        data[name] = np.array([[value]], dtype=np.int64)
    return data


def padded(*images, h=None, w=None):
    """Images of any sizes in one zero-padded [N, H, W, 3] tensor, each at the top-left of its slot."""
    h = h or max(im.shape[0] for im in images)
    w = w or max(im.shape[1] for im in images)
    out = np.zeros((len(images), h, w, 3), np.uint8)
    for k, im in enumerate(images):
        out[k, :im.shape[0], :im.shape[1]] = im
    return out


def oracle(model, question, images, max_new_tokens=LIMITS.max_tokens):
    ids, strings = serving_stops(model, TEMPLATE)
    return generate(model, [[Image.fromarray(im) for im in images]], [build_prompt(TEMPLATE, question, True)],
                    max_new_tokens=max_new_tokens, stop_token_ids=ids, stop_strings=strings)[0]


def answer(m, *requests):
    return [o["outputs"][0, 0].decode() for o in m(list(requests))]


def test_two_images_answer_equals_generate_with_leading_or_placed_tags(model):
    """(That the tag order picks the image order is tests/inference/test_multi_image.py's, at the logits.)"""
    m = NevaTritonModel(TorchBackend(model, TEMPLATE), TEMPLATE, LIMITS)
    a, b = pixels(1), pixels(2)
    got = answer(m, request("Which has more shapes?", np.stack([a, b])))[0]
    # without tags the images lead the question, one per line, in input_media order
    assert got == oracle(model, f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nWhich has more shapes?", [a, b])
    # the client's own tags place the images (interleaved text)
    q = f"First: {IMAGE_TOKEN} Second: {IMAGE_TOKEN} Same colour?"
    assert answer(m, request(q, np.stack([a, b])))[0] == oracle(model, q, [a, b])


def test_images_of_different_sizes_travel_padded_with_their_sizes(model):
    m = NevaTritonModel(TorchBackend(model, TEMPLATE), TEMPLATE, LIMITS)
    a, b = pixels(3, 32, 24), pixels(4, 20, 40)
    media = padded(a, b)  # [2, 32, 40, 3]; the padding is not part of either image
    media[0, :, 24:] = 255
    media[1, 20:] = 255
    got = answer(m, request("Compare them.", media, sizes=[[32, 24], [20, 40]]))[0]
    assert got == oracle(model, f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nCompare them.", [a, b])
    # the sizes matter: the whole padded slots are other images, with another answer (checked for this seed)
    assert answer(m, request("Compare them.", media))[0] != got


def test_rows_of_one_request_may_hold_different_counts_with_unused_trailing_slots(model):
    m = NevaTritonModel(TorchBackend(model, TEMPLATE), TEMPLATE, LIMITS)
    a, b, c = pixels(5), pixels(6), pixels(7)
    rows = {"input_text": np.array([[b"Two here."], [b"One here."], [b"None here."]], dtype=np.object_),
            "input_media": np.stack([np.stack([a, b]), np.stack([c, np.zeros_like(c)]), np.zeros((2, 32, 32, 3),
                                                                                                 np.uint8)]),
            "input_media_sizes": np.array([[[32, 32], [32, 32]], [[32, 32], [0, 0]], [[0, 0], [0, 0]]], np.int64)}
    got = m([rows])[0]["outputs"][:, 0].tolist()
    alone = [answer(m, request("Two here.", np.stack([a, b])))[0], answer(m, request("One here.", c[None]))[0],
             answer(m, request("None here."))[0]]
    assert [t.decode() for t in got] == alone
    assert alone[1] == oracle(model, "One here.", [c])


BAD = {
    "too_many": (dict(media=np.zeros((3, 8, 8, 3), np.uint8)), "input_media",
                 r"3 images in one prompt; this server takes at most 2 per prompt \(limits.max_images\)"),
    "size_beyond_slot": (dict(media=np.zeros((2, 8, 8, 3), np.uint8), sizes=[[8, 8], [9, 8]]), "input_media_sizes",
                         r"image 1: size \(9, 8\) does not fit its 8 x 8 slot"),
    "size_half_zero": (dict(media=np.zeros((1, 8, 8, 3), np.uint8), sizes=[[0, 8]]), "input_media_sizes",
                       "does not fit"),
    "gap_before_a_used_slot": (dict(media=np.zeros((2, 8, 8, 3), np.uint8), sizes=[[0, 0], [8, 8]]),
                               "input_media_sizes", "unused slot"),
    "sizes_wrong_shape": (dict(media=np.zeros((2, 8, 8, 3), np.uint8), sizes=[[8, 8]]), "input_media_sizes",
                          r"expected shape \[1, 2, 2\]"),
    "sizes_without_media": (dict(sizes=[[8, 8]]), "input_media_sizes", "without input_media"),
    "fewer_tags_than_images": (dict(text=f"{IMAGE_TOKEN} and?", media=np.zeros((2, 8, 8, 3), np.uint8)),
                               "input_text", r"1 image tag\(s\) <image> for 2 image\(s\)"),
    "crop_too_many_pixels": (dict(media=np.zeros((1, 70, 70, 3), np.uint8)), "input_media",
                             "4900 pixels exceed the limit of 4096"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_multi_image_requests_name_the_input(case):
    kwargs, name, words = BAD[case]
    kwargs = dict(kwargs)
    m = NevaTritonModel(FakeBackend(), TEMPLATE, LIMITS)
    with pytest.raises(InvalidInput, match=rf"^input '{name}': .*{words}"):
        m([request(kwargs.pop("text", "hi"), **kwargs)])


def test_a_text_only_server_refuses_any_image():
    m = NevaTritonModel(FakeBackend(), TEMPLATE, ServerLimits(max_images=0))
    with pytest.raises(InvalidInput, match=r"1 image in one prompt; this server takes text-only prompts"):
        m([request("hi", np.zeros((1, 8, 8, 3), np.uint8))])


def test_tensorrt_llm_backend_addresses_every_image_of_a_row_in_the_prompt_table(model, tmp_path):
    """The GPU backend's glue on CPU (test_triton_model.FakeRunner stands in for the engine and checks that each
    row's fake ids address its own images' features, in tag order, in the batch's one prompt table)."""
    from nemo_neva.export.trtllm import export_vocab_size
    from nemo_neva.inference.generate import encode_prompt, generate_tokens
    from nemo_neva.serving.triton_trtllm import TrtllmBackend
    from tests.serving.test_triton_model import FakeRunner

    vocab = export_vocab_size(model)
    ids, strings = serving_stops(model, TEMPLATE)
    meta = {"conv_template": TEMPLATE, "stop_token_ids": sorted(ids), "stop_strings": strings, "vocab_size": vocab,
            "image_token_id": model.image_token_id, "tokens_per_image": model.tokens_per_image,
            "image_aspect_ratio": model.image_aspect_ratio}
    # a non-square image too: pixels are the model's preprocessing (image_aspect_ratio), not the bare processor's
    rows = [("Which has more shapes?", [pixels(1), pixels(2)]), ("What is it?", [pixels(3, 24, 40)])]
    cases = []
    for q, arrays in rows:
        pils = [Image.fromarray(a) for a in arrays]
        prompt = build_prompt(TEMPLATE, "\n".join([IMAGE_TOKEN] * len(pils) + [q]), True)
        with torch.no_grad():
            feats = model.model.encode_images(model.preprocess_images(pils)).flatten(0, 1)  # [images * tokens, hidden]
        tokens = generate_tokens(model, [pils], [prompt], max_new_tokens=6, stop_token_ids=sorted(ids),
                                 stop_strings=strings)[0]
        cases.append(dict(ids=encode_prompt(model, prompt, len(pils)), feats=feats, tokens=tokens))

    def vision(px):
        with torch.no_grad():
            return model.model.encode_images(px)

    runner = FakeRunner(model, vocab, cases)
    m = NevaTritonModel(TrtllmBackend(llm_export_dir(tmp_path, model, vocab), meta, model.tokenizer, model.image_processor, vision, runner),
                        TEMPLATE, LIMITS)
    out = m([request(q, np.stack(arrays), max_output_len=6) for q, arrays in rows])
    assert runner.calls[0]["rows"] == 2  # both rows in one engine call, so one table holds all three images
    expected = [model.tokenizer.decode(c["tokens"], skip_special_tokens=True).strip() for c in cases]
    assert [o["outputs"][0, 0].decode() for o in out] == expected
