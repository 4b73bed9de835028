"""Shared pieces of the pipeline tests: a three-phase pipeline of small real phases, a way to run
the CLI in a subprocess, and checks of a run directory's consistency."""

import os
import subprocess
import sys
from pathlib import Path

import pipeline_phase_polish
import pipeline_phase_seedling
from agentforge import rundir
from agentforge.artifacts import sha256_dir, sha256_file
from agentforge.data.spec import DATA_ARTIFACT
from agentforge.registry import REGISTRY_FILE, Registry

# One thread: the subprocesses run next to each other on a shared 2-core machine, and a run that
# resumes must compute exactly what the uninterrupted one computed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}

# seedling -> polish: two small real phases on the runtime.
TEST_PHASES = [pipeline_phase_seedling.SPEC, pipeline_phase_polish.SPEC]


def agentforge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m agentforge ARGS`` in a subprocess (exactly what a user runs)."""
    return subprocess.run(
        [sys.executable, "-m", "agentforge", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of everything under ``root`` (to prove nothing was written)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def assert_consistent(run_dir: Path, phases) -> None:
    """No orphans: every completed phase's artifacts are registered with their current hashes,
    nothing else is registered, every handoff joins registered models of completed phases, and
    no temp or half-swapped entry is left anywhere."""
    completed = {}
    for spec in phases:
        phase_dir = run_dir / spec.dirname
        record = rundir.read_record(phase_dir)
        if record is not None:
            assert rundir.record_problem(phase_dir, record) is None, spec.name
            completed[spec.name] = (phase_dir, record)
    with Registry(run_dir / REGISTRY_FILE) as registry:
        models, handoffs = registry.models(), registry.handoffs()
    assert {m["phase"] for m in models} <= set(completed)
    for name, (phase_dir, record) in completed.items():
        paths = [
            p
            for artifact, value in rundir.absolute_artifacts(phase_dir, record).items()
            if artifact != DATA_ARTIFACT
            for p in rundir.artifact_paths(value)
        ]
        registered = {m["path"]: m for m in models if m["phase"] == name}
        assert sorted(registered) == sorted(p.relative_to(run_dir).as_posix() for p in paths)
        for path in paths:
            files = sha256_dir(path) if path.is_dir() else {path.name: sha256_file(path)}  # model.afz is one file
            assert registered[path.relative_to(run_dir).as_posix()]["sha256"] == rundir.files_digest(files)
        assert rundir.verify(phase_dir, record) == [], name
    ids = {m["id"] for m in models}
    for handoff in handoffs:
        assert handoff["from_phase"] in completed and handoff["to_phase"] in completed
        assert handoff["models"] and set(handoff["models"]) <= ids
    leftovers = [p for p in run_dir.rglob(".*") if ".tmp-" in p.name or p.name.endswith(".old")]
    assert leftovers == []
