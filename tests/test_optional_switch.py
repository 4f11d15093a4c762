"""NEVA_REQUIRE_OPTIONAL=1 (set by .ci/run) turns a missing optional dependency into a failure, and no skip in the
suite escapes it: every skip call goes through tests/optional.py or says beside it why it is not about a missing
package (`# not optional: ...` on its line or the line above)."""
import ast
import os
import subprocess
import sys

from tests.model.helpers import ROOT

TESTS = os.path.join(ROOT, "tests")
HELPER = os.path.join(TESTS, "optional.py")
MARK = "# not optional"
SKIPS = {"skip", "skipif", "importorskip"}


def _skip_calls(path):
    """(line, what) of every pytest skip in the file: calls of pytest.skip / importorskip / mark.skip(if), and
    `from pytest import skip` style imports."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.ImportFrom) and node.module == "pytest":
            found += [(node.lineno, f"from pytest import {a.name}") for a in node.names if a.name in SKIPS]
        if isinstance(node, ast.Attribute) and node.attr in SKIPS and "pytest" in ast.unparse(node.value):
            near = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
            if MARK not in near:
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_every_skip_goes_through_the_switch_or_says_why_not():
    offenders = []
    for folder, _, files in os.walk(TESTS):
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.endswith(".py") and path not in (HELPER, os.path.abspath(__file__)):
                offenders += [f"{os.path.relpath(path, ROOT)}:{line}: {what}" for line, what in _skip_calls(path)]
    assert not offenders, ("skips outside tests/optional.py (use require() / missing(), or add "
                           f"'{MARK}: <why>'):\n" + "\n".join(offenders))


def test_the_scan_finds_a_bare_importorskip(tmp_path):
    """The scan itself can fail: a file with the old patterns is reported, line by line."""
    bad = tmp_path / "test_bad.py"
    bad.write_text("import pytest\nfrom pytest import importorskip\nx = pytest.importorskip('nope')\n"
                   "def test_a():\n    try:\n        import nope\n    except ImportError:\n        pytest.skip('no')\n"
                   "def test_b():\n    pytest.skip('fine')  # not optional: a reason\n")
    assert [line for line, _ in _skip_calls(str(bad))] == [2, 3, 8]


PROBE = """
from tests.optional import require
require("nemo_neva_no_such_module")

def test_runs():
    pass
"""


def _probe(tmp_path, **env):
    (tmp_path / "test_probe.py").write_text(PROBE)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("NEVA_REQUIRE_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**run_env, "PYTHONPATH": ROOT, **env})


def test_a_missing_module_skips_by_default_and_fails_under_the_switch(tmp_path):
    skipped = _probe(tmp_path)
    # a module-level skip: exit 5 here (no test ran); in the whole suite the module counts as skipped
    assert skipped.returncode == 5 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    assert "nemo_neva_no_such_module is not importable" in skipped.stdout
    failed = _probe(tmp_path, NEVA_REQUIRE_OPTIONAL="1")
    assert failed.returncode == 2 and "1 error" in failed.stdout, failed.stdout[-2000:]  # a collection error
    assert "NEVA_REQUIRE_OPTIONAL=1 but nemo_neva_no_such_module is not importable" in failed.stdout
