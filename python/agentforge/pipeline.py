"""The pipeline: eight phases in order, what each needs and guarantees, and the loop that runs
them in a run directory (layout in agentforge.rundir) with resume, a lock and handoff checks.

    info, steps = prepare(out="runs/tiny", preset="tiny")   # validates; writes nothing
    execute(info, steps)                                    # runs, resumes, records, reports

A phase is implemented when its module ``agentforge.phases.<name>`` imports and has ``run``
(with ``Settings`` and ``PRESETS``); the others are listed as not implemented and skipped with a
notice, and so is every phase whose producer is skipped. Phases meet only through artifacts: a
phase's ``needs`` maps each input name to ``(producer phase, artifact name)``, and its ``check``
verifies the guarantees of what it hands over, once when it finishes and again before a later
phase consumes it.

Resume: a phase whose ``phase.json`` verifies, with the same settings, seed and input digests,
is reused; an unfinished one is rerun in its own directory, where it resumes itself (finished
model directories, training checkpoints); one started under other settings or inputs starts over.

Under torchrun every rank runs each phase (training is data-parallel inside
``agentforge.train.train``); rank 0 alone takes the lock and writes run.json, phase.json, the
registry and the report, and tells the other ranks what it decided (``on_main``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from agentforge import config as configuration
from agentforge import rundir
from agentforge.config import ConfigError
from agentforge.phases import PhaseContext, PhaseResult
from agentforge.train import distributed

Artifacts = dict[str, Any]  # artifact name -> a path, or a list of paths


class PipelineError(RuntimeError):
    """A run failed after it started (exit code 1)."""


class HandoffError(PipelineError):
    """An artifact does not keep the guarantee its phase declares."""


# ---------------------------------------------------------------------------------------------
# handoff contracts


def _metadata(path: Path, what: str) -> dict:
    """The ``agentforge.json`` metadata of a model directory whose files all still match it."""
    from agentforge.artifacts import CorruptArtifact, verify_model_dir

    if not path.is_dir():
        raise HandoffError(f"{what}: {path} is not a directory")
    try:
        return verify_model_dir(path)
    except CorruptArtifact as e:
        raise HandoffError(f"{what}: {e}") from None


def _check_artifact(path: Path, what: str) -> None:
    """An artifact exists; a model directory among them matches its manifest."""
    from agentforge.artifacts import MANIFEST

    if not path.exists():
        raise HandoffError(f"{what}: {path} does not exist")
    if path.is_dir() and (path / MANIFEST).exists():
        _metadata(path, what)


def _each_model(names: tuple[str, ...], artifacts: Artifacts) -> None:
    for name in names:
        _metadata(Path(artifacts[name]), name)


def _each_exists(names: tuple[str, ...], artifacts: Artifacts) -> None:
    for name in names:
        _check_artifact(Path(artifacts[name]), name)


# Contracts are partials of module functions, not closures, so that a plan can be sent to other ranks.
def check_models(*names: str) -> Callable[[Artifacts], None]:
    """A contract: each named artifact is a verified model directory."""
    return functools.partial(_each_model, names)


def check_exists(*names: str) -> Callable[[Artifacts], None]:
    """A contract: each named artifact exists (model directories among them verified)."""
    return functools.partial(_each_exists, names)


def check_cognate(artifacts: Artifacts) -> None:
    """Cognate's guarantee: a verified ``trunk`` and exactly three verified ``siblings`` with the
    trunk's parameter names and shapes (so they can be merged), each descended from the trunk."""
    trunk, siblings = Path(artifacts["trunk"]), artifacts["siblings"]
    _metadata(trunk, "trunk")
    if not isinstance(siblings, (list, tuple)) or len(siblings) != 3:
        count = len(siblings) if isinstance(siblings, (list, tuple)) else "not a list of"
        raise HandoffError(f"siblings: expected exactly 3 sibling models, got {count}")
    shapes = rundir.tensor_shapes(trunk)
    for sibling in map(Path, siblings):
        parents = {Path(p).resolve() for p in _metadata(sibling, f"siblings/{sibling.name}").get("parents", [])}
        theirs = rundir.tensor_shapes(sibling)
        if theirs.keys() != shapes.keys():
            odd = sorted(theirs.keys() ^ shapes.keys())[0]
            raise HandoffError(f"siblings/{sibling.name}: parameter {odd} is in only one of it and the trunk")
        for key, shape in shapes.items():
            if theirs[key] != shape:
                raise HandoffError(f"siblings/{sibling.name}: parameter {key} has shape {list(theirs[key])}, "
                                   f"the trunk's has {list(shape)}")
        if trunk.resolve() not in parents:
            raise HandoffError(f"siblings/{sibling.name}: its agentforge.json does not name the trunk {trunk} as a parent")


