import warnings

try:
    from agentforge import _C
except ImportError as exc:  # built without the extension, or a broken build
    _C = None
    warnings.warn(f"agentforge: native extension not loaded ({exc}); using the pure-PyTorch reference ops. "
                  "Reinstall with `pip install --no-build-isolation .` to get the kernels.", stacklevel=2)


def extension_loaded() -> bool:
    return _C is not None


def cpu_info() -> dict:
    if _C is None:
        return {"isa": "reference", "detected_isa": "unknown", "features": {}, "threads": 0,
                "backend_override": "", "dispatch": []}
    return _C.cpu_info()
