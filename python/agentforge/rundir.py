"""A run directory on disk and what proves each part of it complete.

    DIR/run.json            config, phase selection, status (written atomically)
    DIR/.lock               flock held by the running process; holds its pid
    DIR/NN-phase/           one directory per phase (the phase writes here)
      started.json          settings, data spec, seed and input digests the phase was started with
      phase.json            written last: artifacts, metrics and the sha256 of every file
    DIR/metrics.jsonl       one row per completed phase (rebuilt from the phase.json files)
    DIR/registry.sqlite     models and handoffs (agentforge.registry; derived from the phase.json files)
    DIR/report.html         agentforge.report

The integrity model. ``phase.json`` is the one record of a finished phase. It lists every file of
its artifacts (a model directory's files come from its ``agentforge.json`` manifest, written with
it) and of its reports (summary.json, metrics.jsonl) with sha256 and size. An artifact's digest is
one sha256 over its files' hashes; a consuming phase records the digests of its inputs, so the
records chain: an artifact changed after a later phase consumed it no longer matches that phase's
record. Checks come in two strengths: ``record_problem`` (every listed file present with its
recorded size; what ``status``, the report and resume decisions read, with no hashing) and
``verify`` (every hash: once per handoff, before a phase consumes an artifact, and in
``agentforge status --verify``). Artifact paths resolve only inside their own phase directory.
Hidden files (``.DS_Store``, editor swap files) are never part of a record and never block one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agentforge.artifacts import atomic_write_json, atomic_write_text, recover_directory, sha256_dir, sha256_file
from agentforge.errors import ConfigError, PipelineError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
PHASE_FILE = "phase.json"
START_FILE = "started.json"
PROGRESS_FILE = "progress.log"
RECORD_FORMAT = 2


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# the lock


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """The pid (as text) of the process that holds ``run_dir``'s lock, else None. Writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # A shared probe conflicts with the holder's exclusive lock, never with another probe.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return _read_pid(path)
    finally:
        os.close(fd)  # closing releases a probe that succeeded
    return None


class RunLock:
    """An exclusive ``flock`` on ``DIR/.lock`` for the life of a run. The kernel drops it when the
    process dies, ``kill -9`` included, so a crashed run never leaves its directory locked."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``ConfigError`` naming the pid that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(5):  # another process may be probing with a shared lock just now
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if attempt == 4:
                    os.close(fd)
                    raise ConfigError(
                        f"{self.path.parent} is held by another run (pid {_read_pid(self.path)})"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file means no run is active)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# run.json


def read_run(run_dir: str | os.PathLike) -> dict | None:
    """``DIR/run.json``, or None when ``DIR`` holds no run."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); this run directory cannot be resumed") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ConfigError(f"{path} has no config; this run directory cannot be resumed")
    return info


def write_run(run_dir: str | os.PathLike, info: dict) -> None:
    """Replace ``DIR/run.json`` atomically, stamping ``updated``."""
    atomic_write_json(Path(run_dir) / RUN_FILE, {**info, "updated": now()})


# ---------------------------------------------------------------------------------------------
# artifacts and phase records


def files_digest(files: dict[str, str]) -> str:
    """One sha256 for a set of files: over their sorted relative paths and hashes."""
    text = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def artifact_paths(value: Any) -> list[Path]:
    """An artifact value (one path or a list of them) as a list of paths."""
    return [Path(p) for p in value] if isinstance(value, (list, tuple)) else [Path(value)]


