"""metrics.jsonl (the source of truth that reports and tests read) mirrored to Weights & Biases.

One JSON object per line: ``{"phase", "step", ...numbers}``. The file is only appended to, except
on resume, when the rows of work lost since the last checkpoint are dropped (atomically)."""

import json
import logging
import os
from pathlib import Path

from agentforge.artifacts import atomic_write_text
from agentforge.train.config import resolve_wandb_mode

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


def _parse_lines(text: str, path: Path) -> list[dict]:
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # a crash can leave a last line without its newline
    if tail:
        log.warning("%s: ignoring an incomplete last line (%d characters)", path, len(tail))
    return [json.loads(line) for line in complete if line]


def read_metrics(path: str | os.PathLike, phase: str | None = None) -> list[dict]:
    """Rows of a metrics.jsonl file (or of ``DIR/metrics.jsonl``), optionally of one phase only."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    rows = _parse_lines(path.read_text(), path)
    return [row for row in rows if phase is None or row.get("phase") == phase]


class MetricsLogger:
    """Appends rows to ``out_dir/metrics.jsonl`` and logs them to W&B.

    ``enabled=False`` (non-main ranks) makes every method a no-op. ``wandb_group``: the pipeline
    run's id, so that W&B groups a run's phases (``job_type`` = the phase). ``wandb_mode``:
    online/offline/disabled, None = env ``WANDB_MODE`` or "offline"; with "disabled" wandb is not
    even imported. Use as a context manager or call ``close()``, which finishes the W&B run (keep
    one W&B run open at a time: close a phase's own logger before ``train`` opens one)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        phase: str,
        wandb_mode: str | None = None,
        project: str = "agentforge",
        run_name: str | None = None,
        config: dict | None = None,
        enabled: bool = True,
        wandb_group: str | None = None,
    ):
        self.path = Path(out_dir) / METRICS_FILE
        self.phase = phase
        self.enabled = enabled
        self._file = None
        self._wandb_run = None
        mode = resolve_wandb_mode(wandb_mode)
        if enabled and mode != "disabled":
            import wandb

            Path(out_dir).mkdir(parents=True, exist_ok=True)
            # silent: W&B's banner and run summary would drown the pipeline's own progress lines
            # one pipeline run is one W&B group; each phase's runs share its job_type
            self._wandb_run = wandb.init(
                mode=mode,  # type: ignore[arg-type]  # wandb types it as a Literal; resolve_wandb_mode gives one
                dir=str(out_dir),
                project=project,
                name=run_name or phase,
                group=wandb_group,
                job_type=phase.split("/")[0],
                config=config,
                settings=wandb.Settings(silent=True),
            )

    def log(self, metrics: dict, *, step: int | None = None) -> dict:
        """Append ``{"phase", "step", **metrics}`` and send the numbers to W&B; returns the row."""
        row = {"phase": self.phase, "step": step, **metrics}
        if not self.enabled:
            return row
        out = self._open()
        out.write(json.dumps(row) + "\n")
        out.flush()  # survives kill -9 (the OS has it); sync() also survives power loss
        if self._wandb_run is not None:
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._wandb_run.log(numbers, step=step)
        return row

    def sync(self) -> None:
        """fsync the rows written so far (before a checkpoint claims them)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop this phase's rows with a step greater than ``step``: on resume they describe work
        that was lost with the crash and will be redone."""
        if not self.enabled or not self.path.exists():
            return
        self._close_file()
        text = self.path.read_text()
        rows = _parse_lines(text, self.path)
        kept = [r for r in rows if r.get("phase") != self.phase or r.get("step") is None or r["step"] <= step]
        if len(kept) != len(rows) or (text and not text.endswith("\n")):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        """Close the file and finish the W&B run."""
        self._close_file()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_incomplete_last_line()
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def _drop_incomplete_last_line(self) -> None:
        # A row cut by a crash would otherwise be glued to the next row appended.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
