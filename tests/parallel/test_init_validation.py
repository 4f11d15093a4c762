"""Parallel layout validation: every impossible layout fails before any group is built, naming the fix."""
import pytest

from nemo_neva.parallel.init import ParallelConfigError, validate_parallel_layout


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(tp=2, pp=2, world_size=6), ["world size 6", "tensor_model_parallel_size x pipeline_model_parallel_size = 4",
                                          "multiple of 4"]),
        (dict(tp=3, pp=1, world_size=3, num_attention_heads=4), ["num_attention_heads=4", "tensor_model_parallel_size=3",
                                                                 "divides 4"]),
        (dict(tp=4, pp=1, world_size=4, num_attention_heads=8, num_query_groups=2),
         ["num_query_groups=2", "tensor_model_parallel_size=4"]),
        (dict(tp=1, pp=4, world_size=4, num_layers=2), ["num_layers=2", "pipeline_model_parallel_size=4",
                                                        "pipeline_model_parallel_size <= 2"]),
        (dict(tp=1, pp=2, world_size=2, num_layers=3), ["num_layers=3", "not divisible", "pipeline_model_parallel_size=2"]),
        (dict(tp=1, pp=2, world_size=2, num_layers=6, vp=2, cuda_available=True),
         ["virtual_pipeline_model_parallel_size=2", "= 4"]),
        (dict(tp=1, pp=1, world_size=1, sequence_parallel=True), ["sequence_parallel", "sequence_parallel=false",
                                                                 "tensor_model_parallel_size >= 2"]),
        (dict(tp=1, pp=2, world_size=2, num_layers=4, vp=2, cuda_available=False), ["virtual", "CPU",
                                                                                    "virtual_pipeline_model_parallel_size=null"]),
        (dict(tp=1, pp=1, world_size=1, vp=2), ["needs pipeline_model_parallel_size > 1"]),
        (dict(tp=1, pp=1, world_size=2, cp=2, cuda_available=False), ["context_parallel_size=1 on CPU"]),
        (dict(tp=0, pp=1, world_size=1), ["tensor_model_parallel_size=0"]),
    ],
)
def test_invalid_layouts_name_the_fix(kwargs, words):
    with pytest.raises(ParallelConfigError) as err:
        validate_parallel_layout(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tp=1, pp=1, world_size=1, num_attention_heads=4, num_query_groups=2, num_layers=2),
        dict(tp=2, pp=1, world_size=4, num_attention_heads=4, num_query_groups=2, num_layers=2, sequence_parallel=True),
        dict(tp=1, pp=2, world_size=2, num_attention_heads=4, num_layers=2),
        dict(tp=2, pp=2, world_size=8, num_attention_heads=8, num_query_groups=8, num_layers=4),
        dict(tp=1, pp=2, world_size=2, num_layers=4, vp=2, cuda_available=True),
        dict(tp=1, pp=1, world_size=2, cp=2, cuda_available=True),
    ],
)
def test_valid_layouts_pass(kwargs):
    validate_parallel_layout(**kwargs)


def test_world_size_mismatch_is_reported(monkeypatch):
    """An explicit world_size that differs from the running processes is refused before megatron-core runs."""
    import torch.distributed as dist

    from nemo_neva.parallel import init

    monkeypatch.setattr(init, "ensure_distributed", lambda backend=None: None)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    with pytest.raises(ParallelConfigError, match="world_size=2 was asked for but 1 processes are running"):
        init.initialize_model_parallel_from_cfg(tp=2, world_size=2)
