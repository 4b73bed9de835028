"""The orchestrator on a two-phase pipeline of small real phases (seedling -> polish, see
pipeline_helpers.TEST_PHASES): planning, records, registry rows, resume, stale phases, refused
handoffs, the data spec handoff, the lock. The real phases run in test_pipeline_run.py."""

import dataclasses
import json
import os

import pytest

import pipeline_phase_polish
import pipeline_phase_seedling
from agentforge import pipeline, rundir
from agentforge.errors import ConfigError, HandoffError
from agentforge.registry import open_registry
from agentforge.report import write_report
from agentforge.runtime import model_dir
from pipeline_helpers import TEST_PHASES, assert_consistent, tree

pytestmark = pytest.mark.usefixtures("one_thread")


def start(phases=TEST_PHASES, **options):
    """Plan and execute a run in-process; returns the Run and the progress lines it printed."""
    run = pipeline.prepare(phases=phases, **options)
    lines = []
    pipeline.execute(run, progress=False, say=lines.append, on_change=write_report)
    return run, lines


def mtime(path):
    return path.stat().st_mtime_ns


# ---------------------------------------------------------------------------------------------
# the declared pipeline


def test_the_eight_phases_in_order_each_fed_by_earlier_phases():
    phases = pipeline.default_phases()
    assert [s.name for s in phases] == [
        "cognate",
        "evomerge",
        "quietstar",
        "bitnet",
        "curriculum",
        "baking",
        "experts",
        "compression",
    ]
    assert [s.number for s in phases] == list(range(1, 9))
    provided = {}
    for spec in phases:
        assert (
            spec.dirname == f"{spec.number:02d}-{spec.name}" and spec.run.__module__ == f"agentforge.phases.{spec.name}"
        )
        for need in spec.needs.values():
            assert need.artifact in provided[need.producer], (spec.name, need.source)
        provided[spec.name] = spec.provides
    assert pipeline.DATA_ARTIFACT in phases[0].provides


def test_selection_honours_from_and_to(tmp_path):
    assert pipeline._selection(tmp_path, TEST_PHASES, None, "seedling") == ["seedling"]
    with pytest.raises(ConfigError, match=r"^--from polish comes after --to seedling$"):
        pipeline._selection(tmp_path, TEST_PHASES, "polish", "seedling")
    with pytest.raises(ConfigError, match=r"^--to: unknown phase 'nope'; phases: seedling, polish$"):
        pipeline._selection(tmp_path, TEST_PHASES, None, "nope")


# ---------------------------------------------------------------------------------------------
# a run and its records


def test_run_writes_phase_records_registry_rows_metrics_and_report(tmp_path):
    run_dir = tmp_path / "run"
    _, lines = start(out=run_dir, preset="micro")
    assert lines[-1].startswith("[2/2] polish: done in ")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["config"]["polish"] == {"steps": 4, "lr": 0.01}
    assert rundir.lock_holder(run_dir) is None  # released
    seedling = rundir.read_record(run_dir / "01-seedling")
    polish = rundir.read_record(run_dir / "02-polish")
    assert polish["artifacts"] == {"model": "model"} and "model/model.safetensors" in polish["files"]
    assert polish["inputs"] == {
        "model": rundir.artifact_digest(seedling, "model"),
        "data": rundir.artifact_digest(seedling, "data"),
    }
    assert polish["data"] == run["config"]["data"] and "summary.json" in polish["files"]

    with open_registry(run_dir) as registry:
        models, handoffs = registry.models(), registry.handoffs()
        assert [r["status"] for r in registry.runs()] == ["completed"]
    assert [m["id"] for m in models] == ["seedling/model", "polish/model"]
    assert models[1]["parents"] == ["seedling/model"]  # the parent path in agentforge.json, as a model id
    assert models[0]["parameters"] == seedling["metrics"]["model/parameters"]
    assert [(h["from_phase"], h["artifact"], h["to_phase"], h["input"], h["models"]) for h in handoffs] == [
        ("seedling", "model", "polish", "model", ["seedling/model"])
    ]
    assert models[1]["metrics"]["final_loss"] == polish["metrics"]["model/final_loss"]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["seedling", "polish"]
    assert rows[1]["model/final_loss"] == polish["metrics"]["model/final_loss"]
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert_consistent(run_dir, TEST_PHASES)


def test_the_report_is_drawn_after_each_phase_and_once_more_only_when_the_run_is_complete(tmp_path):
    statuses = []

    def report(run_dir, phases):
        statuses.append(json.loads((run_dir / "run.json").read_text())["status"])

    run = pipeline.prepare(phases=TEST_PHASES, out=tmp_path / "run", preset="micro")
    pipeline.execute(run, progress=False, say=lambda _: None, on_change=report)
    assert statuses == ["running", "completed"]  # seedling; then polish, the last, with the final status


