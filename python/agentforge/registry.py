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
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path
from typing import Any

from agentforge.rundir import artifact_paths, files_digest, now, tensor_shapes

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
    """The ``metadata`` of an ``agentforge.json`` model directory ({} for other artifacts)."""
    from agentforge.artifacts import MANIFEST, read_metadata

    return read_metadata(path) if (path / MANIFEST).is_file() else {}


class Registry:
    """``DIR/registry.sqlite``. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.conn:
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        """Close the connection (SQLite folds the write-ahead log back into the file)."""
        self.conn.close()

    def __enter__(self) -> "Registry":
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
                (run_id, str(run_dir), status, json.dumps(config), created, now()))

    def forget_phase(self, run_id: str, phase: str) -> None:
        """Delete a phase's models and the handoffs to and from it (it is not complete any more)."""
        with self.conn:
            self._delete_phase(run_id, phase)

    def record_phase(self, run_id: str, run_dir: Path, phase: str, phase_dir: Path, record: dict,
                     handoffs: list[tuple[str, str, str]]) -> None:
        """Replace a completed phase's rows: one model row per artifact path in its ``phase.json``
        ``record`` and one handoff row per ``(from_phase, artifact, input)`` it consumed."""
        rows = self._model_rows(run_id, run_dir, phase, phase_dir, record)
        with self.conn:
            self._delete_phase(run_id, phase)
            self.conn.executemany(
                "INSERT INTO models (run, id, phase, artifact, name, path, parameters, bytes, sha256, metrics, "
                "parents) VALUES (:run, :id, :phase, :artifact, :name, :path, :parameters, :bytes, :sha256, "
                ":metrics, :parents)", rows)
            for from_phase, artifact, input_name in handoffs:
                ids = [r["id"] for r in self.conn.execute(
                    "SELECT id FROM models WHERE run=? AND phase=? AND artifact=? ORDER BY rowid",
                    (run_id, from_phase, artifact))]
                self.conn.execute("INSERT INTO handoffs (run, from_phase, artifact, to_phase, input, models) "
                                  "VALUES (?, ?, ?, ?, ?, ?)",
                                  (run_id, from_phase, artifact, phase, input_name, json.dumps(ids)))

    def _delete_phase(self, run_id: str, phase: str) -> None:
        self.conn.execute("DELETE FROM models WHERE run=? AND phase=?", (run_id, phase))
        self.conn.execute("DELETE FROM handoffs WHERE run=? AND (to_phase=? OR from_phase=?)", (run_id, phase, phase))

    def _model_rows(self, run_id: str, run_dir: Path, phase: str, phase_dir: Path, record: dict) -> list[dict]:
        known = {r["path"]: r["id"] for r in self.conn.execute("SELECT id, path FROM models WHERE run=?", (run_id,))}
        rows = []
        for artifact, value in record["artifacts"].items():
            for relative in artifact_paths(value):
                path = phase_dir / relative
                name = relative.name if isinstance(value, list) else artifact
                prefix = relative.as_posix()
                files = {k[len(prefix) + 1:]: v for k, v in record["files"].items() if k.startswith(prefix + "/")}
                if not files:  # a single-file artifact
                    files = {relative.name: record["files"][prefix]}
                metadata = _metadata(path)
                row = {"run": run_id, "id": f"{phase}/{name}", "phase": phase, "artifact": artifact, "name": name,
                       "path": path.relative_to(run_dir).as_posix(), "parameters": parameter_count(path),
                       "bytes": sum((path / f if path.is_dir() else path).stat().st_size for f in files),
                       "sha256": files_digest(files),
                       "metrics": json.dumps({**{k[len(name) + 1:]: v for k, v in record.get("metrics", {}).items()
                                                 if k.startswith(name + "/")}, **metadata.get("metrics", {})}),
                       "parents": json.dumps([_parent_id(p, run_dir, known) for p in metadata.get("parents", [])])}
                known[row["path"]] = row["id"]
                rows.append(row)
        return rows

    # -- reading ---------------------------------------------------------------------------------

    def runs(self) -> list[dict]:
        """Every run row, oldest first, with ``config`` decoded."""
        return [{**dict(r), "config": json.loads(r["config"])}
                for r in self.conn.execute("SELECT * FROM runs ORDER BY created, id")]

    def models(self, run_id: str | None = None) -> list[dict]:
        """Model rows in the order they were recorded, with ``metrics`` and ``parents`` decoded."""
        query, args = "SELECT * FROM models", ()
        if run_id is not None:
            query, args = query + " WHERE run=?", (run_id,)
        return [{**dict(r), "metrics": json.loads(r["metrics"]), "parents": json.loads(r["parents"])}
                for r in self.conn.execute(query + " ORDER BY rowid", args)]

    def handoffs(self, run_id: str | None = None) -> list[dict]:
        """Handoff rows, with ``models`` decoded."""
        query, args = "SELECT * FROM handoffs", ()
        if run_id is not None:
            query, args = query + " WHERE run=?", (run_id,)
        return [{**dict(r), "models": json.loads(r["models"])} for r in self.conn.execute(query + " ORDER BY rowid", args)]


def _parent_id(parent: Any, run_dir: Path, known: dict[str, str]) -> str:
    """A parent path from ``agentforge.json`` as the id of the registry model stored there, or the
    path itself when it lies outside the run."""
    try:
        relative = Path(parent).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(parent)
    return known.get(relative, str(parent))


def open_registry(run_dir: str | os.PathLike) -> Registry:
    """The registry of the run in ``run_dir`` (created when absent)."""
    return Registry(Path(run_dir) / REGISTRY_FILE)
