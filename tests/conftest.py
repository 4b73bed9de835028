"""Fixtures for the op tests. Plain helpers are in helpers.py."""

import os

# Nothing in the tests may reach the network (some model tests load transformers configs).
os.environ["HF_HUB_OFFLINE"] = "1"
# Training code logs to W&B; tests never do (offline runs would litter the working directory).
os.environ["WANDB_MODE"] = "disabled"

import pytest
import torch

import agentforge.ops as ops
from helpers import BACKENDS, supported_isas, using_isa


def pytest_configure(config):
    # Declared in pyproject.toml too; repeated so that tests/asan.sh, which runs the test
    # files from outside the repository, does not warn about unknown marks.
    config.addinivalue_line("markers", "slow: long-running test, deselect with -m 'not slow'")


@pytest.fixture(params=supported_isas())
def isa(request):
    """Every kernel ISA this CPU can run; the previously active ISA is restored afterwards."""
    with using_isa(request.param):
        assert ops.cpu_info()["isa"] == request.param  # else every ISA would silently test the same kernels
        yield request.param


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Force each matmul backend in turn (the kernels read the variable on every call)."""
    monkeypatch.setenv("AGENTFORGE_BACKEND", request.param)
    assert ops.cpu_info()["backend_override"] == request.param
    return request.param


# (prepacked layout, AGENTFORGE_BACKEND): every matmul kernel family. base3 weights have one kernel.
KERNELS = {"2bit-int8": ("2bit", "int8"), "2bit-popcount": ("2bit", "popcount"), "base3": ("base3", "auto")}


@pytest.fixture(params=list(KERNELS))
def kernel(request, monkeypatch):
    """Each prepacked layout with each backend that reads it; returns the layout to prepack in."""
    layout, backend = KERNELS[request.param]
    monkeypatch.setenv("AGENTFORGE_BACKEND", backend)
    return layout


@pytest.fixture(autouse=True)
def _seed():
    # Every test draws its random inputs from the same seed: failures reproduce exactly.
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module of tiny models: thread start-up costs more than their
    math, oversubscribed threads on a busy 2-core machine stall each other (measured 10-50x
    slower), and subprocess workers that run on one thread then compare bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cognate_micro(tmp_path_factory):
    """Phase 1 run once on the micro preset: (phase dir, PhaseResult). Later phases' tests start
    from its trunk and siblings (and its data.json, the run's data spec)."""
    from agentforge.phases import cognate
    from agentforge.runtime import run_alone

    out = tmp_path_factory.mktemp("cognate")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_alone(
            cognate.SPEC, {}, out, preset="micro", wandb_mode="disabled", progress=False, say=lambda _: None
        )
    finally:
        torch.set_num_threads(before)
    return out, result
