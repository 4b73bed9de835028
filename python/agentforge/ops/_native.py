"""Loads the compiled extension, which registers torch.ops.agentforge.* and binds cpu_info."""
import warnings

try:
    from agentforge import _C
except ImportError as exc:  # built without the extension, or a broken build
    _C = None
    warnings.warn(f"agentforge: native extension not loaded ({exc}); using the pure-PyTorch reference ops. "
                  "Reinstall with `pip install --no-build-isolation .` to get the kernels.", stacklevel=2)


def extension_loaded() -> bool:
    """True when the C++ kernels are registered under torch.ops.agentforge."""
    return _C is not None


def cpu_info() -> dict:
    """Detected CPU features, the ISA whose kernels run, and the backend the dispatcher measured
    and picked for each shape class seen so far (``dispatch``)."""
    if _C is None:
        return {"isa": "reference", "detected_isa": "unknown", "features": {}, "threads": 0,
                "backend_override": "", "dispatch": []}
    return _C.cpu_info()


def set_isa(name: str) -> None:
    """Run the kernels of a lower instruction set (``scalar``, ``avx2``, ``avx512``) than the CPU's
    best; for tests and benchmarks. Clears the measured backend table."""
    if _C is None:
        raise RuntimeError("agentforge: set_isa needs the native extension; reinstall agentforge")
    _C.set_isa(name)
