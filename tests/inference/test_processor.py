"""`NevaProcessor` (nemo_neva/data/processor.py): the one place that counts placeholders, encodes and checks the
context. Its counts must be the features the network splices (the module's own count from the pixels it is
given), for plain, tiled (anyres) and pooled-video inputs; the forward pass then consumes every placeholder."""
import pytest
import torch
from PIL import Image

from nemo_neva import build_model
from nemo_neva.data.processor import ContextTooLong, NevaInputs, place_media_tags
from nemo_neva.data.video_io import Video
from tests.model.helpers import llama_overrides, tiny_model_cfg


def _pil(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(**llama_overrides(), **overrides)).eval()


def _spliced(model, inputs: NevaInputs):
    """What the network takes: its count per image from the pixels (and sizes / frame flags), and a forward
    pass over the prompt (which refuses placeholders that do not match the spliced features)."""
    counts = model.model.image_token_counts(inputs.pixels, inputs.sizes, inputs.frames)
    with torch.no_grad():
        logits = model.model(inputs.ids[None], torch.arange(inputs.ids.numel())[None], images=inputs.pixels,
                             image_sizes=inputs.sizes, video_frames=inputs.frames)
    return counts, logits


@pytest.mark.parametrize("kind", ["plain", "tiled", "video"])
def test_processor_counts_are_the_features_the_module_splices(kind):
    if kind == "plain":
        model = _model()
        media, prompt = [_pil(40, 50, 1), _pil(30, 30, 2)], "USER: <image> and <image> ASSISTANT:"
    elif kind == "tiled":
        model = _model(**{"mm_cfg.image_tiling.enabled": True, "encoder_seq_length": 512})
        media, prompt = [_pil(40, 90, 1), _pil(90, 40, 2)], "USER: <image> and <image> ASSISTANT:"
    else:
        model = _model(**{"mm_cfg.video.pool": "2x2", "encoder_seq_length": 512})
        media = [_pil(32, 32, 1), Video([_pil(32, 32, 3 + i) for i in range(3)], [0, 1, 2], 3)]
        prompt = "USER: <image> then <video> ASSISTANT:"
    processor = model.processor
    inputs = processor(prompt, media)
    counts, logits = _spliced(model, inputs)
    expanded = [im for m in media for im in (m.frames if isinstance(m, Video) else [m])]
    assert processor.token_counts(expanded, inputs.frames) == counts
    assert int((inputs.ids == processor.image_token_id).sum()) == sum(counts)
    assert logits.shape[1] == inputs.ids.numel() and torch.isfinite(logits).all()
    if kind == "tiled":  # counts by image size: a wide and a tall image of the same area differ from the plain count
        assert counts == [processor.image_token_count(im) for im in media] and counts[0] != processor.tokens_per_image
    if kind == "video":  # pooled frames cost fewer placeholders than the image
        assert counts == [processor.tokens_per_image] + [processor.tokens_per_frame] * 3
        assert processor.tokens_per_frame < processor.tokens_per_image


def test_the_model_keeps_one_processor_and_delegates_to_it():
    model = _model()
    assert model.processor is model.processor
    image = _pil(40, 50, 1)
    assert torch.equal(model.preprocess_images(image), model.processor.preprocess_images(image))
    assert model.image_token_count(image) == model.processor.tokens_per_image == model.tokens_per_image


def test_context_check_names_the_prompt_and_the_budget():
    model = _model()
    processor = model.processor
    n = processor.encode("USER: <image> hi ASSISTANT:", 1).numel()
    processor("USER: <image> hi ASSISTANT:", [_pil(32, 32, 1)], processor.context_length - n)  # fits exactly
    with pytest.raises(ContextTooLong, match=rf"^prompt \({n} tokens\) \+ tokens_to_generate \(.*\) exceeds the "
                                             rf"context of {processor.context_length} tokens$"):
        processor("USER: <image> hi ASSISTANT:", [_pil(32, 32, 1)], processor.context_length - n + 1,
                  budget="tokens_to_generate")


def test_media_tags_go_first_unless_placed_and_never_without_media():
    assert place_media_tags("what?", 2, 1) == "<video>\n<image>\n<image>\nwhat?"
    assert place_media_tags("a <image> b", 1) == "a <image> b"
    with pytest.raises(ValueError, match="contains <image> but no image"):
        place_media_tags("<image> what?", 0)
    with pytest.raises(ValueError, match="contains <video> but no video"):
        place_media_tags("<video> what?", 0)


def _missing(obj, protocol) -> list:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if (callable(v) or isinstance(v, property))
              and (not n.startswith("_") or n == "__call__")}
    assert names, protocol  # the protocol names something to check
    return sorted(n for n in names if not hasattr(obj, n))


def test_the_model_is_what_generation_needs():
    from nemo_neva.inference.model_protocol import GenerationModel, NetworkForGeneration

    model = _model()
    # Every member the protocols name, read as generation reads them (plain attribute access): isinstance() with a
    # runtime-checkable Protocol reads attributes statically on Python >= 3.12, which misses nn.Module submodules.
    assert _missing(model, GenerationModel) == [] and _missing(model.model, NetworkForGeneration) == []
    assert model.pads_in_cached_steps  # the local spec's core attention honours the padding mask


def test_generate_takes_processed_inputs_in_place_of_the_prompt():
    from nemo_neva.inference.generate import generate_tokens

    model = _model()
    image, prompt = _pil(32, 32, 1), "USER: <image> what? ASSISTANT:"
    inputs = model.processor(prompt, [image])
    assert generate_tokens(model, [None], [inputs], max_new_tokens=3) == \
        generate_tokens(model, [[image]], [prompt], max_new_tokens=3)
    with pytest.raises(ValueError, match="^prompt 0 is a NevaInputs .*: pass None as its image$"):
        generate_tokens(model, [[image]], [inputs], max_new_tokens=3)