# ---------------------------------------------------------------------------------------------
# the phases


@dataclass(frozen=True)
class PhaseSpec:
    """One pipeline phase: ``needs`` maps input name -> (producer phase, artifact name);
    ``provides`` names its artifacts; ``check`` raises ``HandoffError`` if they break its guarantee."""

    number: int
    name: str
    module: str
    needs: dict[str, tuple[str, str]]
    provides: tuple[str, ...]
    check: Callable[[Artifacts], None] = field(compare=False)

    @property
    def dirname(self) -> str:
        """The phase's directory in a run: ``NN-name``."""
        return f"{self.number:02d}-{self.name}"


def _phase(number: int, name: str, needs: dict, provides: tuple, check) -> PhaseSpec:
    return PhaseSpec(number, name, f"agentforge.phases.{name}", needs, provides, check)


PHASES: list[PhaseSpec] = [
    _phase(1, "cognate", {}, ("trunk", "siblings"), check_cognate),
    _phase(2, "evomerge", {"siblings": ("cognate", "siblings"), "trunk": ("cognate", "trunk")}, ("champion",),
           check_models("champion")),
    _phase(3, "quietstar", {"model": ("evomerge", "champion")}, ("model",), check_models("model")),
    _phase(4, "bitnet", {"model": ("quietstar", "model")}, ("packed", "latent"), check_models("packed", "latent")),
    _phase(5, "curriculum", {"model": ("bitnet", "latent")}, ("model",), check_models("model")),
    _phase(6, "baking", {"model": ("curriculum", "model")}, ("model",), check_models("model")),
    _phase(7, "experts", {"model": ("baking", "model")}, ("model",), check_models("model")),
    _phase(8, "compression", {"model": ("experts", "model"), "packed": ("bitnet", "packed")}, ("artifact",),
           check_exists("artifact")),
]


