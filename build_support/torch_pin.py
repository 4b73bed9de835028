"""scikit-build-core metadata provider: the wheel's dependencies, with torch pinned to the minor
version the extension is compiled against.

A C++ torch extension is tied to the ABI of the torch it was built with; a wheel that declared
``torch>=2.6`` would let pip install a newer torch beside it, and the extension would fail to load.
So the built wheel requires ``torch>=X.Y,<X.(Y+1)`` for the torch found at build time (the build
runs without isolation, against the torch that will run it). ``agentforge`` checks the same at
import time and names both versions when they differ.
"""

from __future__ import annotations

CORE = ["numpy"]


# The sdist's requirement: an sdist is built without torch (it compiles nothing), and a wheel
# built from it computes the exact pin again, against the torch it builds with.
UNPINNED = "torch>=2.6"


def torch_requirement() -> str:
    try:
        import torch
    except ImportError:  # an sdist build (a wheel build needs torch, and CMake fails without it)
        return UNPINNED
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def dynamic_metadata(field: str, settings=None, project=None) -> list[str]:
    if field != "dependencies":
        raise RuntimeError(f"torch_pin provides only 'dependencies', not {field!r}")
    return [torch_requirement(), *CORE]
