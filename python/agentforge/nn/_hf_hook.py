"""Register the ``agentforge_bitnet`` quantizer with transformers without importing transformers.

``from_pretrained`` must find the quantizer after a plain ``import agentforge``, but importing
transformers' quantizer registry costs ~2.5 s, too much for every ``import agentforge``. So a
one-shot import hook waits for ``transformers.quantizers.auto`` to be imported (by anyone) and
registers right after that module has run.
"""
import importlib.abc
import sys

_REGISTRY = "transformers.quantizers.auto"


def _register(auto_module) -> None:
    from agentforge.nn.hf_quantizer import register

    register(auto_module)


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps the registry's real loader; registers once the module body has executed."""

    def __init__(self, loader, finder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # leave no trace of the wrapper
        if self.finder in sys.meta_path:  # one shot (no finder loop is running at this point)
            sys.meta_path.remove(self.finder)
        _register(module)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds the registry through the other finders and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterExec(spec.loader, self)
                return spec
        return None


def install() -> None:
    """Register now if transformers' registry is already loaded, else when it loads."""
    if _REGISTRY in sys.modules:
        _register(sys.modules[_REGISTRY])
    elif not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())
