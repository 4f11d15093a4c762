"""FP8 (Transformer Engine) and activation-recompute settings: config -> megatron-core TransformerConfig fields.

Config keys (all under `model.`, commented in conf/neva_pretrain.yaml):

    fp8: null | hybrid | e4m3        hybrid = E4M3 forward, E5M2 gradients (the usual training choice)
    fp8_recipe: delayed | tensorwise delayed = amax-history scaling (DelayedScaling);
                                     tensorwise = per-tensor current scaling (TE >= 2.2, Float8CurrentScaling)
    fp8_margin, fp8_amax_history_len, fp8_amax_compute_algo (most_recent | max)   -- delayed scaling only
    fp8_wgrad: true                  false = weight-gradient GEMM in bf16

Who applies the FP8 autocast: megatron-core does. In megatron-core 0.16.1 `TransformerBlock.forward`
enters `megatron.core.fp8_utils.get_fp8_context(config)` itself whenever `config.fp8` is set (one outer
`fp8_autocast` around all layers for the delayed recipe, one per layer for the others), with the recipe from
`fp8_utils.get_fp8_recipe(config)` and the amax-reduction group from `parallel_state`. Wrapping
`NevaModule.forward` in another `fp8_autocast` would double-wrap (and drag the word embedding, the HF
vision tower and the projector into a context meant for TE GEMMs), so nemo_neva does not.
`build_fp8_recipe` here builds the TE recipe object our keys describe, independently of megatron-core;
the tests (GPU/TE only) check it agrees with the one megatron-core builds from the TransformerConfig.
"""
from __future__ import annotations

from typing import Any, Optional

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise")
AMAX_ALGOS = ("most_recent", "max")
RECOMPUTE_GRANULARITY = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def _get(cfg, key, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None and default is not None else value


def fp8_format(cfg) -> Optional[str]:
    """`model.fp8` normalised: None (off), 'hybrid' or 'e4m3'. YAML `false`/'none' also mean off."""
    value = _get(cfg, "fp8")
    if value in (None, False) or str(value).lower() in ("none", "null", "false", ""):
        return None
    value = str(value).lower()
    if value not in FP8_FORMATS:
        raise ValueError(f"model.fp8={value!r}; supported: null, {', '.join(FP8_FORMATS)}")
    return value


def fp8_transformer_config_kwargs(cfg, hidden_size: Optional[int] = None,
                                  ffn_hidden_size: Optional[int] = None) -> dict[str, Any]:
    """Validated `TransformerConfig` fp8 fields for `cfg` (the `model` config). Empty dict when fp8 is off.

    Raises ValueError naming the fix when fp8 is asked for without `model.transformer_engine=true` (only
    TE's layers have FP8 GEMMs; megatron-core's local spec would silently ignore `config.fp8`).
    """
    fmt = fp8_format(cfg)
    if fmt is None:
        return {}
    if not _get(cfg, "transformer_engine", False):
        raise ValueError(
            f"model.fp8={fmt} needs Transformer Engine layers: set model.transformer_engine=true "
            "(CUDA GPU with transformer_engine installed), or model.fp8=null"
        )
    recipe = str(_get(cfg, "fp8_recipe", "delayed"))
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe={recipe!r}; supported: {', '.join(FP8_RECIPES)}")
    algo = str(_get(cfg, "fp8_amax_compute_algo", "max"))
    if algo not in AMAX_ALGOS:
        raise ValueError(f"model.fp8_amax_compute_algo={algo!r}; supported: {', '.join(AMAX_ALGOS)}")
    history = int(_get(cfg, "fp8_amax_history_len", 1024))
    if history < 1:
        raise ValueError(f"model.fp8_amax_history_len={history} must be >= 1")
    margin = int(_get(cfg, "fp8_margin", 0))
    if margin < 0:
        raise ValueError(f"model.fp8_margin={margin} must be >= 0")
    # TE's FP8 GEMMs need the inner dimensions to be multiples of 16.
    for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size)):
        if value is not None and value % 16:
            raise ValueError(f"model.fp8 needs model.{name} to be a multiple of 16 (got {value})")
    return {
        "fp8": fmt,
        "fp8_recipe": recipe,
        "fp8_margin": margin,
        "fp8_amax_history_len": history,
        "fp8_amax_compute_algo": algo,
        "fp8_wgrad": bool(_get(cfg, "fp8_wgrad", True)),
    }


