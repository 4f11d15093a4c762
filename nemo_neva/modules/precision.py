"""FP8 (Transformer Engine) and activation-recompute settings: config -> megatron-core TransformerConfig fields.

Config keys (all under `model.`, commented in conf/network/tiny.yaml):

    fp8: null | hybrid | e4m3        hybrid = E4M3 forward, E5M2 gradients (the usual training choice)
    fp8_recipe: delayed | tensorwise delayed = amax-history scaling (DelayedScaling);
                                     tensorwise = per-tensor current scaling (TE >= 2.2, Float8CurrentScaling)
    fp8_margin, fp8_amax_history_len, fp8_amax_compute_algo (most_recent | max)   -- delayed scaling only
    fp8_wgrad: true                  false = weight-gradient GEMM in bf16: Transformer Engine 1.x only, refused
                                     on TE 2.x (its recipes dropped the override; see fp8_wgrad_problem)

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
    wgrad = bool(_get(cfg, "fp8_wgrad", True))
    problem = fp8_wgrad_problem(wgrad, installed_te_version())
    if problem:
        raise ValueError(problem)
    if hidden_size is not None and ffn_hidden_size is not None:
        problem = fp8_dims_problem(cfg, hidden_size, ffn_hidden_size)
        if problem:
            raise ValueError(problem)
    return {
        "fp8": fmt,
        "fp8_recipe": recipe,
        "fp8_margin": margin,
        "fp8_amax_history_len": history,
        "fp8_amax_compute_algo": algo,
        "fp8_wgrad": wgrad,
    }


def _fp8_gemm_dims(hidden: int, ffn: int, heads: int, groups: int, kv: int, tp: int) -> list:
    """(name, full size, per-rank divisor, multiple) of every TE GEMM dimension of one layer on a TP rank. TE's
    FP8 GEMMs assert (`assert_dim_for_fp8_exec`, on the input and the weight) that a matrix's last dim is a
    multiple of 16 and its rows a multiple of 8: the in-features of every linear and the out-features of
    the column-parallel QKV (the MLP's fc1 out-features follow from ffn / TP being a multiple of 16)."""
    return [("hidden_size", hidden, 1, 16),
            ("ffn_hidden_size", ffn, tp, 16),
            ("num_attention_heads x kv_channels", heads * kv, tp, 16),
            ("(num_attention_heads + 2 x num_query_groups) x kv_channels", (heads + 2 * groups) * kv, tp, 8)]


def fp8_dims_problem(cfg, hidden: int, ffn: int) -> Optional[str]:
    """None when every per-rank GEMM dimension FP8 meets takes it; else one line naming the dimension, the
    sizes of it that work at this TP, and the TP sizes that work with the model as it is."""
    heads = int(_get(cfg, "num_attention_heads"))
    groups = int(_get(cfg, "num_query_groups") or heads)
    kv = int(_get(cfg, "kv_channels") or hidden // heads)
    tp = int(_get(cfg, "tensor_model_parallel_size", 1))

    def bad(t):
        return [(n, v, d, m) for n, v, d, m in _fp8_gemm_dims(hidden, ffn, heads, groups, kv, t) if v % (d * m)]

    wrong = bad(tp)
    if not wrong:
        return None
    name, value, div, mult = wrong[0]
    step = div * mult
    below, above = value // step * step, (value // step + 1) * step
    sizes = f"{below} or {above}" if below else f"{above}"
    tps = [t for t in range(1, heads + 1) if heads % t == 0 and groups % t == 0 and not bad(t)]
    per_rank = f"{name} / tensor_model_parallel_size = {value}/{tp}" if div > 1 else f"{name} = {value}"
    return (f"model.fp8 needs {per_rank} to be a multiple of {mult} (Transformer Engine's FP8 GEMMs); "
            f"sizes that work at tensor_model_parallel_size={tp}: {name} = {sizes}; "
            f"tensor_model_parallel_size that work for this model: {', '.join(map(str, tps)) or 'none'}")


def installed_te_version() -> Optional[str]:
    """Transformer Engine's installed version from the package metadata (no import, so no CUDA needed), or None."""
    from importlib import metadata

    for dist in ("transformer_engine", "transformer_engine_torch"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def fp8_wgrad_problem(fp8_wgrad: bool, te_version: Optional[str]) -> Optional[str]:
    """`model.fp8_wgrad=false` (weight-gradient GEMM in high precision) needs TE 1.x: TE 2.0 removed
    `DelayedScaling(override_linear_precision=...)`, which megatron-core still passes, and TE's pydantic recipes
    drop the unknown keyword silently, so on TE 2.x the key would do nothing. One line when that is the case."""
    if fp8_wgrad or te_version is None:
        return None
    major = int(str(te_version).split(".")[0] or 0)
    if major < 2:
        return None
    return (f"model.fp8_wgrad=false has no effect on Transformer Engine {te_version} (TE 2.x recipes have no "
            "wgrad-precision override): remove it (fp8_wgrad=true), or use Transformer Engine 1.x")


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
        # only TE 1.x reaches here with fp8_wgrad=false (fp8_wgrad_problem refuses it on 2.x)
        **({} if kwargs["fp8_wgrad"] else {"override_linear_precision": (False, False, True)}),
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
