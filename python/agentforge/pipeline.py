"""The pipeline: the eight phases in order, and the loop that runs them in a run directory
(layout and integrity model in ``agentforge.rundir``) with resume, a lock and handoff checks.

    run = prepare(out="runs/tiny", preset="tiny")     # validates everything; writes nothing
    execute(run)                                      # runs, resumes, records, reports

Each phase declares beside its ``run`` (``agentforge.phases.<name>.SPEC``, see
``agentforge.runtime``) what it needs (``producer.artifact``), what it provides and the contract
each artifact keeps. The first phase also hands over the run's data spec (``data.json``): every
later phase evaluates on it, and a config whose data spec differs from it is refused.

Resume: a phase whose ``phase.json`` is intact and was made from the same settings, data spec,
seed and input digests is reused; an unfinished one is rerun in its own directory, where the
runtime reuses its finished steps and training resumes from its checkpoints; one started under
other settings or inputs starts over.

Under torchrun every rank runs each phase (training is data-parallel); rank 0 alone takes the
lock and writes run.json, phase.json, the registry and the report, and tells the other ranks
what it decided (``distributed.on_main``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agentforge import config as configuration
from agentforge import rundir
from agentforge.data.spec import DATA_ARTIFACT
from agentforge.errors import ConfigError, HandoffError, PipelineError
from agentforge.runtime import PhaseRun, PhaseSpec, record_phase
from agentforge.settings import to_dict
from agentforge.train import distributed

PHASE_MODULES = ("cognate", "evomerge", "quietstar", "bitnet", "curriculum", "baking", "experts", "compression")


@functools.cache
def _default_phases() -> tuple[PhaseSpec, ...]:
    return tuple(importlib.import_module(f"agentforge.phases.{name}").SPEC for name in PHASE_MODULES)


def default_phases() -> list[PhaseSpec]:
    """The eight phase specs, in pipeline order."""
    return list(_default_phases())


def find_phase(name: str, phases: list[PhaseSpec], option: str = "phase") -> PhaseSpec:
    """The phase called ``name``, or a ``ConfigError`` listing the names."""
    for spec in phases:
        if spec.name == name:
            return spec
    raise ConfigError(f"{option}: unknown phase {name!r}; phases: {', '.join(s.name for s in phases)}")


# ---------------------------------------------------------------------------------------------
# planning (reads only)


@dataclass
class Run:
    """A validated run: its directory, ``run.json`` content (``info``), config, phases and the
    names of the phases to run (the --from/--to selection)."""

    dir: Path
    info: dict
    config: configuration.RunConfig
    phases: list[PhaseSpec]
    selected: list[str]


def _selection(run_dir: Path, phases: list[PhaseSpec], start: str | None, stop: str | None) -> list[str]:
    """The phases from ``start`` to ``stop``; a ``ConfigError`` when one of them needs an artifact
    that no selected phase produces and ``run_dir`` does not hold."""
    names = [spec.name for spec in phases]
    first = names.index(find_phase(start, phases, "--from").name) if start else 0
    last = names.index(find_phase(stop, phases, "--to").name) if stop else len(phases) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    selected = names[first : last + 1]
    for spec in phases[first : last + 1]:
        sources = [(need.producer, need.artifact) for need in spec.needs.values()]
        if spec is not phases[0]:
            sources.append((phases[0].name, DATA_ARTIFACT))
        for producer, artifact in sources:
            if producer not in selected and rundir.read_record(run_dir / find_phase(producer, phases).dirname) is None:
                raise ConfigError(
                    f"{spec.name} needs {producer}.{artifact}, but {run_dir} holds no completed "
                    f"{producer} phase; run {producer} first (start earlier than --from {spec.name})"
                )
    return selected


def _tool_isolation(config: configuration.RunConfig) -> dict:
    """What the Python tool's configured isolation gives here, for the run record; refused in one
    line where it cannot be set up (``tools.python: unsafe-inprocess`` opts out, and is recorded)."""
    from agentforge.tools.sandbox import SandboxUnavailable, describe_isolation

    try:
        return describe_isolation(config.tools.python)
    except SandboxUnavailable as e:
        reason = str(e).split(";")[0]  # the library's own advice names its argument, not the config key
        raise ConfigError(
            f"{reason}; to run the Python tool without OS isolation, set "
            "tools.python=unsafe-inprocess (recorded in run.json)"
        ) from None


def _check_new_run_dir(run_dir: Path) -> None:
    if (run_dir / rundir.RUN_FILE).exists():
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another --out"
        )
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--out {run_dir} exists and is not an empty directory")


def prepare(
    *,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    sets: Sequence[str] = (),
    start: str | None = None,
    stop: str | None = None,
    allow_config_change: bool = False,
    phases: list[PhaseSpec] | None = None,
) -> Run:
    """Validate a run before anything is written: its directory, config, phase selection and the
    inputs of the phases it will run. Raises ``ConfigError`` (one line) for anything wrong."""
    phases = default_phases() if phases is None else phases
    if resume is not None:
        if out is not None:
            raise ConfigError("give either --out (a new run) or --resume DIR, not both")
        run_dir = Path(resume).absolute()
        saved = rundir.read_run(run_dir)
        if saved is None:
            raise ConfigError(f"--resume {resume}: no run there ({run_dir / rundir.RUN_FILE} is missing)")
        config = configuration.resolve(phases, preset=preset, file=config_file, sets=sets, saved=saved["config"])
        change = configuration.first_difference(saved["config"], config.to_dict())
        if change and not allow_config_change:
            raise ConfigError(
                f"the config differs from the one {run_dir} was started with ({change}); "
                "pass --allow-config-change to rerun the phases it affects"
            )
        info = {**saved, "config": config.to_dict(), "from": start, "to": stop}
    else:
        run_dir = Path(out if out is not None else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")).absolute()
        _check_new_run_dir(run_dir)
        config = configuration.resolve(phases, preset=preset, file=config_file, sets=sets)
        created = rundir.now()
        info = {
            "id": f"{run_dir.name}-{created[:19].replace(':', '').replace('-', '')}",
            "created": created,
            "config": config.to_dict(),
            "from": start,
            "to": stop,
        }
    holder = rundir.lock_holder(run_dir)
    if holder is not None:
        raise ConfigError(f"{run_dir} is held by another run (pid {holder})")
    info["dir"] = str(run_dir)  # where it is now: a run directory may have been moved
    info["tool_isolation"] = _tool_isolation(config)
    selected = _selection(run_dir, phases, info["from"], info["to"])
    first = phases[0]
    if first.name not in selected and len(selected) > 0:
        record = rundir.read_record(run_dir / first.dirname)
        if record is not None and DATA_ARTIFACT in record["artifacts"]:
            _check_data_spec(
                rundir.absolute_artifacts(run_dir / first.dirname, record)[DATA_ARTIFACT], config, first.name
            )
    return Run(run_dir, info, config, phases, selected)


# ---------------------------------------------------------------------------------------------
# running


def execute(
    run: Run,
    *,
    wandb_mode: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    on_change: Callable[[Path, list[PhaseSpec]], object] | None = None,
) -> None:
    """Run the selected phases in ``run.dir`` under its lock, reusing completed ones; record each
    finished phase (phase.json, registry, metrics.jsonl) and call ``on_change(run_dir, phases)``
    after each (the report). On failure run.json says so and the directory stays resumable."""
    say = say if distributed.is_main() else (lambda _: None)
    lock = rundir.RunLock(run.dir)
    distributed.on_main(lock.acquire)
    # the last selected phase is reported once, after the run's status is final
    last = next((spec.name for spec in reversed(run.phases) if spec.name in run.selected), None)
    try:
        distributed.on_main(_begin, run)
        for spec in run.phases:
            label = f"[{spec.number}/{len(run.phases)}] {spec.name}"
            if spec.name in run.selected:
                _run_phase(run, spec, label, wandb_mode, progress, say)
                distributed.on_main(_record_status, run, "running")  # run.json's ``updated`` moves on
                if on_change is not None and spec.name != last:
                    distributed.on_main(on_change, run.dir, run.phases)
            else:
                say(f"{label}: not selected (outside --from/--to)")
        distributed.on_main(_record_status, run, "completed")
    except BaseException as e:
        if distributed.is_main():
            # best effort: the error that ended the run matters more than one about recording it
            with contextlib.suppress(Exception):
                interrupted = isinstance(e, KeyboardInterrupt)
                _record_status(run, "interrupted" if interrupted else "failed", None if interrupted else str(e))
        raise
    finally:
        lock.release()
    if on_change is not None:
        distributed.on_main(on_change, run.dir, run.phases)


def _begin(run: Run) -> None:
    """Rank 0: mark the run running, clean up after a killed writer and bring the registry and
    DIR/metrics.jsonl in line with the phases that are complete on disk."""
    from agentforge.registry import sync_registry

    _record_status(run, "running")
    rundir.remove_dead_temps(run.dir)
    sync_registry(run.dir, run.info["id"], run.phases)
    rundir.write_run_metrics(run.dir, run.phases)


def _record_status(run: Run, status: str, error: str | None = None) -> None:
    """run.json and the registry's run row say ``status`` (and the error that ended the run)."""
    from agentforge.registry import open_registry

    run.info.update(status=status, pid=os.getpid(), error=error)
    rundir.write_run(run.dir, run.info)
    with open_registry(run.dir) as registry:
        registry.record_run(run.info["id"], run.dir, run.info["config"], status, run.info["created"])


