"""The NeVA network (torch modules only, no NeMo): where image features become tokens of the LM.

neva_module.py           NevaModule: vision tower -> projector -> spliced into the megatron-core GPTModel
vision.py                frozen Hugging Face CLIP / SigLIP tower and its image processor
projector.py             linear / mlp2x_gelu / mlp_downsample projectors
language_model.py        the megatron-core GPTModel built from the config
layer_specs.py           Transformer Engine vs local (CPU) layer specs; SDPA core attention
norms.py, precision.py   LayerNorm1p; bf16 / fp16 / FP8 settings
lora.py                  LoRA adapters on megatron-core's parallel linears
rotated_kv_attention.py  decode-time KV cache of rotated keys; row_linear.py: a row-parallel helper
"""