@functools.cache
def _import_phase(module_name: str) -> ModuleType | None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise PipelineError(f"importing {module_name} failed: {e}") from e
    except Exception as e:  # a phase that exists but cannot import is a bug, never "not implemented"
        raise PipelineError(f"importing {module_name} failed: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "run", None)):
        return None
    missing = [name for name in ("Settings", "PRESETS") if not hasattr(module, name)]
    if missing:
        raise PipelineError(f"{module_name} has run() but no {' or '.join(missing)}")
    return module


def implementation(spec: PhaseSpec) -> ModuleType | None:
    """The phase's module when it is implemented, else None."""
    return _import_phase(spec.module)


def implemented(phases: list[PhaseSpec]) -> dict[str, ModuleType]:
    """``{name: module}`` of the implemented phases, in pipeline order."""
    return {spec.name: module for spec in phases if (module := implementation(spec)) is not None}


def find_phase(name: str, phases: list[PhaseSpec], option: str = "phase") -> PhaseSpec:
    """The phase called ``name``, or a ``ConfigError`` listing the names."""
    for spec in phases:
        if spec.name == name:
            return spec
    raise ConfigError(f"{option}: unknown phase {name!r}; phases: {', '.join(s.name for s in phases)}")


# ---------------------------------------------------------------------------------------------
# ranks


def on_main(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result or raises its error
    (a ``ConfigError`` stays one), so no rank waits for a rank that failed."""
    outcome, error = None, None
    if distributed.is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as e:
            outcome, error = ("error", (isinstance(e, ConfigError), str(e))), e
    status, value = distributed.broadcast_from_main(outcome)
    if error is not None:
        raise error
    if status == "error":
        usage, message = value
        raise (ConfigError if usage else PipelineError)(message)
    return value


# ---------------------------------------------------------------------------------------------
# planning (reads only)

RUN, SKIP, OUTSIDE = "run", "skip", "outside"


@dataclass
class Step:
    """What a run does with one phase: ``run`` it, ``skip`` it (``reason`` says why) or leave it
    ``outside`` the --from/--to selection."""

    spec: PhaseSpec
    action: str
    reason: str = ""


def plan(run_dir: Path, phases: list[PhaseSpec], start: str | None = None, stop: str | None = None) -> list[Step]:
    """One step per phase. Raises ``ConfigError`` when a phase to run needs an artifact that no
    selected phase produces and ``run_dir`` does not hold either."""
    names = [spec.name for spec in phases]
    first = names.index(find_phase(start, phases, "--from").name) if start else 0
    last = names.index(find_phase(stop, phases, "--to").name) if stop else len(phases) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    steps: dict[str, Step] = {}
    for index, spec in enumerate(phases):
        if not first <= index <= last:
            step = Step(spec, OUTSIDE, "before --from" if index < first else "after --to")
        elif implementation(spec) is None:
            step = Step(spec, SKIP, "not implemented yet")
        else:
            step = Step(spec, RUN)
            for producer, artifact in spec.needs.values():
                reason = _unavailable(run_dir, spec, steps[producer], artifact)
                if reason:
                    step = Step(spec, SKIP, reason)
                    break
        steps[spec.name] = step
    return list(steps.values())


def _unavailable(run_dir: Path, consumer: PhaseSpec, producer: Step, artifact: str) -> str | None:
    """Why ``consumer`` cannot get ``artifact`` from ``producer`` (None when it can)."""
    name = producer.spec.name
    if producer.action == RUN:
        return None
    if producer.action == SKIP:
        return f"needs {name}.{artifact}, and {name} is skipped ({producer.reason})"
    if rundir.read_record(run_dir / producer.spec.dirname) is not None:
        return None
    if implementation(producer.spec) is None:
        return f"needs {name}.{artifact}, and {name} is not implemented yet"
    raise ConfigError(f"{consumer.name} needs {name}.{artifact}, but {run_dir / producer.spec.dirname} holds no "
                      f"completed {name} phase; run {name} first (start earlier than --from {consumer.name})")


def _default_out() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _check_new_run_dir(run_dir: Path) -> None:
    if (run_dir / rundir.RUN_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another --out")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--out {run_dir} exists and is not an empty directory")


def prepare(*, out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
            preset: str | None = None, config_file: str | os.PathLike | None = None, sets: list[str] = (),
            start: str | None = None, stop: str | None = None, allow_config_change: bool = False,
            phases: list[PhaseSpec] | None = None) -> tuple[dict, list[Step]]:
    """Validate a run before anything is written: its directory, its config, its phase selection
    and the inputs of the phases it will run. Returns the run's ``run.json`` content and its plan.
    Raises ``ConfigError`` (one line) for anything wrong."""
    phases = PHASES if phases is None else phases
    modules = implemented(phases)
    names = [spec.name for spec in phases]
    if resume is not None:
        if out is not None:
            raise ConfigError("give either --out (a new run) or --resume DIR, not both")
        run_dir = Path(resume).absolute()
        saved = rundir.read_run(run_dir)
        if saved is None:
            raise ConfigError(f"--resume {resume}: no run there ({run_dir / rundir.RUN_FILE} is missing)")
        config = configuration.resolve(modules, names, preset=preset, file=config_file, sets=sets, saved=saved["config"])
        change = configuration.first_difference(saved["config"], config)
        if change and not allow_config_change:
            raise ConfigError(f"the config differs from the one {run_dir} was started with ({change}); "
                              "pass --allow-config-change to rerun the phases it affects")
        info = {**saved, "config": config, "from": start, "to": stop}  # completed phases are reused anyway
    else:
        run_dir = Path(out if out is not None else _default_out()).absolute()
        _check_new_run_dir(run_dir)
        config = configuration.resolve(modules, names, preset=preset, file=config_file, sets=sets)
        created = rundir.now()
        info = {"id": f"{run_dir.name}-{created[:19].replace(':', '').replace('-', '')}", "dir": str(run_dir),
                "created": created, "config": config, "from": start, "to": stop}
    holder = rundir.lock_holder(run_dir)
    if holder is not None:
        raise ConfigError(f"{run_dir} is held by another run (pid {holder})")
    return {**info, "dir": str(run_dir)}, plan(run_dir, phases, info["from"], info["to"])


# ---------------------------------------------------------------------------------------------
# running


def _say_on_main(say: Callable[[str], None]) -> Callable[[str], None]:
    return say if distributed.is_main() else (lambda _: None)


def execute(info: dict, steps: list[Step], *, phases: list[PhaseSpec] | None = None, wandb_mode: str | None = None,
            progress: bool = True, say: Callable[[str], None] = print) -> None:
    """Run the planned phases in ``info["dir"]`` under its lock, reusing completed ones; record
    each finished phase (phase.json, registry, metrics.jsonl) and write report.html. On failure
    run.json says so and the directory stays resumable."""
    phases = PHASES if phases is None else phases
    say = _say_on_main(say)
    run_dir = Path(info["dir"])
    lock = rundir.RunLock(run_dir)
    on_main(_acquire, lock)
    try:
        on_main(_begin, info, phases)
        for step in steps:
            label = f"[{step.spec.number}/{len(phases)}] {step.spec.name}"
            if step.action == RUN:
                _run_phase(run_dir, info, step.spec, phases, label, wandb_mode, progress, say)
            else:
                say(f"{label}: {'skipped' if step.action == SKIP else 'not selected'} ({step.reason})")
        on_main(_end, info, phases, "completed")
    except BaseException as e:
        if distributed.is_main():
            # best effort: the error that ended the run matters more than one about recording it
            with contextlib.suppress(Exception):
                interrupted = isinstance(e, KeyboardInterrupt)
                _record_status(info, "interrupted" if interrupted else "failed", None if interrupted else str(e))
        raise
    finally:
        lock.release()


def _acquire(lock: rundir.RunLock) -> None:
    lock.acquire()  # returns nothing: the lock stays with rank 0


def _begin(info: dict, phases: list[PhaseSpec]) -> None:
    """Rank 0: mark the run running, clean up after a killed writer and bring the registry and
    DIR/metrics.jsonl in line with the phases that are complete on disk."""
    from agentforge.registry import open_registry

    run_dir = Path(info["dir"])
    _record_status(info, "running")
    rundir.remove_dead_temps(run_dir)
    with open_registry(run_dir) as registry:
        for spec in phases:
            phase_dir = run_dir / spec.dirname
            record = rundir.read_record(phase_dir)
            if record is not None and rundir.record_problem(phase_dir, record) is None:
                registry.record_phase(info["id"], run_dir, spec.name, phase_dir, record, _handoffs(spec))
            else:
                registry.forget_phase(info["id"], spec.name)
    write_run_metrics(run_dir, phases)


def _end(info: dict, phases: list[PhaseSpec], status: str) -> None:
    from agentforge.report import write_report

    _record_status(info, status)
    write_report(Path(info["dir"]), phases)


def _record_status(info: dict, status: str, error: str | None = None) -> None:
    """run.json and the registry's run row say ``status`` (and the error that ended the run)."""
    from agentforge.registry import open_registry

    info.update(status=status, pid=os.getpid(), error=error)
    rundir.write_run(info["dir"], info)
    with open_registry(info["dir"]) as registry:
        registry.record_run(info["id"], Path(info["dir"]), info["config"], status, info["created"])


def _handoffs(spec: PhaseSpec) -> list[tuple[str, str, str]]:
    return [(producer, artifact, name) for name, (producer, artifact) in spec.needs.items()]


def _run_phase(run_dir: Path, info: dict, spec: PhaseSpec, phases: list[PhaseSpec], label: str,
               wandb_mode: str | None, progress: bool, say: Callable[[str], None]) -> None:
    module = implementation(spec)
    config = info["config"]
    phase_dir = run_dir / spec.dirname
    inputs, digests = on_main(_gather_inputs, run_dir, spec, phases)
    start = {"phase": spec.name, "settings": config[spec.name], "seed": config["seed"], "inputs": digests}
    state = on_main(_prepare_phase_dir, info, spec, start)
    if state == "complete":
        say(f"{label}: complete, reused")
        return
    say(f"{label}: {'resuming' if state == 'resume' else 'starting'} in {phase_dir}")
    distributed.barrier()
    began = time.perf_counter()
    ctx = PhaseContext(out_dir=phase_dir, seed=config["seed"], wandb_mode=wandb_mode, progress=progress,
                       say=lambda line: say(f"{label.split()[0]} {line}"))
    result = module.run(inputs, configuration.settings_of(config, spec.name, module), ctx)
    distributed.barrier()
    on_main(_finish_phase, info, spec, phases, result, start, time.perf_counter() - began)
    say(f"{label}: done in {time.perf_counter() - began:.1f} s")


def _gather_inputs(run_dir: Path, spec: PhaseSpec, phases: list[PhaseSpec]) -> tuple[dict, dict]:
    """Rank 0: the inputs of ``spec`` from its producers' verified records, each handoff checked
    against the producer's contract, and the digest of every input."""
    inputs, digests = {}, {}
    for name, (producer, artifact) in spec.needs.items():
        source = find_phase(producer, phases)
        source_dir = run_dir / source.dirname
        record = rundir.read_record(source_dir)
        problem = rundir.record_problem(source_dir, record)
        if problem:
            raise PipelineError(f"{spec.name} needs {producer}.{artifact}, but {source_dir} is not complete ({problem})")
        artifacts = rundir.absolute_artifacts(source_dir, record)
        try:
            source.check(artifacts)
        except HandoffError as e:
            raise HandoffError(f"handoff {producer}.{artifact} -> {spec.name}.{name} refused: {e}") from None
        inputs[name] = artifacts[artifact]
        digests[name] = rundir.artifact_digest(record, artifact)
    return inputs, digests


def _same_start(record: dict | None, start: dict) -> bool:
    return record is not None and all(record.get(key) == value for key, value in start.items())


def _prepare_phase_dir(info: dict, spec: PhaseSpec, start: dict) -> str:
    """Rank 0: ``complete`` when the phase's record verifies and was made from the same settings,
    seed and inputs; else ``resume`` (same start, keep the directory) or ``fresh`` (cleared)."""
    from agentforge.registry import open_registry

    phase_dir = Path(info["dir"]) / spec.dirname
    record = rundir.read_record(phase_dir)
    if _same_start(record, start) and rundir.record_problem(phase_dir, record) is None:
        return "complete"
    state = "resume" if _same_start(rundir.read_record(phase_dir, rundir.START_FILE), start) else "fresh"
    with open_registry(info["dir"]) as registry:
        registry.forget_phase(info["id"], spec.name)
    if state == "fresh":
        rundir.clear_directory(phase_dir)  # work from other settings or inputs must not be reused
    else:
        (phase_dir / rundir.PHASE_FILE).unlink(missing_ok=True)  # it no longer describes the directory
    phase_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_record(phase_dir, start, rundir.START_FILE)
    return state


def _relative_artifacts(phase_dir: Path, spec: PhaseSpec, result: PhaseResult) -> dict:
    missing = [name for name in spec.provides if name not in result.artifacts]
    if missing:
        raise HandoffError(f"{spec.name} did not hand over {', '.join(missing)} (it returned: "
                           f"{', '.join(result.artifacts) or 'nothing'})")
    relative = {}
    for name, value in result.artifacts.items():
        paths = rundir.artifact_paths(value)
        for path in paths:
            if not Path(path).resolve().is_relative_to(phase_dir.resolve()):
                raise PipelineError(f"{spec.name} returned artifact {name} at {path}, outside its directory {phase_dir}")
            if not Path(path).exists():
                raise HandoffError(f"{spec.name} returned artifact {name} at {path}, which does not exist")
        as_text = [Path(p).resolve().relative_to(phase_dir.resolve()).as_posix() for p in paths]
        relative[name] = as_text if isinstance(value, (list, tuple)) else as_text[0]
    return relative


def _finish_phase(info: dict, spec: PhaseSpec, phases: list[PhaseSpec], result: PhaseResult, start: dict,
                  seconds: float) -> None:
    """Rank 0: check what the phase handed over, then record it: phase.json (the completion
    marker, with every artifact file's sha256), registry rows, DIR/metrics.jsonl and the report."""
    from agentforge.registry import open_registry
    from agentforge.report import write_report

    run_dir = Path(info["dir"])
    phase_dir = run_dir / spec.dirname
    relative = _relative_artifacts(phase_dir, spec, result)
    artifacts = rundir.absolute_artifacts(phase_dir, {"artifacts": relative})
    try:
        spec.check(artifacts)
    except HandoffError as e:
        raise HandoffError(f"{spec.name} broke its handoff contract: {e}") from None
    files = {}
    for value in artifacts.values():
        files.update(rundir.artifact_files(phase_dir, value))
    record = {**start, "number": spec.number, "artifacts": relative, "files": files, "metrics": result.metrics,
              "seconds": round(seconds, 3), "world_size": distributed.world_size(), "completed": rundir.now()}
    rundir.write_record(phase_dir, record)
    rundir.remove_dead_temps(phase_dir)
    with open_registry(run_dir) as registry:
        registry.record_phase(info["id"], run_dir, spec.name, phase_dir, rundir.read_record(phase_dir),
                              _handoffs(spec))
    write_run_metrics(run_dir, phases)
    write_report(run_dir, phases)


def write_run_metrics(run_dir: Path, phases: list[PhaseSpec]) -> None:
    """``DIR/metrics.jsonl``: one row per completed phase, ``{"phase", "step": null, "seconds",
    **its metrics}``, rebuilt from the phase.json files (so a resumed run never duplicates a row)."""
    from agentforge.artifacts import atomic_write_text

    rows = []
    for spec in phases:
        record = rundir.read_record(run_dir / spec.dirname)
        if record is not None:
            rows.append({"phase": spec.name, "step": None, "seconds": record["seconds"], **record["metrics"]})
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------
# reading a run directory


def phase_states(run_dir: Path, phases: list[PhaseSpec] | None = None) -> dict[str, str]:
    """``{phase: state}`` for a run directory: ``completed``, ``incomplete (why)``, ``not started``
    or ``not implemented``."""
    states = {}
    for spec in PHASES if phases is None else phases:
        phase_dir = run_dir / spec.dirname
        record = rundir.read_record(phase_dir)
        problem = rundir.record_problem(phase_dir, record)
        if record is not None and problem is None:
            states[spec.name] = "completed"
        elif phase_dir.exists():
            states[spec.name] = f"incomplete ({problem})"
        else:
            states[spec.name] = "not started" if implementation(spec) else "not implemented"
    return states
