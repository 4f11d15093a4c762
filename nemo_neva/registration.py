"""Registration with NeMo 3: its only plugin mechanism is the config-target allow-list.

`import nemo_neva` must stay cheap (a `neva-memory-model` run or `import nemo_neva.perf.paper_model` needs no
torch / NeMo), yet NeMo must know our namespace before anyone asks it to build a `MegatronNevaModel`. So the
package registers at once when NeMo's `nemo.core.classes.common` is already loaded, and otherwise the moment it
is: a post-import hook on that one module, nothing loaded ahead of time.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

NAMESPACE = "nemo_neva.models."
_NEMO_MODULE = "nemo.core.classes.common"  # holds ALLOWED_TARGET_PREFIXES


def register_with_nemo() -> None:
    """Allow exactly our model namespace as a NeMo config `target` (idempotent, nothing broader)."""
    from nemo.core.classes import common

    _add_namespace(common)


def _add_namespace(common) -> None:
    if NAMESPACE not in common.ALLOWED_TARGET_PREFIXES:
        common.ALLOWED_TARGET_PREFIXES.append(NAMESPACE)


class _RegisterAfterLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `nemo.core.classes.common` through the other finders, runs it, then adds our namespace."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _NEMO_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                self._inner = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _add_namespace(module)
        _remove_hook()


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterLoad)]


def register_when_nemo_loads() -> None:
    """Register now if NeMo's module is loaded, else as soon as it is (one hook, installed once)."""
    common = sys.modules.get(_NEMO_MODULE)
    if common is not None:
        _add_namespace(common)
    elif not any(isinstance(f, _RegisterAfterLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLoad())
