"""megatron-core outside the tested range: one line naming the fix, at import and at model build."""
import os
import re
import subprocess
import sys
from importlib.metadata import version

import pytest

from nemo_neva.compat.mcore_range import MAX_VERSION, MIN_VERSION, REQUIREMENT, UnsupportedMegatronCore, check_megatron_core

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_installed_version_is_in_range():
    assert check_megatron_core() == version("megatron-core")


@pytest.mark.parametrize("found", ["0.15.3", "0.16.0", "0.20.0", "1.0.0"])
def test_outside_range_refused_naming_the_fix(found):
    with pytest.raises(UnsupportedMegatronCore) as err:
        check_megatron_core(found)
    msg = str(err.value)
    assert "\n" not in msg and found in msg and f"pip install '{REQUIREMENT}'" in msg


@pytest.mark.parametrize("found", ["0.16.1", "0.17.0", "0.19.2", "0.19.9"])
def test_inside_range_accepted(found):
    assert check_megatron_core(found) == found


def test_package_metadata_states_the_same_bounds():
    """pyproject.toml declares exactly the range the import check enforces."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    bounds = re.findall(r"megatron-core\s*([<>=!~][^\"']*)", text)
    assert bounds, "no megatron-core requirement found in pyproject.toml"
    assert all(b.replace(" ", "") == f">={MIN_VERSION},<{MAX_VERSION}" for b in bounds), bounds


def test_import_refuses_an_out_of_range_install(tmp_path):
    """A real distribution record of megatron-core 0.15.0 found first on the path: `import nemo_neva` stops
    with the one-line message (the last line of the traceback), before megatron-core is imported."""
    info = tmp_path / "megatron_core-0.15.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-core\nVersion: 0.15.0\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, "-c", "import nemo_neva"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"nemo_neva.compat.mcore_range.UnsupportedMegatronCore: nemo_neva is tested with {REQUIREMENT}, "
                    f"found megatron-core 0.15.0; pip install '{REQUIREMENT}'"), proc.stderr[-2000:]