def _listed_files(path: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of a model directory as its manifest lists them (the writer
    hashed them moments ago), or of any other directory or file, hashed now."""
    from agentforge.artifacts import MANIFEST, read_manifest_files

    if path.is_dir():
        if (path / MANIFEST).is_file():
            return {**read_manifest_files(path), MANIFEST: sha256_file(path / MANIFEST)}
        return sha256_dir(path)
    return {"": sha256_file(path)}


def artifact_files(root: Path, value: Any) -> dict[str, str]:
    """``{path relative to root: sha256}`` of every file of an artifact (files or directories)."""
    files = {}
    for path in artifact_paths(value):
        relative = path.relative_to(root).as_posix()
        for name, digest in _listed_files(path).items():
            files[f"{relative}/{name}" if name else relative] = digest
    return files


def _inside(phase_dir: Path, relative: str) -> Path:
    path = (phase_dir / relative).resolve()
    if not path.is_relative_to(phase_dir.resolve()) or Path(relative).is_absolute():
        raise PipelineError(
            f"{phase_dir / PHASE_FILE}: artifact path {relative!r} leaves the phase directory; "
            "the record has been edited, re-run the phase"
        )
    return phase_dir / relative


def absolute_artifacts(phase_dir: Path, record: dict) -> dict[str, Any]:
    """The record's artifacts (stored relative to the phase directory) as paths; a path that
    leaves the phase directory is refused."""
    return {
        name: [_inside(phase_dir, p) for p in value] if isinstance(value, list) else _inside(phase_dir, value)
        for name, value in record["artifacts"].items()
    }


def artifact_digest(record: dict, name: str) -> str:
    """The digest of one artifact of a completed phase, from the hashes its record lists."""
    return files_digest(files_of(record, name))


def files_of(record: dict, name: str) -> dict[str, str]:
    """The record's ``{relative path: sha256}`` of artifact ``name``."""
    paths = [p.as_posix() for p in artifact_paths(record["artifacts"][name])]
    return {k: v for k, v in record["files"].items() if any(k == p or k.startswith(p + "/") for p in paths)}


def read_record(phase_dir: Path, name: str = PHASE_FILE) -> dict | None:
    """A phase's ``phase.json`` (or ``started.json``), or None when it is absent, unreadable or
    lacks the fields a record has."""
    try:
        record = json.loads((phase_dir / name).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    if name == PHASE_FILE and not (
        isinstance(record.get("files"), dict)
        and isinstance(record.get("sizes"), dict)
        and isinstance(record.get("artifacts"), dict)
        and isinstance(record.get("seconds"), (int, float))
    ):
        return None
    return record


def record_problem(phase_dir: Path, record: dict | None) -> str | None:
    """Why ``record`` does not prove its phase complete, by presence and size (no hashing); None
    when every listed file is there with its recorded size."""
    if record is None:
        return f"{PHASE_FILE} is missing or unreadable"
    for relative, size in record["sizes"].items():
        path = phase_dir / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != size:
            return f"{relative} has changed since it was written (size)"
    return None


def verify(phase_dir: Path, record: dict | None, names: list[str] | None = None) -> list[str]:
    """Every mismatch between the files and ``record`` (of the artifacts ``names``, or of everything
    it lists), by hash: missing, changed, or a file the directory holds that the record does not
    list (hidden files aside). Empty when everything matches."""
    if record is None:
        return [f"{PHASE_FILE} is missing or unreadable"]
    listed = record["files"] if names is None else {k: v for n in names for k, v in files_of(record, n).items()}
    problems = []
    for relative, digest in listed.items():
        path = phase_dir / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{relative} has changed since it was written")
    roots = record["artifacts"] if names is None else {n: record["artifacts"][n] for n in names}
    for value in roots.values():
        for relative in artifact_paths(value):
            root = phase_dir / relative
            if root.is_dir():
                for path in sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root)):
                    name = path.relative_to(phase_dir).as_posix()
                    if name not in listed:
                        problems.append(f"{name} is not part of the artifact it sits in (remove it)")
    return problems


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def finished_record(
    phase_dir: Path,
    start: dict,
    relative_artifacts: dict[str, Any],
    reports: list[str],
    metrics: dict,
    seconds: float,
    world_size: int,
) -> dict:
    """The ``phase.json`` content of a finished phase: ``start`` plus its artifacts (paths relative
    to the phase directory), the sha256 and size of every artifact and report file, its metrics."""
    files = {}
    for value in relative_artifacts.values():
        files.update(artifact_files(phase_dir, [phase_dir / p for p in artifact_paths(value)]))
    for name in reports:
        if (phase_dir / name).is_file():
            files[name] = sha256_file(phase_dir / name)
    sizes = {name: (phase_dir / name).stat().st_size for name in files}
    return {
        **start,
        "artifacts": relative_artifacts,
        "files": files,
        "sizes": sizes,
        "metrics": metrics,
        "seconds": round(seconds, 3),
        "world_size": world_size,
        "completed": now(),
    }


def write_record(phase_dir: Path, record: dict, name: str = PHASE_FILE) -> None:
    """Write ``phase.json`` (or ``started.json``) atomically."""
    atomic_write_json(phase_dir / name, {"format": RECORD_FORMAT, **record})


def clear_directory(path: Path) -> None:
    """Remove ``path`` and everything in it (a phase's work from another config or input)."""
    shutil.rmtree(path, ignore_errors=True)


def remove_dead_temps(root: Path) -> list[Path]:
    """Finish or undo the atomic writes that killed writers left under ``root`` (hidden
    ``.NAME.tmp-PID-*`` and ``.NAME.old`` entries; see agentforge.artifacts). Call only while no
    writer is active. Returns the entries that were there."""
    found = [p for p in root.rglob(".*") if ".tmp-" in p.name or p.name.endswith(".old")]
    for entry in found:
        name = entry.name[1 : entry.name.index(".tmp-")] if ".tmp-" in entry.name else entry.name[1 : -len(".old")]
        recover_directory(entry.parent / name)
    return found


# ---------------------------------------------------------------------------------------------
# reading a whole run


def phase_states(run_dir: Path, phases) -> dict[str, str]:
    """``{phase: state}`` without hashing: ``completed``, ``running (step ...)`` while a run holds
    the directory, ``incomplete (why)`` or ``not started``."""
    running = lock_holder(run_dir) is not None
    states = {}
    for spec in phases:
        phase_dir = run_dir / spec.dirname
        record = read_record(phase_dir)
        problem = record_problem(phase_dir, record)
        if record is not None and problem is None:
            states[spec.name] = "completed"
        elif running and read_record(phase_dir, START_FILE) is not None and record is None:
            states[spec.name] = f"running ({current_step(phase_dir)})"
        elif phase_dir.exists():
            states[spec.name] = f"incomplete ({problem})"
        else:
            states[spec.name] = "not started"
    return states


def current_step(phase_dir: Path) -> str:
    """What a running phase is doing, from the last line the runtime wrote to its progress file."""
    try:
        lines = (phase_dir / PROGRESS_FILE).read_text().splitlines()
    except OSError:
        return "starting"
    return lines[-1] if lines else "starting"


def write_run_metrics(run_dir: Path, phases) -> None:
    """``DIR/metrics.jsonl``: one row per completed phase, ``{"phase", "step": null, "seconds",
    **its metrics}``, rebuilt from the phase.json files (so a resumed run never duplicates a row)."""
    rows = []
    for spec in phases:
        record = read_record(run_dir / spec.dirname)
        if record is not None:
            rows.append({"phase": spec.name, "step": None, "seconds": record["seconds"], **record["metrics"]})
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
