"""What each serving engine's LLaVA implementation takes beyond what transformers loads (`--engine` of
scripts/export_to_hf.py): an export meant for an engine is refused, in one line, when that engine cannot express it.

vLLM (0.32, checked by tests/engines/): `LlavaForConditionalGeneration` and `LlavaNextForConditionalGeneration`
with any LM whose causal-LM class has a `.model` (its LLaVA calls `language_model.model(...)`; its GPT-2 has
`.transformer`, so a GPT-2 LM fails at the first request).
TensorRT-LLM's PyTorch backend (`tensorrt_llm/_torch/models/modeling_llava_next.py`, read, not run here): only
LLaVA-NeXT; it takes layer -2 of the tower with CLS dropped (hard-coded) and forces `attention_bias=False`,
`mlp_bias=False`, `rope_scaling=None` on a Llama / Mistral text config.
"""
from __future__ import annotations

from nemo_neva.pretrained.weights import UnsupportedCheckpoint

ENGINES = ("vllm", "trtllm")


def _text_problems(engine: str, text) -> list[str]:
    family = text.model_type
    if engine == "vllm":
        return ["a GPT-2 language model (vLLM's LLaVA calls language_model.model, which its GPT-2 has not)"] \
            if family == "gpt2" else []
    problems = []
    if family not in ("llama", "mistral"):
        problems.append(f"a {family} language model (its LLaVA-NeXT takes Llama / Mistral)")
    if getattr(text, "attention_bias", False) or family == "qwen2":
        problems.append("attention biases (it forces attention_bias=False)")
    params = getattr(text, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {params['rope_type']!r} (it forces rope_scaling=None)")
    return problems


def check_engine(engine: str, config) -> None:
    """Raise UnsupportedCheckpoint naming what `engine` cannot serve of the LLaVA `config` (export_neva_to_hf's)."""
    if engine not in ENGINES:
        raise UnsupportedCheckpoint(f"engine {engine!r}; known: {', '.join(ENGINES)}")
    problems = _text_problems(engine, config.text_config)
    if engine == "trtllm":
        if config.model_type != "llava_next":
            problems.append("plain LLaVA (its PyTorch backend has LLaVA-NeXT only: train with "
                            "model.mm_cfg.image_tiling)")
        if config.vision_feature_layer != -2 or config.vision_feature_select_strategy != "default":
            problems.append(f"vision_feature_layer={config.vision_feature_layer} with strategy "
                            f"{config.vision_feature_select_strategy!r} (it takes layer -2, CLS dropped)")
    if problems:
        name = {"vllm": "vLLM", "trtllm": "TensorRT-LLM (PyTorch backend)"}[engine]
        raise UnsupportedCheckpoint(f"{name} cannot serve this model: " + "; ".join(problems))
