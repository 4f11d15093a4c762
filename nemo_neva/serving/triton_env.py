"""What PyTriton 0.7.0 needs from the machine, prepared by the launcher rather than the user's shell.

1. `libpython3.X.so`: Triton's Python-backend stub (the process that hands requests to our callable) links
   against it; the directory (sysconfig LIBDIR) goes on LD_LIBRARY_PATH of the processes we start. Only the
   children read it, so setting it in `os.environ` before Triton starts is enough (no re-exec).
2. NumPy 1 for that stub: its compiled code misreads BYTES tensors under NumPy 2 (lengths such as
   0x05050505 for a 5-byte string; nvidia-pytriton pins numpy<2). This project runs NumPy 2, so the stub
   runs in a small side environment, `<venv>/triton-stub-env`: numpy 1.26 + ml_dtypes 0.5 of its own and
   everything else read from this environment (a .pth file). Our process keeps NumPy 2.

    python -m nemo_neva.serving.triton_env [--path DIR]   # create the side environment (`make install` does)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import sysconfig
from typing import Optional

PYTRITON_VERSION = "0.7.0"
STUB_PACKAGES = ["numpy==1.26.4", "ml_dtypes==0.5.4"]


class TritonEnvError(RuntimeError):
    """The machine cannot run PyTriton as this project uses it; the message says what to do."""


def default_stub_env() -> str:
    return os.path.join(sys.prefix, "triton-stub-env")


def _site_packages(env: str) -> pathlib.Path:
    return pathlib.Path(env) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _numpy_major(paths=None) -> Optional[int]:
    for dist in importlib.metadata.distributions(path=paths) if paths else importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "numpy":
            return int(dist.version.split(".")[0])
    return None


def needs_stub_env() -> bool:
    import numpy

    return int(numpy.__version__.split(".")[0]) >= 2


def check_stub_env(path: str) -> str:
    """`path` if it is a usable side environment, else a TritonEnvError saying how to make one."""
    make = f"create it with `{sys.executable} -m nemo_neva.serving.triton_env --path {path}` (`make install` does)"
    if not os.path.isfile(os.path.join(path, "bin", "python")):
        raise TritonEnvError(f"PyTriton's Python-backend stub needs NumPy 1 and this environment has NumPy 2; "
                             f"its side environment {path} is missing: {make}")
    major = _numpy_major([str(_site_packages(path))])
    if major is None or major >= 2:
        raise TritonEnvError(f"{path} has no NumPy 1 for PyTriton's stub: {make}")
    return path


def libpython_dir() -> str:
    """The directory holding this interpreter's shared libpython, which the stub links against."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    name = sysconfig.get_config_var("LDLIBRARY") or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not os.path.exists(os.path.join(libdir, name)):
        raise TritonEnvError(f"Triton's Python backend needs a shared libpython ({name}); this Python "
                             f"({sys.executable}) has none in {libdir!r}: use a Python built with --enable-shared")
    return libdir


def prepare(stub_env: Optional[str] = None) -> dict:
    """Set up this process so that the Triton server it starts can run our callable. Returns what was set."""
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        raise TritonEnvError("nvidia-pytriton is not installed: pip install \"nemo_neva[triton]\" (or `make install`)")
    if version != PYTRITON_VERSION:
        raise TritonEnvError(f"nvidia-pytriton {version} is installed; this server is written for "
                             f"{PYTRITON_VERSION} (pip install \"nemo_neva[triton]\")")
    libdir = libpython_dir()
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])
    done = {"LD_LIBRARY_PATH": libdir, "stub_env": None}
    if needs_stub_env() or stub_env:
        env = check_stub_env(stub_env or default_stub_env())
        import pytriton.server.triton_server as triton_server

        if not hasattr(triton_server, "get_triton_python_backend_python_env"):
            raise TritonEnvError("this nvidia-pytriton has no get_triton_python_backend_python_env to redirect")
        # PyTriton starts the stub with `<env>/bin` first on PATH; the stub's Python finds its prefix there.
        triton_server.get_triton_python_backend_python_env = lambda: pathlib.Path(env)
        done["stub_env"] = env
    return done


def _our_site_dirs() -> list[str]:
    """This interpreter's site-packages, and the directories .pth files added after them."""
    sites = [p for p in sysconfig.get_paths().values() if p.endswith("site-packages")]
    first = next((i for i, p in enumerate(sys.path) if p in sites), len(sys.path))
    extra = [p for p in sys.path[first:] if p and os.path.isdir(p) and not p.endswith(".zip")]
    out = []
    for p in [*sites, *extra]:
        if p not in out and os.path.isdir(p):
            out.append(p)
    return out


def create_stub_env(path: str) -> str:
    """A venv of the base interpreter with NumPy 1 of its own that reads all else from this environment."""
    path = os.path.abspath(path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", path], check=True)
    site = _site_packages(path)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-warn-conflicts", "--target",
                    str(site), *STUB_PACKAGES], check=True)
    (site / "zz_nemo_neva_parent_env.pth").write_text("".join(p + "\n" for p in _our_site_dirs()))
    check_stub_env(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=default_stub_env(), help="where to create it (default: %(default)s)")
    args = ap.parse_args(argv)
    print(f"PyTriton stub environment (NumPy 1): {create_stub_env(args.path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
