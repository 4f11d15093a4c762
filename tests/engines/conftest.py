import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: a real serving engine (vLLM's CPU build); run with `make test-vllm`")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    # not optional: by marker (the engine tests' own switch is NEVA_REQUIRE_VLLM, in test_vllm.py)
    skip = pytest.mark.skip(reason="vllm engine: run with `make test-vllm` (pytest -m vllm tests/engines)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
