"""Install-level behaviour: a cheap `import nemo_neva`, NeMo registration when NeMo loads later, the packaged
configs and demo data found from any folder, and the quiet default log. Each runs in a fresh interpreter."""
import importlib.util
import os
import subprocess
import sys

import pytest

from nemo_neva.cli import CONF_DIR, resolve_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, cwd, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})


def test_importing_the_package_and_the_paper_model_loads_no_torch_or_nemo(tmp_path):
    proc = _python("import sys, nemo_neva, nemo_neva.perf.paper_model, nemo_neva.training.launch\n"
                   "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'nemo', 'megatron', 'lightning'}))",
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("nemo_first", [False, True], ids=["nemo_loads_after", "nemo_loaded_first"])
def test_namespace_is_registered_once_whichever_loads_first(tmp_path, nemo_first):
    steps = ["import nemo_neva", "from nemo.core.classes import common"]
    if nemo_first:
        steps = steps[::-1]
        steps.insert(1, "assert 'nemo_neva.models.' not in common.ALLOWED_TARGET_PREFIXES")
    steps += ["print(common.ALLOWED_TARGET_PREFIXES.count('nemo_neva.models.'))",
              "print(nemo_neva.MegatronNevaModel.__name__)"]
    proc = _python("\n".join(steps) + "\n", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "MegatronNevaModel"]


def test_configs_and_demo_data_ship_inside_the_package(tmp_path, monkeypatch):
    package = os.path.join(ROOT, "nemo_neva")
    assert os.path.dirname(CONF_DIR) == package and os.path.isfile(os.path.join(CONF_DIR, "neva_pretrain.yaml"))
    monkeypatch.chdir(tmp_path)  # no data/ here: the shipped configs' `data/...` come from the package
    tok = resolve_path("data/tokenizer")
    assert tok.startswith(package) and os.path.isfile(os.path.join(tok, "tokenizer.json"))
    (tmp_path / "data" / "tokenizer").mkdir(parents=True)
    assert resolve_path("data/tokenizer") == "data/tokenizer"  # the working directory wins


QUIET = ("from nemo_neva.cli import quiet_logs\n"
         "quiet_logs()\n"
         "import megatron.core.optimizer, megatron.core.models.backends\n")


# not optional: with TE installed there are no notices to fold, nothing is missing
@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TE installed: no notices")
def test_default_log_shows_the_te_apex_notices_as_one_line_and_verbose_shows_them(tmp_path):
    quiet = _python(QUIET, tmp_path, NEVA_VERBOSE="", _NEVA_NOTED="")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "not installed" not in quiet.stderr, quiet.stderr
    assert quiet.stderr.count("note: no Transformer Engine / Apex") == 1, quiet.stderr
    loud = _python(QUIET, tmp_path, NEVA_VERBOSE="1", _NEVA_NOTED="")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Transformer Engine and Apex are not installed" in loud.stderr