def test_resume_reuses_completed_phases(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    before = tree(run_dir / "01-seedling") | tree(run_dir / "02-polish")
    _, lines = start(resume=run_dir)
    assert "[1/2] seedling: complete, reused" in lines and "[2/2] polish: complete, reused" in lines
    assert tree(run_dir / "01-seedling") | tree(run_dir / "02-polish") == before
    assert_consistent(run_dir, TEST_PHASES)


def test_a_damaged_artifact_makes_its_phase_rerun_to_the_same_result(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    weights = run_dir / "02-polish" / "model" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8])
    assert (
        rundir.phase_states(run_dir, TEST_PHASES)["polish"]
        == "incomplete (model/model.safetensors has changed since it was written (size))"
    )
    _, lines = start(resume=run_dir)
    assert "[2/2] polish: resuming in " + str(run_dir / "02-polish") in lines
    assert weights.read_bytes() == good  # retrained from its final checkpoint: the same model
    assert rundir.phase_states(run_dir, TEST_PHASES)["polish"] == "completed"
    assert_consistent(run_dir, TEST_PHASES)


def test_a_changed_config_is_refused_on_resume_unless_allowed_then_reruns_what_it_affects(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    with pytest.raises(
        ConfigError,
        match=r"^the config differs from the one .* was started with "
        r"\(seedling.hidden_size: 16 -> 24\); pass --allow-config-change",
    ):
        pipeline.prepare(resume=run_dir, sets=["seedling.hidden_size=24"], phases=TEST_PHASES)
    old_checkpoint = mtime(run_dir / "02-polish" / "train" / "train" / "checkpoint" / "trainer_state.json")
    _, lines = start(resume=run_dir, sets=["seedling.hidden_size=24"], allow_config_change=True)
    # seedling's settings changed, so its model changed, so polish's input did: both start over
    # (polish's old checkpoint would not even fit the wider model).
    assert "[1/2] seedling: starting in " + str(run_dir / "01-seedling") in lines
    assert "[2/2] polish: starting in " + str(run_dir / "02-polish") in lines
    assert mtime(run_dir / "02-polish" / "train" / "train" / "checkpoint" / "trainer_state.json") != old_checkpoint
    assert json.loads((run_dir / "run.json").read_text())["config"]["seedling"]["hidden_size"] == 24
    assert_consistent(run_dir, TEST_PHASES)


def test_a_missing_input_artifact_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(
        ConfigError,
        match=r"^polish needs seedling.model, but .*/run holds no completed "
        r"seedling phase; run seedling first",
    ):
        pipeline.prepare(out=run_dir, preset="micro", start="polish", phases=TEST_PHASES)
    assert not run_dir.exists()


def test_registry_rows_are_restored_when_a_run_died_before_writing_them(tmp_path):
    run_dir = tmp_path / "run"
    run, _ = start(out=run_dir, preset="micro")
    with open_registry(run_dir) as registry:  # as if killed between phase.json and the registry commit
        registry.forget_phase(run.info["id"], "polish")
    start(resume=run_dir)
    assert_consistent(run_dir, TEST_PHASES)
    with open_registry(run_dir) as registry:
        assert [m["id"] for m in registry.models()] == ["seedling/model", "polish/model"]


def test_an_interrupted_run_is_marked_and_resumes(tmp_path):
    run_dir = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    phases = [TEST_PHASES[0], dataclasses.replace(pipeline_phase_polish.SPEC, run=interrupted)]
    with pytest.raises(KeyboardInterrupt):
        start(phases, out=run_dir, preset="micro")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert rundir.lock_holder(run_dir) is None
    start(resume=run_dir)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert_consistent(run_dir, TEST_PHASES)


# ---------------------------------------------------------------------------------------------
# contracts


def test_a_phase_that_breaks_its_contract_is_not_recorded(tmp_path):
    greedy = [
        dataclasses.replace(
            pipeline_phase_seedling.SPEC, provides={**pipeline_phase_seedling.SPEC.provides, "tokenizer": model_dir}
        )
    ]
    run_dir = tmp_path / "run"
    with pytest.raises(HandoffError, match=r"^seedling did not hand over tokenizer \(it returned: model, data\)$"):
        start(greedy, out=run_dir, preset="micro")
    assert rundir.read_record(run_dir / "01-seedling") is None
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("seedling did not hand over")


def test_a_handoff_is_verified_by_hash_before_the_consumer_starts(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro", stop="seedling")
    config = run_dir / "01-seedling" / "model" / "config.json"
    config.write_text(config.read_text().replace("16", "17"))  # same size: only the hash tells
    with pytest.raises(
        pipeline.PipelineError,
        match=r"^polish needs seedling.model, but .*01-seedling is not intact: "
        r"model/config.json has changed since it was written; re-run",
    ):
        start(resume=run_dir, start="polish")


def test_a_stray_hidden_file_never_blocks_a_run(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    (run_dir / "01-seedling" / "model" / ".DS_Store").write_bytes(b"finder")
    _, lines = start(resume=run_dir, start="polish")
    assert "[2/2] polish: complete, reused" in lines
    assert rundir.verify(run_dir / "01-seedling", rundir.read_record(run_dir / "01-seedling")) == []


def test_an_artifact_path_that_leaves_its_phase_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    record_path = run_dir / "02-polish" / "phase.json"
    record = json.loads(record_path.read_text())
    record["artifacts"]["model"] = "../01-seedling/model"
    record_path.write_text(json.dumps(record))
    with pytest.raises(
        pipeline.PipelineError, match=r"artifact path '../01-seedling/model' leaves the phase directory"
    ):
        rundir.absolute_artifacts(run_dir / "02-polish", rundir.read_record(run_dir / "02-polish"))


def test_a_changed_data_spec_is_refused_where_the_first_phase_recorded_another(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    with pytest.raises(
        ConfigError,
        match=r"^the run's data spec \(.*data.json\) and the config differ: "
        r"data.seq_len: 48 -> 96; the held-out data is fixed by seedling",
    ):
        start(resume=run_dir, start="polish", sets=["data.seq_len=96"], allow_config_change=True)


def test_a_moved_run_directory_resumes_where_it_is(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    moved = tmp_path / "elsewhere"
    run_dir.rename(moved)
    _, lines = start(resume=moved)
    assert "[1/2] seedling: complete, reused" in lines and "[2/2] polish: complete, reused" in lines
    assert json.loads((moved / "run.json").read_text())["dir"] == str(moved)
    assert_consistent(moved, TEST_PHASES)


def test_a_damaged_registry_is_rebuilt_from_the_records(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    (run_dir / "registry.sqlite").write_bytes(b"garbage" * 100)
    for leftover in ("registry.sqlite-wal", "registry.sqlite-shm"):
        (run_dir / leftover).unlink(missing_ok=True)
    start(resume=run_dir)
    assert_consistent(run_dir, TEST_PHASES)


def test_the_cognate_contract_refuses_siblings_that_cannot_be_merged(cognate_micro, tmp_path):
    import shutil

    from agentforge.phases import cognate

    _, result = cognate_micro
    siblings = result.artifacts["siblings"]
    cognate.check_siblings(siblings)
    with pytest.raises(HandoffError, match=r"^siblings: expected exactly 3 sibling models, got 2$"):
        cognate.check_siblings(siblings[:2])
    odd = tmp_path / "odd"
    shutil.copytree(result.artifacts["trunk"], odd)  # the trunk names no parent
    with pytest.raises(HandoffError, match=r"^siblings: they must name one common parent \(the trunk\), they name 0"):
        cognate.check_siblings([odd, odd, odd])


# ---------------------------------------------------------------------------------------------
# the lock and crash leftovers


def test_the_lock_keeps_a_second_run_out_and_names_the_holder(tmp_path):
    with rundir.RunLock(tmp_path):
        assert rundir.lock_holder(tmp_path) == str(os.getpid())
        with pytest.raises(ConfigError, match=rf"^{tmp_path} is held by another run \(pid {os.getpid()}\)$"):
            rundir.RunLock(tmp_path).acquire()
    assert rundir.lock_holder(tmp_path) is None
    with rundir.RunLock(tmp_path):  # free again
        pass


def test_leftovers_of_killed_writers_are_cleaned_up(tmp_path):
    dead_pid = 2**22 + 1  # above Linux's pid_max: no such process
    (tmp_path / f".model.tmp-{dead_pid}-x1").mkdir()
    (tmp_path / f".metrics.jsonl.tmp-{dead_pid}-x2").write_text("half")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / ".checkpoint.old").mkdir()  # a finished swap whose old copy was not deleted yet
    alive = tmp_path / f".summary.json.tmp-{os.getpid()}-x3"
    alive.write_text("being written")
    assert len(rundir.remove_dead_temps(tmp_path)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "checkpoint"]


def test_a_phase_does_not_start_without_the_disk_space_it_needs(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    run_dir = tmp_path / "run"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 5 << 20))
    with pytest.raises(
        OSError,
        match=r"the disk holding .*run has 5 MiB free; seedling needs about 64 MiB; "
        r"free some space \(or move the run\), then resume",
    ):
        start(out=run_dir, preset="micro")
    assert not (run_dir / "01-seedling" / "model").exists()
    monkeypatch.undo()
    start(resume=run_dir)
    assert_consistent(run_dir, TEST_PHASES)


def test_the_python_tool_isolation_is_checked_before_anything_is_written_and_recorded(tmp_path, monkeypatch):
    from agentforge.tools import sandbox

    def no_bubblewrap():
        raise sandbox.SandboxUnavailable(
            "the Python tool needs bubblewrap for its OS isolation (apt-get install "
            "bubblewrap); pass isolation='unsafe-inprocess' to run without it"
        )

    monkeypatch.setattr(sandbox, "_bwrap", no_bubblewrap)
    with pytest.raises(
        ConfigError,
        match=r"needs bubblewrap .*; to run the Python tool without OS isolation, set "
        r"tools.python=unsafe-inprocess \(recorded in run.json\)$",
    ):
        pipeline.prepare(out=tmp_path / "run", preset="micro", phases=TEST_PHASES)
    assert not (tmp_path / "run").exists()
    run, _ = start(out=tmp_path / "run", preset="micro", sets=["tools.python=unsafe-inprocess"])
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["config"]["tools"] == {"python": "unsafe-inprocess"}
    assert recorded["tool_isolation"]["isolation"] == "unsafe-inprocess"