def build_fp8_recipe(cfg):
    """The Transformer Engine recipe object `cfg`'s fp8 keys describe (None when fp8 is off).

    Needs `transformer_engine` (imported here, never at module import). Delayed scaling ->
    `transformer_engine.common.recipe.DelayedScaling`; tensorwise -> `Float8CurrentScaling`.
    """
    kwargs = fp8_transformer_config_kwargs(cfg)
    if not kwargs:
        return None
    try:
        from transformer_engine.common import recipe as te_recipe
    except Exception as exc:  # ImportError, or a broken CUDA install
        raise RuntimeError(
            "model.fp8 needs transformer_engine (GPU); install it or set model.fp8=null"
        ) from exc
    fmt = te_recipe.Format.HYBRID if kwargs["fp8"] == "hybrid" else te_recipe.Format.E4M3
    if kwargs["fp8_recipe"] == "tensorwise":
        if not hasattr(te_recipe, "Float8CurrentScaling"):
            raise RuntimeError("model.fp8_recipe=tensorwise needs Transformer Engine >= 2.2 (Float8CurrentScaling)")
        return te_recipe.Float8CurrentScaling(fp8_format=fmt)
    return te_recipe.DelayedScaling(
        fp8_format=fmt,
        margin=kwargs["fp8_margin"],
        amax_history_len=kwargs["fp8_amax_history_len"],
        amax_compute_algo=kwargs["fp8_amax_compute_algo"],
        override_linear_precision=(False, False, not kwargs["fp8_wgrad"]),
    )


def recompute_transformer_config_kwargs(cfg, num_layers: int, pipeline_model_parallel_size: int = 1) -> dict:
    """Validated `recompute_*` TransformerConfig fields from `model.activations_checkpoint_*`.

    granularity null: nothing recomputed. selective: megatron-core recomputes the core attention only
    (method/num_layers must be null). full: whole layers; method uniform (checkpoint every
    `num_layers` layers as one unit) or block (recompute the first `num_layers` layers of each stage).
    """
    gran = _get(cfg, "activations_checkpoint_granularity")
    method = _get(cfg, "activations_checkpoint_method")
    n = _get(cfg, "activations_checkpoint_num_layers")
    if gran is None:
        if method is not None or n is not None:
            raise ValueError(
                "model.activations_checkpoint_method/num_layers are set but "
                "model.activations_checkpoint_granularity is null; set it to full (or clear the others)"
            )
        return {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
    if gran not in RECOMPUTE_GRANULARITY:
        raise ValueError(f"model.activations_checkpoint_granularity={gran!r}; supported: null, selective, full")
    if gran == "selective":
        if method is not None or n is not None:
            raise ValueError(
                "model.activations_checkpoint_granularity=selective recomputes core attention in every layer: "
                "set model.activations_checkpoint_method and activations_checkpoint_num_layers to null"
            )
        return {"recompute_granularity": "selective", "recompute_method": None, "recompute_num_layers": None}
    if method not in RECOMPUTE_METHODS:
        raise ValueError(
            f"model.activations_checkpoint_granularity=full needs model.activations_checkpoint_method "
            f"uniform or block (got {method!r})"
        )
    layers_per_stage = num_layers // max(1, pipeline_model_parallel_size)
    if n is None or not isinstance(n, int) or not 1 <= n <= layers_per_stage:
        raise ValueError(
            f"model.activations_checkpoint_num_layers={n!r} must be an integer between 1 and the layers per "
            f"pipeline stage ({layers_per_stage})"
        )
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": int(n)}
