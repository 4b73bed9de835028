"""The phase runtime: what every phase is written on.

A phase is a module with a ``Settings`` class, its ``PRESETS`` and ``SPEC = PhaseSpec(...)``,
which names what the phase needs, what it provides (with the contract each artifact keeps) and
its ``run(p: PhaseRun) -> PhaseResult``. ``run`` reads as a short list of named steps:

    def run(p: PhaseRun) -> PhaseResult:
        fp = p.load("model")                                           # an input, verified once
        calibration = p.step("calibrate", lambda: calibrate(fp, ...))  # JSON, memoised on disk
        latent = p.model_step("latent", lambda: finetune(fp, ...))     # a model directory, memoised
        report = p.step("measure", lambda: p.suite(fp.tokenizer).measure(...))
        return p.finish({"latent": latent.path}, headline, summary)

Every step is memoised under the phase directory, keyed by the phase's inputs (their digests),
settings, data spec and seed: rerunning a phase (after Ctrl-C, ``kill -9`` or a crash) redoes
only the steps that did not finish, and training inside a step resumes from its own checkpoint.
Under torchrun every rank runs the phase: ``step`` computes on rank 0 and hands every rank the
value, ``model_step`` builds on every rank (training is data-parallel) and saves on rank 0 behind
a barrier, and ``finish`` writes the summary and metrics on rank 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from agentforge.errors import ConfigError, HandoffError
from agentforge.heartbeat import Heartbeat, StageProgress
from agentforge.rundir import PROGRESS_FILE
from agentforge.settings import to_dict

if TYPE_CHECKING:
    from agentforge.eval.speed import PeakRss

STEPS_DIR = "steps"
# What a phase writes beyond its inputs' size: summaries, metrics, tokenizers, small checkpoints.
DEFAULT_DISK = 64 << 20
SUMMARY_FILE = "summary.json"
# Headline figures measured on the machine (wall clock, memory): reported, never compared between runs.
MEASURED = ("phase_seconds", "phase_peak_rss_bytes")


# ---------------------------------------------------------------------------------------------
# what a phase declares


@dataclass(frozen=True)
class Input:
    """One input of a phase: ``source`` is ``"producer.artifact"`` in the pipeline, ``help`` is its
    standalone command-line help, ``many`` marks a list of model directories."""

    source: str
    help: str
    many: bool = False

    @property
    def producer(self) -> str:
        return self.source.split(".", 1)[0]

    @property
    def artifact(self) -> str:
        return self.source.split(".", 1)[1]


@dataclass
class PhaseResult:
    """``artifacts``: name -> path (or list of paths) inside the phase directory; ``metrics``: the
    headline figures (also the phase's row in the run's metrics.jsonl)."""

    artifacts: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Effect:
    """A phase's headline: what it changed against its control, on held-out data. ``value`` is the
    phase's model minus the control, or their ratio (``neutral`` = 1; ``low``/``high``: a 95 %
    interval when one was measured); ``better`` says which way is an improvement."""

    what: str
    control: str
    value: float
    low: float | None = None
    high: float | None = None
    better: str = "higher"
    neutral: float = 0.0

    def verdict(self) -> str:
        """``helped`` or ``hurt`` when the interval excludes the neutral value, else ``no
        measurable effect`` (no interval: the sign alone decides nothing)."""
        if self.low is None or self.high is None or self.low <= self.neutral <= self.high:
            return "no measurable effect"
        improved = (self.low > self.neutral) == (self.better == "higher")
        return "helped" if improved else "hurt"

    @classmethod
    def of(cls, what: str, control: str, interval: dict, **kwargs) -> Effect:
        """From an interval as ``agentforge.eval.stats`` gives it (``mean``, ``low``, ``high``)."""
        return cls(what, control, interval["mean"], interval["low"], interval["high"], **kwargs)

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict()}


def default_disk_needed(settings: Any, input_bytes: int) -> int:
    """What a phase writes, by default: a few copies of its inputs (models, checkpoints with
    optimizer states) and its summaries."""
    return DEFAULT_DISK + 6 * input_bytes


@dataclass(frozen=True)
class PhaseSpec:
    """One phase: its number and name, settings class and presets, inputs (``needs``), artifacts
    with the contract each keeps (``provides``: name -> ``check(value)`` raising ``HandoffError``),
    ``run``, and the module whose ``figures(phase_dir)`` draws its report figures."""

    number: int
    name: str
    summary: str
    settings: type
    presets: dict[str, Any]
    run: Callable[[PhaseRun], PhaseResult] = field(compare=False)
    needs: dict[str, Input] = field(default_factory=dict)
    provides: dict[str, Callable[[Any], None]] = field(default_factory=dict, compare=False)
    figures: str | None = None
    # bytes the phase writes, from its settings and its inputs' bytes (checked against free space)
    disk_needed: Callable[[Any, int], int] = field(default=default_disk_needed, compare=False)

    def __post_init__(self):
        if self.disk_needed is None:
            object.__setattr__(self, "disk_needed", default_disk_needed)

    @property
    def dirname(self) -> str:
        """The phase's directory in a run: ``NN-name``."""
        return f"{self.number:02d}-{self.name}"

    def check(self, artifacts: dict[str, Any]) -> None:
        """Every provided artifact is there and keeps its contract (``HandoffError`` otherwise)."""
        missing = [name for name in self.provides if name not in artifacts]
        if missing:
            raise HandoffError(
                f"{self.name} did not hand over {', '.join(missing)} (it returned: {', '.join(artifacts) or 'nothing'})"
            )
        for name, contract in self.provides.items():
            try:
                contract(artifacts[name])
            except HandoffError as e:
                raise HandoffError(f"{self.name} broke its handoff contract: {name}: {e}") from None


