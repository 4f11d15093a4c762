"""`make check-deps`: `pip check` of an environment installed from the lock must report nothing but what the
lock overrides (overrides.txt) or leaves out (excludes.txt) on purpose, each stated there with its reason.

    python requirements/check_deps.py [--python VENV/bin/python]     # exit 1 on any other unmet requirement
"""
import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# uv: "The package `a` requires `b>=1`, but ..."; pip: "a 1.0 requires b, which ..." / "a 1.0 has requirement b<2, ..."
REQUIRED = re.compile(r"requires `([A-Za-z0-9_.\-]+)|requires ([A-Za-z0-9_.\-]+)|has requirement ([A-Za-z0-9_.\-]+)")


def _names(filename):
    names = set()
    for line in open(os.path.join(HERE, filename)):
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    uv = os.path.join(os.path.dirname(args.python), "uv")
    cmd = [uv, "pip", "check", "--python", args.python] if os.path.exists(uv) else [args.python, "-m", "pip", "check"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    text = out.stdout + out.stderr
    allowed = _names("overrides.txt") | _names("excludes.txt")
    problems, accepted = [], []
    for line in text.splitlines():
        match = REQUIRED.search(line)
        if match is None:
            continue
        name = next(g for g in match.groups() if g).lower().replace("_", "-")
        (accepted if name in allowed else problems).append(line.strip())
    if problems or (out.returncode != 0 and not accepted):
        print(text.strip())
        print(f"pip check: {len(problems)} unmet requirement(s) beyond the stated overrides", file=sys.stderr)
        return 1
    print(f"pip check: clean but for the {len(accepted)} stated in requirements/overrides.txt and excludes.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
