"""The orchestrator on a three-phase pipeline of small real phases (seedling -> polish -> unbuilt,
the last not implemented; see pipeline_helpers.TEST_PHASES): planning, records, registry rows,
resume, stale phases, refused handoffs, the lock. The real phases run in test_pipeline_run.py."""
import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pipeline_phase_polish
from agentforge import pipeline, rundir
from agentforge.artifacts import save_model_dir
from agentforge.config import ConfigError
from agentforge.pipeline import HandoffError, PhaseSpec, check_models
from agentforge.registry import open_registry
from pipeline_helpers import TEST_PHASES, assert_consistent, tree

pytestmark = pytest.mark.usefixtures("one_thread")


def start(phases=TEST_PHASES, **options):
    """Plan and execute a run in-process; returns its info and the progress lines it printed."""
    info, steps = pipeline.prepare(phases=phases, **options)
    lines = []
    pipeline.execute(info, steps, phases=phases, progress=False, say=lines.append)
    return info, lines


def mtime(path):
    return path.stat().st_mtime_ns


# ---------------------------------------------------------------------------------------------
# the declared pipeline


def test_the_eight_phases_in_order_each_fed_by_earlier_phases():
    assert [s.name for s in pipeline.PHASES] == ["cognate", "evomerge", "quietstar", "bitnet", "curriculum",
                                                 "baking", "experts", "compression"]
    assert [s.number for s in pipeline.PHASES] == list(range(1, 9))
    provided = {}
    for spec in pipeline.PHASES:
        assert spec.module == f"agentforge.phases.{spec.name}" and spec.dirname == f"{spec.number:02d}-{spec.name}"
        for producer, artifact in spec.needs.values():
            assert artifact in provided[producer], (spec.name, producer, artifact)
        provided[spec.name] = spec.provides
    assert pipeline.implementation(pipeline.PHASES[0]) is not None  # cognate


def test_plan_skips_unimplemented_phases_and_the_phases_that_need_them(tmp_path):
    after = PhaseSpec(4, "after", "pipeline_phase_polish", {"model": ("unbuilt", "model")}, ("model",),
                      check_models("model"))
    steps = pipeline.plan(tmp_path, [*TEST_PHASES, after])
    assert [(s.spec.name, s.action) for s in steps] == [("seedling", "run"), ("polish", "run"),
                                                        ("unbuilt", "skip"), ("after", "skip")]
    assert steps[2].reason == "not implemented yet"
    assert steps[3].reason == "needs unbuilt.model, and unbuilt is skipped (not implemented yet)"
    steps = pipeline.plan(tmp_path, TEST_PHASES, stop="seedling")
    assert [s.action for s in steps] == ["run", "outside", "outside"]


# ---------------------------------------------------------------------------------------------
# a run and its records


def test_run_writes_phase_records_registry_rows_metrics_and_report(tmp_path):
    run_dir = tmp_path / "run"
    info, lines = start(out=run_dir, preset="micro")
    assert "[3/3] unbuilt: skipped (not implemented yet)" in lines
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["config"]["polish"] == {"steps": 4, "lr": 0.01}
    assert rundir.lock_holder(run_dir) is None  # released
    seedling = rundir.read_record(run_dir / "01-seedling")
    polish = rundir.read_record(run_dir / "02-polish")
    assert polish["artifacts"] == {"model": "model"} and "model/model.safetensors" in polish["files"]
    assert polish["inputs"] == {"model": rundir.artifact_digest(seedling, "model")}
    assert not (run_dir / "03-unbuilt").exists()

    with open_registry(run_dir) as registry:
        models, handoffs = registry.models(), registry.handoffs()
        assert [r["status"] for r in registry.runs()] == ["completed"]
    assert [m["id"] for m in models] == ["seedling/model", "polish/model"]
    assert models[1]["parents"] == ["seedling/model"]  # the parent path in agentforge.json, as a model id
    assert models[0]["parameters"] == seedling["metrics"]["model/parameters"]
    assert models[1]["metrics"] == {"final_loss": polish["metrics"]["model/final_loss"]}
    assert [(h["from_phase"], h["artifact"], h["to_phase"], h["input"], h["models"]) for h in handoffs] == [
        ("seedling", "model", "polish", "model", ["seedling/model"])]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["seedling", "polish"]
    assert rows[1]["model/final_loss"] == polish["metrics"]["model/final_loss"]
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert_consistent(run_dir, TEST_PHASES)