# ---------------------------------------------------------------------------------------------
# contracts


def model_dir(value: Any) -> None:
    """Contract: a model directory written by ``save_model_dir`` (manifest, config, weights)."""
    from agentforge.artifacts import MANIFEST, CorruptArtifact, read_metadata

    path = Path(value)
    if not path.is_dir():
        raise HandoffError(f"{path} is not a directory")
    try:
        read_metadata(path)
    except CorruptArtifact as e:
        raise HandoffError(str(e)) from None
    for needed in ("config.json",):
        if not (path / needed).is_file():
            raise HandoffError(f"{path}: {needed} is missing, next to its {MANIFEST}")


def model_dirs(value: Any) -> None:
    """Contract: a non-empty list of model directories."""
    if not isinstance(value, (list, tuple)) or not value:
        raise HandoffError(f"expected a list of model directories, got {value!r}")
    for path in value:
        model_dir(path)


def a_file(value: Any) -> None:
    """Contract: a regular file."""
    if not Path(value).is_file():
        raise HandoffError(f"{value} is not a file")


# ---------------------------------------------------------------------------------------------
# running one phase


class Loaded(NamedTuple):
    """A model with its tokenizer, its ``agentforge.json`` metadata and its directory."""

    model: Any
    tokenizer: Any
    metadata: dict
    path: Path


class Built(NamedTuple):
    """What a ``model_step`` builds: the model, its tokenizer, metadata for ``agentforge.json``
    (``parents``: the paths of the models it came from), files of its own (``write_extra(dir)``)
    and files it keeps from its input as they are (``carry``: e.g. a thinking head)."""

    model: Any
    tokenizer: Any
    metadata: dict
    write_extra: Callable[[Path], None] | None = None
    carry: tuple = ()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def input_digest(value: Any) -> str:
    """The identity of an input given outside a pipeline run: the sha256 of each model
    directory's manifest (which lists the sha256 of every file) or of each file."""
    from agentforge.artifacts import MANIFEST, sha256_file

    paths = [Path(p) for p in value] if isinstance(value, (list, tuple)) else [Path(value)]
    return _digest([sha256_file(p / MANIFEST if p.is_dir() else p) for p in paths])


