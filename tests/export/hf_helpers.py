"""A tiny random Hugging Face LLaVA (CLIP tower + LLaMA LM), written locally with save_pretrained."""
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer")
TOKENS_PER_IMAGE = 16  # (32 / 8) ** 2 patches, CLS dropped


NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # HF's default grids at a 32-pixel tower


def make_tiny_llava(out_dir, num_kv_heads=2, tie=False, seed=0, processor=True, tower="clip", dtype=None,
                    lm="llama", next_pinpoints=None, max_positions=128):
    """tower "clip": CLS dropped (strategy "default"); "siglip": no CLS, all patches (strategy "full").
    `next_pinpoints`: a LlavaNextForConditionalGeneration (anyres) with these grid pinpoints instead."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )

    from nemo_neva.modules.vision import CLIPImageProcessor, SiglipImageProcessor

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    vision_cls = CLIPVisionConfig if tower == "clip" else SiglipVisionConfig
    vision = vision_cls(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4)
    strategy = "default" if tower == "clip" else "full"
    text_cls = LlamaConfig
    if lm == "mistral":
        from transformers import MistralConfig

        text_cls = lambda **kw: MistralConfig(sliding_window=None, **kw)  # noqa: E731
    text = text_cls(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=num_kv_heads, intermediate_size=128, max_position_embeddings=max_positions,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                       tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config_cls, model_cls, extra = LlavaConfig, LlavaForConditionalGeneration, {}
    if next_pinpoints is not None:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        config_cls, model_cls, extra = LlavaNextConfig, LlavaNextForConditionalGeneration, {
            "image_grid_pinpoints": next_pinpoints}
    config = config_cls(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                        image_seq_length=TOKENS_PER_IMAGE, tie_word_embeddings=tie,
                        vision_feature_select_strategy=strategy, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # move every tensor (norm gains included) off its init value, so a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(out_dir)
    if next_pinpoints is not None:
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        crop = {"do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}} \
            if tower == "clip" else {"do_center_crop": False, "size": {"height": 32, "width": 32}}
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=next_pinpoints, **crop)
    elif tower == "clip":
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    processor_cls = LlavaProcessor
    if next_pinpoints is not None:
        processor_cls = LlavaNextProcessor
    if processor:
        processor_cls(image_processor=image_processor, tokenizer=tok, patch_size=8,
                       vision_feature_select_strategy=strategy,
                       num_additional_image_tokens=1 if tower == "clip" else 0).save_pretrained(out_dir)
    else:
        tok.save_pretrained(out_dir)
        image_processor.save_pretrained(out_dir)
    return model


def probe_inputs(image_token_id, vocab, n=2, seq=28, seed=1):
    """input_ids with the image token repeated once per feature position, and pixel values."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, vocab, (n, seq), generator=g)
    ids[:, 3:3 + TOKENS_PER_IMAGE] = image_token_id
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    return ids, pixels


def neva_logits(model, ids, pixels):
    model.eval()
    pos = torch.arange(ids.shape[1]).expand_as(ids).clone()
    with torch.no_grad():
        out = model.model(ids, pos, images=pixels, runtime_gather_output=True)
    return out[..., :len(model.tokenizer)]


def hf_logits(hf_model, ids, pixels):
    with torch.no_grad():
        return hf_model(input_ids=ids, pixel_values=pixels).logits
