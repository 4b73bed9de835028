"""Loads the compiled extension, which registers torch.ops.agentforge.* and binds cpu_info, and
the machine measurements built on it (cache sizes, read bandwidth, the cold layout choice)."""

import os
import re
import warnings

# torch before the extension, which links against its libraries (libc10, libtorch_cpu, ...).
# The installed extension also finds them on its own, through its rpath to torch/lib.
import torch

DISTRIBUTION = "agentforge-ternary"


def pin_problem(pin: str, torch_version: str) -> str | None:
    """Why ``torch_version`` cannot run an extension built under the requirement ``pin`` (the
    wheel's ``torch>=X.Y,<X.(Y+1)``, build_support/torch_pin.py), or None when it can."""
    have = tuple(int(part) for part in torch_version.split("+")[0].split(".")[:2])
    low, high = re.search(r">=\s*(\d+)\.(\d+)", pin), re.search(r"<\s*(\d+)\.(\d+)", pin)
    if (low and have < (int(low[1]), int(low[2]))) or (high and have >= (int(high[1]), int(high[2]))):
        wanted = pin.removeprefix("torch").strip()
        return (
            f"agentforge was built against torch {wanted} but torch {torch_version} is installed; "
            f"install that torch (pip install 'torch{wanted}') or rebuild agentforge against this one "
            "(pip install --no-build-isolation .)"
        )
    return None


def _installed_pin() -> str | None:
    """The torch requirement of the installed distribution (None in a source checkout)."""
    from importlib import metadata

    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    return next((r for r in requirements if re.match(r"torch\s*[<>=]", r) and ";" not in r), None)


try:
    from agentforge import _C  # type: ignore[attr-defined]  # the compiled extension, no stub
except ImportError as exc:  # built without the extension, a broken build, or another torch
    pin = _installed_pin()
    mismatch = pin_problem(pin, torch.__version__) if pin else None
    if mismatch:
        raise ImportError(mismatch) from exc
    _C = None
    warnings.warn(
        f"agentforge: native extension not loaded ({exc}); using the pure-PyTorch reference ops. "
        "Reinstall with `pip install --no-build-isolation .` to get the kernels.",
        stacklevel=2,
    )


def extension_loaded() -> bool:
    """True when the C++ kernels are registered under torch.ops.agentforge."""
    return _C is not None


def cpu_info() -> dict:
    """Detected CPU features, the ISA whose kernels run, and the backend the dispatcher measured
    and picked for each shape class seen so far (``dispatch``)."""
    if _C is None:
        return {
            "isa": "reference",
            "detected_isa": "unknown",
            "features": {},
            "threads": 0,
            "backend_override": "",
            "dispatch": [],
        }
    return _C.cpu_info()


def set_isa(name: str) -> None:
    """Run the kernels of a lower instruction set (``scalar``, ``avx2``, ``avx512``) than the CPU's
    best; for tests and benchmarks. Clears the measured backend table."""
    if _C is None:
        raise RuntimeError("agentforge: set_isa needs the native extension; reinstall agentforge")
    _C.set_isa(name)


def cache_bytes(level: int) -> int | None:
    """Size of the data/unified cache of the given level seen by CPU 0 (Linux sysfs), or None."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f"{base}/{entry}/level") as f:
                if int(f.read()) != level:
                    continue
            with open(f"{base}/{entry}/type") as f:
                if f.read().strip() not in ("Data", "Unified"):
                    continue
            with open(f"{base}/{entry}/size") as f:
                size = f.read().strip().upper()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit():
            return int(digits) * mult
    return None


def last_level_cache_bytes() -> int:
    """The largest cache (L3, else L2) in bytes; 32 MiB when sysfs does not say."""
    return cache_bytes(3) or cache_bytes(2) or 32 << 20


_cold_layouts: dict = {}


def cold_layout(N: int, K: int) -> str:
    """``"2bit"`` or ``"base3"``: the prepacked layout whose one-token matmul of N x K weights is
    faster when the weights stream from memory (every cache flushed before each timed call),
    measured once per (ISA, threads, N, K) in this process. Without the extension: ``"2bit"``."""
    if _C is None:
        return "2bit"
    key = (_C.cpu_info()["isa"], torch.get_num_threads(), N, K)
    if key not in _cold_layouts:
        _cold_layouts[key] = _C.cold_layout(N, K)[0]
    return _cold_layouts[key]


def read_bandwidth(nbytes: int | None = None, reps: int = 7) -> float:
    """The machine's read bandwidth in GB/s on torch's current threads: the best of ``reps`` reads
    of a buffer (default 8x the last-level cache, where it streams from memory) by a STREAM-like
    kernel, each thread reading one contiguous share, as the GEMV's threads do."""
    if _C is None:
        raise RuntimeError("agentforge: read_bandwidth needs the native extension; reinstall agentforge")
    return _C.read_bandwidth(nbytes or 8 * last_level_cache_bytes(), reps)