class PhaseRun:
    """One phase running in ``out_dir``: its settings, inputs, data spec and seed, and the steps
    it takes (see the module docstring).

    ``inputs``: input name -> path (or list of paths). ``digests``: the pipeline's digest of each
    input (computed from the files otherwise). ``verified``: whether the caller has verified the
    inputs' files (the pipeline does, once per handoff); otherwise ``load`` hash-checks them.
    ``tools``: the run's ``ToolSettings`` (the Python tool's isolation, in force while ``run`` runs)."""

    def __init__(
        self,
        spec: PhaseSpec,
        settings: Any,
        inputs: dict[str, Any],
        out_dir: str | os.PathLike,
        *,
        seed: int,
        data,
        tools=None,
        digests: dict[str, str] | None = None,
        verified: bool = False,
        wandb_mode: str | None = None,
        wandb_group: str | None = None,
        progress: bool = True,
        say: Callable[[str], None] = print,
    ):
        from agentforge.tools.sandbox import ToolSettings
        from agentforge.train import distributed

        self.spec, self.settings, self.seed, self.data = spec, settings, seed, data
        self.tools = tools if tools is not None else ToolSettings()
        self.inputs: dict[str, Any] = {  # a Path, or a list of Paths for a list input
            name: [Path(p) for p in v] if isinstance(v, (list, tuple)) else Path(v) for name, v in inputs.items()
        }
        missing = sorted(set(spec.needs) - set(self.inputs))
        if missing:
            raise ConfigError(f"{spec.name}: input {missing[0]!r} is missing ({spec.needs[missing[0]].help})")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.digests = digests if digests is not None else {n: input_digest(v) for n, v in self.inputs.items()}
        self.verified = verified
        self.wandb_mode, self.wandb_group, self.progress = wandb_mode, wandb_group, progress
        self.is_main = distributed.is_main()
        self._say = say if self.is_main else (lambda _: None)
        self._suites: dict[int, Any] = {}
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()
        self._rss: PeakRss | None = None  # the peak-RSS watch while run() runs
        self._heartbeat = Heartbeat(lambda line: self.say(line, beat=True))
        self.key = _digest(
            {
                "phase": spec.name,
                "settings": to_dict(settings),
                "data": to_dict(data),
                "seed": seed,
                "inputs": self.digests,
            }
        )

    # --- reporting --------------------------------------------------------------------------

    def run(self) -> PhaseResult:
        """The phase's ``run``, with the run's tool isolation in force for every tool call in it."""
        from agentforge.eval.speed import PeakRss, release_freed_memory
        from agentforge.tools.sandbox import isolation

        release_freed_memory()  # what an earlier phase in this process freed is not this phase's peak
        with isolation(self.tools.python), PeakRss() as self._rss, contextlib.ExitStack() as stack:
            if self.is_main:
                stack.enter_context(self._heartbeat)
            return self.spec.run(self)

    def say(self, line: str, *, beat: bool = False) -> None:
        """One progress line, on rank 0 (also the last line of ``progress.log``, which
        ``agentforge status`` shows for a running phase); ``beat``: a heartbeat line."""
        if self.is_main:
            with open(self.out_dir / PROGRESS_FILE, "a", encoding="utf-8") as f:
                f.write(f"{line}\n")
        self._heartbeat.heard(line, beat=beat)
        self._say(f"{self.spec.name}: {line}")

    def bar(self, iterable, what: str, total: int | None = None):
        """``iterable`` with a progress bar (what, n of N, rate, ETA) on a terminal with progress on;
        elsewhere the heartbeat names the item (``what i/N``)."""
        import sys

        from tqdm import tqdm

        if self.progress and self.is_main and sys.stderr.isatty():
            return tqdm(iterable, desc=f"{self.spec.name}: {what}", total=total, leave=False, dynamic_ncols=True)
        return self._counted(iterable, what, total)

    def _counted(self, iterable, what: str, total: int | None):
        shown = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else "?"
        for i, item in enumerate(iterable, start=1):
            self._heartbeat.working_on(f"{what} {i}/{shown}")
            yield item

    # --- data and inputs ----------------------------------------------------------------------

    def suite(self, tokenizer):
        """The run's held-out data for ``tokenizer`` (``agentforge.eval.EvalSuite``), built once."""
        from agentforge.eval import EvalSuite

        if id(tokenizer) not in self._suites:
            self._suites[id(tokenizer)] = (tokenizer, EvalSuite(self.data, tokenizer, self.seed))
        return self._suites[id(tokenizer)][1]

    def load(self, name: str, index: int | None = None, **model_kwargs) -> Loaded:
        """Input ``name`` (item ``index`` of a list input) loaded: hash-checked here unless the
        caller verified it already."""
        from agentforge.artifacts import load_model_dir

        path = self.inputs[name][index] if index is not None else self.inputs[name]
        model, tokenizer, metadata = load_model_dir(path, verify=not self.verified, **model_kwargs)
        return Loaded(model, tokenizer, metadata, Path(path))

    # --- steps --------------------------------------------------------------------------------

    def _step_key(self, name: str, extra: str = "") -> str:
        return _digest({"run": self.key, "step": name, **({"extra": extra} if extra else {})})

    def _timed(self, name: str, compute: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        value = compute()
        self.timings[name] = round(time.perf_counter() - began, 3)
        return value

    def step(self, name: str, compute: Callable[[], Any], *, everywhere: bool = False, key: str = "") -> Any:
        """``compute()`` (a JSON value), memoised in ``steps/<name>.json``: a rerun with the same
        inputs, settings, data and seed reads it back. It runs on rank 0 and every rank gets the
        value, or on every rank with ``everywhere`` (it trains data-parallel). The value is
        returned as JSON gives it back, so a fresh run and a rerun see the same thing."""
        from agentforge.artifacts import atomic_write_json
        from agentforge.train import distributed

        path, key = self.out_dir / STEPS_DIR / f"{name}.json", self._step_key(name, key)
        done = _read_step(path, key)
        if done is not None:
            return done["value"]
        self.say(f"{name} ...")
        value = self._timed(name, compute) if everywhere else distributed.on_main(self._timed, name, compute)
        value = json.loads(json.dumps(value))
        if self.is_main:
            atomic_write_json(path, {"key": key, "value": value})
        distributed.barrier()
        return value

    def finished(self, name: str, *, directory: str | None = None, key: str = "") -> Loaded | None:
        """The model of step ``name`` when a previous run finished it with the same key (``key``: a
        digest of anything outside the run it depends on, such as a base model's files), else None."""
        from agentforge.artifacts import CorruptArtifact, load_model_dir

        path = self.out_dir / (directory or name)
        try:
            model, tokenizer, metadata = load_model_dir(path)
        except (CorruptArtifact, OSError, ValueError):
            return None
        same = metadata.get("step_key") == self._step_key(name, key)
        return Loaded(model, tokenizer, metadata, path) if same else None

    def done(self, name: str) -> bool:
        """Whether JSON step ``name`` finished earlier with the same key (its value is on disk)."""
        return _read_step(self.out_dir / STEPS_DIR / f"{name}.json", self._step_key(name)) is not None

    def forget(self, *names: str) -> None:
        """Drop the memos of JSON steps ``names`` (a file one vouched for was lost): they run again."""
        from agentforge.train import distributed

        if self.is_main:
            for name in names:
                (self.out_dir / STEPS_DIR / f"{name}.json").unlink(missing_ok=True)
        distributed.barrier()

    def file_step(
        self,
        name: str,
        compute: Callable[[], dict],
        path: Path,
        *,
        dependents: tuple[str, ...] = (),
        everywhere: bool = False,
    ) -> dict:
        """``step(name, compute)`` where ``compute`` writes ``path`` and returns a record holding its
        ``sha256``: when the memoised record no longer matches the file, the step runs again, and
        so do its ``dependents`` (steps that read the file)."""
        from agentforge.artifacts import sha256_file

        record = self.step(name, compute, everywhere=everywhere)
        if not (path.is_file() and sha256_file(path) == record["sha256"]):
            self.say(f"{path.name} is missing or changed since step {name} wrote it: {name} runs again")
            self.forget(name, *dependents)
            record = self.step(name, compute, everywhere=everywhere)
        return record

    def model_step(
        self, name: str, build: Callable[[], Built], *, directory: str | None = None, key: str = ""
    ) -> Loaded:
        """The model ``build()`` makes, saved as a model directory (``directory``, default ``name``)
        on rank 0 behind a barrier, or read back when a previous run finished it with the same key.
        ``build`` runs on every rank (training is data-parallel)."""
        from agentforge.artifacts import save_model_dir
        from agentforge.train import distributed

        done = self.finished(name, directory=directory, key=key)
        if done is not None:
            return done
        path = self.out_dir / (directory or name)
        self.say(f"{name} ...")
        built = self._timed(name, build)
        metadata = {
            **built.metadata,
            "phase": self.spec.name,
            "step": name,
            "step_key": self._step_key(name, key),
            "parents": [self.parent(p, path) for p in built.metadata.get("parents", [])],
        }
        if self.is_main:
            save_model_dir(built.model, built.tokenizer, path, metadata, write_extra=_extras(built))
        distributed.barrier()
        return Loaded(built.model, built.tokenizer, metadata, path)

    @staticmethod
    def parent(source: Any, child: Path) -> dict:
        """A parent as the child's manifest records it: its path relative to the child's directory
        (a run directory can be moved or copied) and the sha256 of the parent's own manifest
        (which lists the sha256 of each of its files), or None for a parent without one."""
        from agentforge.artifacts import MANIFEST, sha256_file

        source = Path(source)
        manifest = source / MANIFEST
        return {
            "path": os.path.relpath(source.absolute(), child.absolute()),
            "sha256": sha256_file(manifest) if manifest.is_file() else None,
        }

    # --- training and writing -----------------------------------------------------------------

    def train(
        self,
        model,
        rows,
        stage: str,
        *,
        optimizer,
        steps: int,
        batch_size: int,
        micro_batch_size: int | None = None,
        loss_fn=None,
        checkpoint_every: int = 0,
        log_every: int = 10,
        seed: int | None = None,
        **kwargs,
    ):
        """``agentforge.train.train`` in ``train/<stage>``, logged as ``<phase>/<stage>``."""
        from agentforge.train import TrainConfig, train

        cfg = TrainConfig(
            steps=steps,
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            seed=self.seed if seed is None else seed,
            wandb_mode=self.wandb_mode,
            wandb_group=self.wandb_group,
            run_name=f"{self.spec.name}/{stage}",
            progress=self.progress,
        )
        self._heartbeat.stage = StageProgress(stage)
        try:
            return train(
                model,
                rows,
                cfg,
                optimizer=optimizer,
                out_dir=self.out_dir / "train" / stage,
                phase=f"{self.spec.name}/{stage}",
                loss_fn=loss_fn,
                on_step=self._heartbeat.stage,
                **kwargs,
            )
        finally:
            self._heartbeat.stage = None

    def logger(self, suffix: str | None = None, *, wandb: bool = False):
        """A ``MetricsLogger`` for ``<phase>[/<suffix>]`` rows in the phase's metrics.jsonl (to W&B
        too with ``wandb``), enabled on rank 0 only."""
        from agentforge.train import MetricsLogger

        return MetricsLogger(
            self.out_dir,
            phase=f"{self.spec.name}/{suffix}" if suffix else self.spec.name,
            wandb_mode=self.wandb_mode if wandb else "disabled",
            wandb_group=self.wandb_group,
            enabled=self.is_main,
        )

    def finish(
        self,
        artifacts: dict[str, Any],
        headline: dict,
        summary: dict | None = None,
        rows: dict[str, list[dict]] | None = None,
        effects: Sequence[Effect] = (),
    ) -> PhaseResult:
        """Rank 0 writes ``summary.json`` (``summary`` plus the headline, the ``effects`` the report's
        first table shows, settings and step timings) and the phase's metrics rows: ``rows`` per
        suffix, then the headline row (replacing rows an interrupted earlier finish wrote). Every
        rank returns the ``PhaseResult``."""
        from agentforge.artifacts import atomic_write_json
        from agentforge.train import distributed

        headline = {**headline, "phase_seconds": round(time.perf_counter() - self.started, 3)}
        if self._rss is not None:  # this process's peak RSS while the phase ran (after a resume: since then)
            headline["phase_peak_rss_bytes"] = self._rss.peak
        if self.is_main:
            atomic_write_json(
                self.out_dir / SUMMARY_FILE,
                {
                    **(summary or {}),
                    "headline": headline,
                    "effects": [e.to_dict() for e in effects],
                    "settings": to_dict(self.settings),
                    "step_seconds": self.timings,
                },
            )
            rows = rows or {}
            _drop_rows(self.out_dir, {f"{self.spec.name}/{s}" for s in rows} | {self.spec.name})
            for suffix, entries in rows.items():
                with self.logger(suffix) as log:
                    for i, row in enumerate(entries):
                        log.log(row, step=row.get("step", i))
            with self.logger(wandb=True) as log:
                log.log(headline)
        distributed.barrier()
        return PhaseResult(artifacts, headline if self.is_main else {})


def _extras(built: Built) -> Callable[[Path], None] | None:
    """``write_extra`` for ``save_model_dir``: the built model's own files and the carried ones."""
    import shutil

    if not built.carry:
        return built.write_extra

    def write(directory: Path) -> None:
        for source in map(Path, built.carry):
            shutil.copyfile(source, directory / source.name)
        if built.write_extra is not None:
            built.write_extra(directory)

    return write


def _read_step(path: Path, key: str) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key and "value" in record else None


def _drop_rows(out_dir: Path, phases: set[str]) -> None:
    """Remove the rows of ``phases`` from ``out_dir/metrics.jsonl`` (they are about to be rewritten)."""
    from agentforge.artifacts import atomic_write_text
    from agentforge.train import read_metrics

    path = out_dir / "metrics.jsonl"
    if path.is_file():
        kept = [row for row in read_metrics(path) if row.get("phase") not in phases]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


# ---------------------------------------------------------------------------------------------
# recording a finished phase, and running one alone

REPORT_FILES = (SUMMARY_FILE, "metrics.jsonl")


def _relative_artifacts(phase_dir: Path, spec: PhaseSpec, artifacts: dict) -> dict:
    from agentforge.errors import PipelineError
    from agentforge.rundir import artifact_paths

    relative = {}
    for name, value in artifacts.items():
        paths = artifact_paths(value)
        for path in paths:
            if not Path(path).resolve().is_relative_to(phase_dir.resolve()):
                raise PipelineError(
                    f"{spec.name} returned artifact {name} at {path}, outside its directory {phase_dir}"
                )
            if not Path(path).exists():
                raise HandoffError(f"{spec.name} returned artifact {name} at {path}, which does not exist")
        as_text = [Path(p).resolve().relative_to(phase_dir.resolve()).as_posix() for p in paths]
        relative[name] = as_text if isinstance(value, (list, tuple)) else as_text[0]
    return relative


def record_phase(phase_dir: Path, spec: PhaseSpec, artifacts: dict, metrics: dict, start: dict, seconds: float) -> dict:
    """Check what a phase handed over against its contracts, then write its ``phase.json`` (the
    completion marker); returns the record. The pipeline and a phase run alone both use it."""
    from agentforge import rundir
    from agentforge.train import distributed

    relative = _relative_artifacts(phase_dir, spec, artifacts)
    spec.check(rundir.absolute_artifacts(phase_dir, {"artifacts": relative}))
    record = rundir.finished_record(
        phase_dir,
        {**start, "number": spec.number},
        relative,
        list(REPORT_FILES),
        metrics,
        seconds,
        distributed.world_size(),
    )
    rundir.write_record(phase_dir, record)
    rundir.remove_dead_temps(phase_dir)
    return record


def run_alone(
    spec: PhaseSpec,
    inputs: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    settings: Any = None,
    preset: str = "tiny",
    data=None,
    tools=None,
    seed: int = 0,
    wandb_mode: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> PhaseResult:
    """Run phase ``spec`` outside a pipeline run, in ``out_dir`` (reused on a rerun), and record it
    in ``out_dir/phase.json`` as the pipeline would. ``settings`` and ``data`` default to
    ``preset``'s; inputs are hash-checked when loaded."""
    from agentforge.data.spec import PRESETS as DATA_PRESETS
    from agentforge.train import distributed

    distributed.maybe_init()  # under torchrun: join the process group before the ranks are told apart
    settings = spec.presets[preset] if settings is None else settings
    data = DATA_PRESETS[preset] if data is None else data
    p = PhaseRun(
        spec,
        settings,
        inputs,
        out_dir,
        seed=seed,
        data=data,
        tools=tools,
        wandb_mode=wandb_mode,
        progress=progress,
        say=say,
    )
    result = p.run()
    if p.is_main:
        start = {
            "phase": spec.name,
            "settings": to_dict(settings),
            "data": to_dict(data),
            "seed": seed,
            "inputs": p.digests,
        }
        record_phase(p.out_dir, spec, result.artifacts, result.metrics, start, time.perf_counter() - p.started)
    return result


def standalone_main(spec: PhaseSpec, argv: list[str] | None = None) -> int:
    """``python -m agentforge.phases.<name>``: run one phase alone. Inputs are ``--<input> DIR``;
    settings come from ``--preset`` and ``--set KEY=VALUE`` (the same syntax as ``agentforge run``:
    ``--set steps=200``, ``--set data.seq_len=96``); ``--data data.json`` takes the data spec a
    pipeline run recorded (default: the preset's)."""
    import argparse
    import importlib
    import sys

    from agentforge import config as configuration
    from agentforge.data.spec import read_data_spec

    # ``python -m`` runs the phase module as __main__, a second copy of it; the importable module
    # is the one whose classes resolve their (string) annotations and whose SPEC the pipeline uses.
    module = importlib.import_module(f"agentforge.phases.{spec.name}")
    spec = module.SPEC
    parser = argparse.ArgumentParser(
        prog=f"python -m agentforge.phases.{spec.name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, need in spec.needs.items():
        parser.add_argument(f"--{name}", required=True, type=Path, nargs="+" if need.many else None, help=need.help)
    parser.add_argument("--preset", choices=configuration.PRESETS, default="tiny")
    parser.add_argument("--out", required=True, type=Path, help="phase directory (reused on a rerun)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, help="a run's data.json (its data spec and seed); default: the preset's")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set steps=200 or --set data.seq_len=96 (repeatable)",
    )
    parser.add_argument("--wandb", choices=("online", "offline", "disabled"), help="W&B mode (default: offline)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        sets = [*args.sets, f"seed={args.seed}"]
        if args.data is not None:
            recorded, seed = read_data_spec(args.data)
            sets = [*(f"data.{k}={json.dumps(v)}" for k, v in to_dict(recorded).items()), *sets[:-1], f"seed={seed}"]
        config = configuration.resolve([spec], preset=args.preset, sets=sets, standalone=spec.name)
        result = run_alone(
            spec,
            {name: getattr(args, name) for name in spec.needs},
            args.out,
            settings=config[spec.name],
            data=config.data,
            tools=config.tools,
            seed=config.seed,
            wandb_mode=args.wandb,
        )
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps(result.metrics, indent=2, default=str))
    sys.stdout.flush()
    return 0