def _run_phase(
    run: Run, spec: PhaseSpec, label: str, wandb_mode: str | None, progress: bool, say: Callable[[str], None]
) -> None:
    phase_dir = run.dir / spec.dirname
    inputs, digests = distributed.on_main(_gather_inputs, run, spec)
    start = {
        "phase": spec.name,
        "settings": to_dict(run.config[spec.name]),
        "data": to_dict(run.config.data),
        "seed": run.config.seed,
        "inputs": digests,
    }
    state = distributed.on_main(_prepare_phase_dir, run, spec, start)
    if state == "complete":
        say(f"{label}: complete, reused")
        return
    distributed.on_main(_check_free_space, run, spec, inputs)
    say(f"{label}: {'resuming' if state == 'resume' else 'starting'} in {phase_dir}")
    distributed.barrier()
    began = time.perf_counter()
    phase_run = PhaseRun(
        spec,
        run.config[spec.name],
        inputs,
        phase_dir,
        seed=run.config.seed,
        data=run.config.data,
        tools=run.config.tools,
        digests=digests,
        verified=True,
        wandb_mode=wandb_mode,
        wandb_group=run.info["id"],
        progress=progress,
        say=lambda line: say(f"{label.split()[0]} {line}"),
    )
    result = phase_run.run()
    distributed.barrier()
    distributed.on_main(_finish_phase, run, spec, result.artifacts, result.metrics, start, time.perf_counter() - began)
    say(f"{label}: done in {time.perf_counter() - began:.1f} s")


