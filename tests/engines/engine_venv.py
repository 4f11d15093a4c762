"""The vLLM venv (.venv-vllm, `make install-vllm`) the engine tests run vLLM and lmms-eval in."""
import os

from tests.model.helpers import ROOT
from tests.optional import missing

VENV = os.environ.get("NEVA_VLLM_VENV", os.path.join(ROOT, ".venv-vllm"))
PYTHON = os.path.join(VENV, "bin", "python")


def require_venv() -> None:
    if os.path.isfile(os.path.join(VENV, ".installed")):
        return
    # CI (.ci/run) sets NEVA_REQUIRE_VLLM=1 for `make test-vllm`, which builds the venv first
    missing(f"no vLLM venv at {VENV}: run `make install-vllm`", also=("NEVA_REQUIRE_VLLM",), main_switch=False)
