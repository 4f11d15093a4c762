"""What the launch test wrappers share: after patching, run `sys.argv[1]` as `python <script> <args>` would."""
import runpy
import sys


def run_script_from_argv() -> None:
    script = sys.argv[1]
    sys.argv = [script] + sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