def _handoff(run: Run, producer: str, artifact: str, consumer: str, name: str) -> tuple[Any, str]:
    """Rank 0: ``producer``'s ``artifact`` for ``consumer``'s input ``name``, hash-verified against
    the producer's record and checked against its contract; and its digest."""
    source = find_phase(producer, run.phases)
    source_dir = run.dir / source.dirname
    record = rundir.read_record(source_dir)
    problems = rundir.verify(source_dir, record, [artifact] if record and artifact in record["artifacts"] else None)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PipelineError(
            f"{consumer} needs {producer}.{artifact}, but {source_dir} is not intact: "
            f"{problems[0]}{more}; re-run {producer}"
        )
    assert record is not None  # verify() reports a missing record
    value = rundir.absolute_artifacts(source_dir, record)[artifact]
    try:
        source.provides[artifact](value)
    except HandoffError as e:
        raise HandoffError(f"handoff {producer}.{artifact} -> {consumer}.{name} refused: {e}") from None
    return value, rundir.artifact_digest(record, artifact)


def _gather_inputs(run: Run, spec: PhaseSpec) -> tuple[dict, dict]:
    """Rank 0: every input of ``spec`` through ``_handoff``, and the run's data spec handed over by
    the first phase (it must equal the config's)."""
    inputs, digests = {}, {}
    for name, need in spec.needs.items():
        inputs[name], digests[name] = _handoff(run, need.producer, need.artifact, spec.name, name)
    if spec is not run.phases[0]:
        path, digests[DATA_ARTIFACT] = _handoff(run, run.phases[0].name, DATA_ARTIFACT, spec.name, DATA_ARTIFACT)
        _check_data_spec(path, run.config, run.phases[0].name)
    return inputs, digests


