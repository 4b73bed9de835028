"""A run directory on disk and what proves each part of it complete.

    DIR/run.json            config, phase selection, status (written atomically)
    DIR/.lock               flock held by the running process; holds its pid
    DIR/NN-phase/           one directory per phase (the phase writes here)
      started.json          settings, seed and input digests the phase was started with
      phase.json            written last: artifacts, metrics and the sha256 of every artifact file
    DIR/metrics.jsonl       one row per completed phase (rebuilt from the phase.json files)
    DIR/registry.sqlite     models and handoffs (agentforge.registry)
    DIR/report.html         agentforge.report

A phase counts as complete only when its ``phase.json`` exists and every file it lists still has
its recorded hash, so a half-written or damaged artifact is never taken for a complete one.
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

from agentforge.artifacts import atomic_write_json, recover_directory, sha256_dir, sha256_file
from agentforge.config import ConfigError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
PHASE_FILE = "phase.json"
START_FILE = "started.json"
RECORD_FORMAT = 1


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

    def acquire(self) -> "RunLock":
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
                    raise ConfigError(f"{self.path.parent} is held by another run (pid {_read_pid(self.path)})") from None
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

    def __enter__(self) -> "RunLock":
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


def artifact_files(root: Path, value: Any) -> dict[str, str]:
    """``{path relative to root: sha256}`` of every file of an artifact (files or directories)."""
    files = {}
    for path in artifact_paths(value):
        relative = path.relative_to(root).as_posix()
        if path.is_dir():
            files.update({f"{relative}/{name}": digest for name, digest in sha256_dir(path).items()})
        else:
            files[relative] = sha256_file(path)
    return files


def absolute_artifacts(phase_dir: Path, record: dict) -> dict[str, Any]:
    """The record's artifacts (stored relative to the phase directory) as absolute paths."""
    return {name: [phase_dir / p for p in value] if isinstance(value, list) else phase_dir / value
            for name, value in record["artifacts"].items()}


def artifact_digest(record: dict, name: str) -> str:
    """The digest of one artifact of a completed phase, from the hashes its record lists."""
    paths = [p.as_posix() for p in artifact_paths(record["artifacts"][name])]
    files = {k: v for k, v in record["files"].items() if any(k == p or k.startswith(p + "/") for p in paths)}
    return files_digest(files)


def read_record(phase_dir: Path, name: str = PHASE_FILE) -> dict | None:
    """A phase's ``phase.json`` (or ``started.json``), or None when it is absent or unreadable."""
    try:
        record = json.loads((phase_dir / name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def record_problem(phase_dir: Path, record: dict | None) -> str | None:
    """Why ``record`` does not prove its phase complete (None when every listed file is intact)."""
    if record is None:
        return f"{PHASE_FILE} is missing"
    for relative, digest in record["files"].items():
        path = phase_dir / relative
        if not path.is_file():
            return f"{relative} is missing"
        if sha256_file(path) != digest:
            return f"{relative} has changed since it was written"
    return None


def write_record(phase_dir: Path, record: dict, name: str = PHASE_FILE) -> None:
    """Write ``phase.json`` (or ``started.json``) atomically."""
    atomic_write_json(phase_dir / name, {"format": RECORD_FORMAT, **record})


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` over a directory's safetensors files, read from their headers only."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="np") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def clear_directory(path: Path) -> None:
    """Remove ``path`` and everything in it (a phase's work from another config or input)."""
    shutil.rmtree(path, ignore_errors=True)


def remove_dead_temps(root: Path) -> list[Path]:
    """Finish or undo the atomic writes that killed writers left under ``root`` (hidden
    ``.NAME.tmp-PID-*`` and ``.NAME.old`` entries; see agentforge.artifacts). Call only while no
    writer is active. Returns the entries that were there."""
    found = [p for p in root.rglob(".*") if ".tmp-" in p.name or p.name.endswith(".old")]
    for entry in found:
        name = entry.name[1:entry.name.index(".tmp-")] if ".tmp-" in entry.name else entry.name[1:-len(".old")]
        recover_directory(entry.parent / name)
    return found
