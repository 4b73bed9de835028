"""Run a callback right after a module is imported, by anyone, without importing it ourselves.

``import agentforge`` must make transformers know agentforge's model type and quantization
method (so ``AutoModelForCausalLM.from_pretrained`` works on our artifacts), but importing
transformers' registries costs seconds, too much for every ``import agentforge``. So a meta-path
finder wraps the loader of each watched module and calls its callbacks once the module body has
run; if the module is already imported, the callback runs at once.
"""

import importlib.abc
import sys
from collections.abc import Callable

_CALLBACKS: dict[str, list[Callable]] = {}


class _CallAfterExec(importlib.abc.Loader):
    """Wraps a module's real loader; runs the callbacks once the module body has executed."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # leave no trace of the wrapper
        for callback in _CALLBACKS.pop(module.__name__, []):
            callback(module)


class _WatchFinder(importlib.abc.MetaPathFinder):
    """Finds a watched module through the other finders and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _CALLBACKS:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _CallAfterExec(spec.loader)
                return spec
        return None


def after_import(module_name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once ``module_name`` is imported (now, if it already is)."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    _CALLBACKS.setdefault(module_name, []).append(callback)
    if not any(isinstance(finder, _WatchFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WatchFinder())