def _check_data_spec(path: Path, config: configuration.RunConfig, first: str) -> None:
    """The data spec the first phase recorded at ``path`` must be the config's (one line otherwise)."""
    from agentforge.data.spec import read_data_spec

    recorded, seed = read_data_spec(path)
    change = configuration.first_difference(
        {"data": to_dict(recorded), "seed": seed}, {"data": to_dict(config.data), "seed": config.seed}
    )
    if change:
        raise ConfigError(
            f"the run's data spec ({path}) and the config differ: {change}; the held-out data is "
            f"fixed by {first}, so rerun it (--from {first}) to change it"
        )


def _bytes_of(value) -> int:
    return sum(
        p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        for p in rundir.artifact_paths(value)
    )


def _check_free_space(run: Run, spec: PhaseSpec, inputs: dict) -> None:
    """Rank 0: refuse to start a phase whose expected writes exceed the free space (one line
    naming where, how much is free and how much the phase needs)."""
    import shutil

    from agentforge.artifacts import DiskFull

    needed = spec.disk_needed(run.config[spec.name], sum(_bytes_of(v) for v in inputs.values()))
    free = shutil.disk_usage(run.dir).free
    if free < needed:
        raise DiskFull(
            28,
            f"the disk holding {run.dir} has {free / 2**20:.0f} MiB free; {spec.name} needs about "
            f"{needed / 2**20:.0f} MiB; free some space (or move the run), then resume",
        )


def _same_start(record: dict | None, start: dict) -> bool:
    return record is not None and all(record.get(key) == value for key, value in start.items())


def _prepare_phase_dir(run: Run, spec: PhaseSpec, start: dict) -> str:
    """Rank 0: ``complete`` when the phase's record is intact and was made from the same start;
    else ``resume`` (same start, keep the directory) or ``fresh`` (cleared)."""
    from agentforge.registry import open_registry

    phase_dir = run.dir / spec.dirname
    record = rundir.read_record(phase_dir)
    if _same_start(record, start) and rundir.record_problem(phase_dir, record) is None:
        return "complete"
    state = "resume" if _same_start(rundir.read_record(phase_dir, rundir.START_FILE), start) else "fresh"
    with open_registry(run.dir) as registry:
        registry.forget_phase(run.info["id"], spec.name)
    if state == "fresh":
        rundir.clear_directory(phase_dir)  # work from other settings or inputs must not be reused
    else:
        (phase_dir / rundir.PHASE_FILE).unlink(missing_ok=True)  # it no longer describes the directory
    phase_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_record(phase_dir, start, rundir.START_FILE)
    return state


def _finish_phase(run: Run, spec: PhaseSpec, artifacts: dict, metrics: dict, start: dict, seconds: float) -> None:
    """Rank 0: record the phase (phase.json), its registry rows and DIR/metrics.jsonl."""
    from agentforge.registry import open_registry

    phase_dir = run.dir / spec.dirname
    record = record_phase(phase_dir, spec, artifacts, metrics, start, seconds)
    with open_registry(run.dir) as registry:
        registry.record_phase(run.info["id"], run.dir, spec, phase_dir, record)
    rundir.write_run_metrics(run.dir, run.phases)
