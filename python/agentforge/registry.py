"""The model registry of a run: ``DIR/registry.sqlite``, SQLite in WAL mode.

Tables:

    runs      id, dir, status, config (JSON), created, updated
    models    run, id ("<phase>/<name>"), phase, artifact, name, path (relative to the run
              directory), parameters, bytes (on disk), sha256 (of the artifact's files, see
              ``rundir.files_digest``), metrics (JSON), parents (JSON list of model ids, or paths
              for parents outside the run)
    handoffs  run, from_phase, artifact, to_phase, input, models (JSON list of model ids)

A phase's rows are written only after its ``phase.json`` proves it complete, and in one
transaction that first deletes whatever that phase had: recording a phase twice leaves the
same rows, and a crash between the two leaves the old rows or the new ones, never a mixture.

The registry is derived data: everything in it comes from the phase records. A damaged file is
rebuilt from them (``open_registry``), and a run directory that cannot be written (read-only, a
copy) is read through a registry built in memory (``registry_of``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
from pathlib import Path
from typing import Any

from agentforge.artifacts import tensor_shapes
from agentforge.data.spec import DATA_ARTIFACT
from agentforge.rundir import artifact_paths, files_digest, now

REGISTRY_FILE = "registry.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, dir TEXT NOT NULL, status TEXT NOT NULL, config TEXT NOT NULL,
    created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    run TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE, id TEXT NOT NULL, phase TEXT NOT NULL,
    artifact TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, parameters INTEGER,
    bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, metrics TEXT NOT NULL, parents TEXT NOT NULL,
    PRIMARY KEY (run, id));
CREATE TABLE IF NOT EXISTS handoffs (
    run TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE, from_phase TEXT NOT NULL,
    artifact TEXT NOT NULL, to_phase TEXT NOT NULL, input TEXT NOT NULL, models TEXT NOT NULL,
    PRIMARY KEY (run, to_phase, input));
"""


def parameter_count(path: Path) -> int | None:
    """Number of stored tensor elements in a directory's safetensors files (None without any)."""
    shapes = tensor_shapes(path) if path.is_dir() else {}
    return sum(math.prod(shape) for shape in shapes.values()) if shapes else None


def _metadata(path: Path) -> dict:
    """The ``metadata`` of an ``agentforge.json`` model directory or of a ``model.afz`` container
    (its parents among them; {} for other artifacts)."""
    from agentforge.artifacts import MANIFEST, read_metadata

    if path.is_file() and path.suffix == ".afz":
        from agentforge.compress.container import read_container

        return read_container(path).metadata
    return read_metadata(path) if (path / MANIFEST).is_file() else {}