def test_resume_reuses_completed_phases(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    before = tree(run_dir / "01-seedling") | tree(run_dir / "02-polish")
    _, lines = start(resume=run_dir)
    assert "[1/3] seedling: complete, reused" in lines and "[2/3] polish: complete, reused" in lines
    assert tree(run_dir / "01-seedling") | tree(run_dir / "02-polish") == before
    assert_consistent(run_dir, TEST_PHASES)


def test_a_damaged_artifact_makes_its_phase_rerun_to_the_same_result(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    weights = run_dir / "02-polish" / "model" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + bytes(8))
    assert pipeline.phase_states(run_dir, TEST_PHASES)["polish"] == \
        "incomplete (model/model.safetensors has changed since it was written)"
    _, lines = start(resume=run_dir)
    assert "[2/3] polish: resuming in " + str(run_dir / "02-polish") in lines
    assert weights.read_bytes() == good  # retrained from its final checkpoint: the same model
    assert pipeline.phase_states(run_dir, TEST_PHASES)["polish"] == "completed"
    assert_consistent(run_dir, TEST_PHASES)


def test_a_changed_config_is_refused_on_resume_unless_allowed_then_reruns_what_it_affects(tmp_path):
    run_dir = tmp_path / "run"
    start(out=run_dir, preset="micro")
    with pytest.raises(ConfigError, match=r"^the config differs from the one .* was started with "
                                          r"\(seedling.hidden_size: 16 -> 24\); pass --allow-config-change"):
        pipeline.prepare(resume=run_dir, sets=["seedling.hidden_size=24"], phases=TEST_PHASES)
    old_checkpoint = mtime(run_dir / "02-polish" / "train" / "checkpoint" / "trainer_state.json")
    _, lines = start(resume=run_dir, sets=["seedling.hidden_size=24"], allow_config_change=True)
    # seedling's settings changed, so its model changed, so polish's input did: both start over
    # (polish's old checkpoint would not even fit the wider model).
    assert "[1/3] seedling: starting in " + str(run_dir / "01-seedling") in lines
    assert "[2/3] polish: starting in " + str(run_dir / "02-polish") in lines
    assert mtime(run_dir / "02-polish" / "train" / "checkpoint" / "trainer_state.json") != old_checkpoint
    assert json.loads((run_dir / "run.json").read_text())["config"]["seedling"]["hidden_size"] == 24
    assert_consistent(run_dir, TEST_PHASES)


def test_a_missing_input_artifact_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^polish needs seedling.model, but .*01-seedling holds no completed "
                                          r"seedling phase; run seedling first"):
        pipeline.prepare(out=run_dir, preset="micro", start="polish", phases=TEST_PHASES)
    assert not run_dir.exists()


def test_registry_rows_are_restored_when_a_run_died_before_writing_them(tmp_path):
    run_dir = tmp_path / "run"
    info, _ = start(out=run_dir, preset="micro")
    with open_registry(run_dir) as registry:  # as if killed between phase.json and the registry commit
        registry.forget_phase(info["id"], "polish")
    start(resume=run_dir)
    assert_consistent(run_dir, TEST_PHASES)
    with open_registry(run_dir) as registry:
        assert [m["id"] for m in registry.models()] == ["seedling/model", "polish/model"]


def test_an_interrupted_run_is_marked_and_resumes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_phase_polish, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        start(out=run_dir, preset="micro")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert rundir.lock_holder(run_dir) is None
    monkeypatch.undo()
    start(resume=run_dir)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert_consistent(run_dir, TEST_PHASES)


# ---------------------------------------------------------------------------------------------
# contracts


def test_a_phase_that_breaks_its_contract_is_not_recorded(tmp_path):
    greedy = [PhaseSpec(1, "seedling", "pipeline_phase_seedling", {}, ("model", "tokenizer"), check_models("model"))]
    run_dir = tmp_path / "run"
    with pytest.raises(HandoffError, match=r"^seedling did not hand over tokenizer \(it returned: model\)$"):
        start(greedy, out=run_dir, preset="micro")
    assert rundir.read_record(run_dir / "01-seedling") is None
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("seedling did not hand over")


def tiny_llama(hidden: int = 16) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


@pytest.fixture(scope="module")
def cognate_like(tmp_path_factory):
    """A trunk and three siblings written the way Cognate writes them (tiny Llamas stand in for
    Cognate models: the contract is about directories, shapes and parents)."""
    root = tmp_path_factory.mktemp("cognate")
    save_model_dir(tiny_llama(), None, root / "trunk", {"parents": []})
    for name in ("reasoning", "memory", "speed"):
        save_model_dir(tiny_llama(), None, root / name, {"parents": [str(root / "trunk")]})
    save_model_dir(tiny_llama(hidden=24), None, root / "wide", {"parents": [str(root / "trunk")]})
    save_model_dir(tiny_llama(), None, root / "orphan", {"parents": []})
    return root


def test_cognate_contract_accepts_three_mergeable_siblings_of_the_trunk(cognate_like):
    root = cognate_like
    pipeline.check_cognate({"trunk": root / "trunk", "siblings": [root / n for n in ("reasoning", "memory", "speed")]})


@pytest.mark.parametrize("siblings, message", [
    (["reasoning", "memory"], r"^siblings: expected exactly 3 sibling models, got 2$"),
    (["reasoning", "memory", "wide"], r"^siblings/wide: parameter lm_head.weight has shape \[32, 24\], "
                                      r"the trunk's has \[32, 16\]$"),
    (["reasoning", "memory", "orphan"], r"^siblings/orphan: its agentforge.json does not name the trunk .* as a parent$"),
])
def test_cognate_contract_refuses_a_broken_handoff(cognate_like, siblings, message):
    root = cognate_like
    with pytest.raises(HandoffError, match=message):
        pipeline.check_cognate({"trunk": root / "trunk", "siblings": [root / n for n in siblings]})


def test_cognate_contract_refuses_a_sibling_changed_after_it_was_written(cognate_like, tmp_path):
    import shutil

    shutil.copytree(cognate_like / "memory", tmp_path / "memory")
    (tmp_path / "memory" / "config.json").write_text("{}")
    with pytest.raises(HandoffError, match=r"^siblings/memory: .*config.json has changed since it was written"):
        pipeline.check_cognate({"trunk": cognate_like / "trunk",
                                "siblings": [cognate_like / "reasoning", tmp_path / "memory", cognate_like / "speed"]})


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
    dead_pid = 2 ** 22 + 1  # above Linux's pid_max: no such process
    (tmp_path / f".model.tmp-{dead_pid}-x1").mkdir()
    (tmp_path / f".metrics.jsonl.tmp-{dead_pid}-x2").write_text("half")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / ".checkpoint.old").mkdir()  # a finished swap whose old copy was not deleted yet
    alive = tmp_path / f".summary.json.tmp-{os.getpid()}-x3"
    alive.write_text("being written")
    assert len(rundir.remove_dead_temps(tmp_path)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "checkpoint"]