class Registry:
    """``DIR/registry.sqlite``. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, timeout=30)
        self.conn.row_factory = sqlite3.Row
        if str(path) != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.conn:
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        """Close the connection (SQLite folds the write-ahead log back into the file)."""
        self.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------

    def record_run(self, run_id: str, run_dir: Path, config: dict, status: str, created: str) -> None:
        """Insert or update the run's row."""
        with self.conn:
            self.conn.execute(
                "INSERT INTO runs (id, dir, status, config, created, updated) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET dir=excluded.dir, status=excluded.status, "
                "config=excluded.config, updated=excluded.updated",
                (run_id, str(run_dir), status, json.dumps(config), created, now()),
            )

    def forget_phase(self, run_id: str, phase: str) -> None:
        """Delete a phase's models and the handoffs to and from it (it is not complete any more)."""
        with self.conn:
            self._delete_phase(run_id, phase)

    def record_phase(self, run_id: str, run_dir: Path, spec, phase_dir: Path, record: dict) -> None:
        """Replace a completed phase's rows: one model row per artifact path in its ``phase.json``
        ``record`` and one handoff row per input of ``spec`` (the phase's ``PhaseSpec``)."""
        rows = self._model_rows(run_id, run_dir, spec.name, phase_dir, record)
        with self.conn:
            self._delete_phase(run_id, spec.name)
            self.conn.executemany(
                "INSERT INTO models (run, id, phase, artifact, name, path, parameters, bytes, sha256, metrics, "
                "parents) VALUES (:run, :id, :phase, :artifact, :name, :path, :parameters, :bytes, :sha256, "
                ":metrics, :parents)",
                rows,
            )
            for input_name, need in spec.needs.items():
                ids = [
                    r["id"]
                    for r in self.conn.execute(
                        "SELECT id FROM models WHERE run=? AND phase=? AND artifact=? ORDER BY rowid",
                        (run_id, need.producer, need.artifact),
                    )
                ]
                self.conn.execute(
                    "INSERT INTO handoffs (run, from_phase, artifact, to_phase, input, models) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, need.producer, need.artifact, spec.name, input_name, json.dumps(ids)),
                )

    def _delete_phase(self, run_id: str, phase: str) -> None:
        self.conn.execute("DELETE FROM models WHERE run=? AND phase=?", (run_id, phase))
        self.conn.execute("DELETE FROM handoffs WHERE run=? AND (to_phase=? OR from_phase=?)", (run_id, phase, phase))

    def _model_rows(self, run_id: str, run_dir: Path, phase: str, phase_dir: Path, record: dict) -> list[dict]:
        known = {r["path"]: r["id"] for r in self.conn.execute("SELECT id, path FROM models WHERE run=?", (run_id,))}
        rows = []
        for artifact, value in record["artifacts"].items():
            if artifact == DATA_ARTIFACT:
                continue
            for relative in artifact_paths(value):
                path = phase_dir / relative
                name = relative.name if isinstance(value, list) else artifact
                prefix = relative.as_posix()
                files = {k[len(prefix) + 1 :]: v for k, v in record["files"].items() if k.startswith(prefix + "/")}
                if not files:  # a single-file artifact
                    files = {relative.name: record["files"][prefix]}
                sizes = [size for k, size in record["sizes"].items() if k == prefix or k.startswith(prefix + "/")]
                metadata = _metadata(path)
                row = {
                    "run": run_id,
                    "id": f"{phase}/{name}",
                    "phase": phase,
                    "artifact": artifact,
                    "name": name,
                    "path": path.relative_to(run_dir).as_posix(),
                    "parameters": parameter_count(path),
                    "bytes": sum(sizes),
                    "sha256": files_digest(files),
                    "metrics": json.dumps(
                        {
                            **{
                                k[len(name) + 1 :]: v
                                for k, v in record.get("metrics", {}).items()
                                if k.startswith(name + "/")
                            },
                            **metadata.get("metrics", {}),
                        }
                    ),
                    "parents": json.dumps([_parent_id(p, path, run_dir, known) for p in metadata.get("parents", [])]),
                }
                known[row["path"]] = row["id"]
                rows.append(row)
        return rows

    # -- reading ---------------------------------------------------------------------------------

    def runs(self) -> list[dict]:
        """Every run row, oldest first, with ``config`` decoded."""
        return [
            {**dict(r), "config": json.loads(r["config"])}
            for r in self.conn.execute("SELECT * FROM runs ORDER BY created, id")
        ]

    def models(self, run_id: str | None = None) -> list[dict]:
        """Model rows in the order they were recorded, with ``metrics`` and ``parents`` decoded."""
        query = "SELECT * FROM models"
        args: tuple[str, ...] = ()
        if run_id is not None:
            query, args = query + " WHERE run=?", (run_id,)
        return [
            {**dict(r), "metrics": json.loads(r["metrics"]), "parents": json.loads(r["parents"])}
            for r in self.conn.execute(query + " ORDER BY rowid", args)
        ]

    def handoffs(self, run_id: str | None = None) -> list[dict]:
        """Handoff rows, with ``models`` decoded."""
        query = "SELECT * FROM handoffs"
        args: tuple[str, ...] = ()
        if run_id is not None:
            query, args = query + " WHERE run=?", (run_id,)
        return [
            {**dict(r), "models": json.loads(r["models"])} for r in self.conn.execute(query + " ORDER BY rowid", args)
        ]


def _parent_id(parent: Any, child: Path, run_dir: Path, known: dict[str, str]) -> str:
    """A parent from ``agentforge.json`` (``{"path": relative to the child, "sha256"}``) as the id of
    the registry model stored there, or its path when it lies outside the run."""
    relative = parent.get("path", "") if isinstance(parent, dict) else str(parent)
    location = (child / relative).resolve()
    try:
        inside = location.relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(location)
    return known.get(inside, inside)


def open_registry(run_dir: str | os.PathLike) -> Registry:
    """The registry of the run in ``run_dir`` (created when absent). A file that is not a SQLite
    database any more is replaced by an empty one, which the pipeline fills from the records."""
    path = Path(run_dir) / REGISTRY_FILE
    try:
        registry = Registry(path)
        registry.conn.execute("SELECT count(*) FROM models").fetchone()
        return registry
    except sqlite3.DatabaseError:
        for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        return Registry(path)


def fill(registry: Registry, run_dir: Path, run_id: str, phases) -> None:
    """Record every phase of ``run_dir`` whose record is intact; forget the others."""
    from agentforge.rundir import read_record, record_problem

    for spec in phases:
        phase_dir = run_dir / spec.dirname
        record = read_record(phase_dir)
        if record is not None and record_problem(phase_dir, record) is None:
            registry.record_phase(run_id, run_dir, spec, phase_dir, record)
        else:
            registry.forget_phase(run_id, spec.name)


def sync_registry(run_dir: Path, run_id: str, phases) -> None:
    """Bring ``DIR/registry.sqlite`` in line with the phase records on disk."""
    with open_registry(run_dir) as registry:
        fill(registry, run_dir, run_id, phases)


def registry_of(run_dir: Path, phases) -> Registry:
    """A registry of the run in ``run_dir`` built in memory from its records (nothing is written:
    works on a read-only or damaged run directory)."""
    from agentforge.rundir import read_run

    info = read_run(run_dir) or {}
    registry = Registry(":memory:")
    run_id = info.get("id", run_dir.name)
    registry.record_run(
        run_id, run_dir, info.get("config", {}), info.get("status", "unknown"), info.get("created", now())
    )
    fill(registry, run_dir, run_id, phases)
    return registry
