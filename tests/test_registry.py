"""agentforge.registry: SQLite in WAL mode; a phase's model and handoff rows replaced in one
transaction, so recording twice leaves the same rows and forgetting leaves none behind."""

import sqlite3
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge import rundir
from agentforge.artifacts import save_model_dir, sha256_dir
from agentforge.registry import Registry, open_registry
from agentforge.runtime import Input

MAKE = SimpleNamespace(name="make", needs={})
MERGE = SimpleNamespace(name="merge", needs={"models": Input("make.children", "the children to merge")})


def tiny_llama(hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=hidden,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )


def record_for(phase_dir, artifacts, metrics=None):
    """A phase.json-style record of artifacts already written under ``phase_dir``."""
    files = {}
    for value in artifacts.values():
        files.update(rundir.artifact_files(phase_dir, value))
    relative = {
        k: [p.relative_to(phase_dir).as_posix() for p in v]
        if isinstance(v, list)
        else v.relative_to(phase_dir).as_posix()
        for k, v in artifacts.items()
    }
    sizes = {name: (phase_dir / name).stat().st_size for name in files}
    return {"artifacts": relative, "files": files, "sizes": sizes, "metrics": metrics or {}}


@pytest.fixture
def run(tmp_path):
    """A run directory with a producer phase (a base and two children) and a consumer phase
    (a merge of the children, plus a parent outside the run)."""
    run_dir = tmp_path / "run"
    first, second = run_dir / "01-make", run_dir / "02-merge"
    save_model_dir(tiny_llama(16), None, first / "base", {"parents": []})
    for name in ("left", "right"):
        save_model_dir(tiny_llama(16), None, first / name, {"parents": [str(first / "base")]})
    save_model_dir(
        tiny_llama(16),
        None,
        second / "merged",
        {"parents": [str(first / "left"), str(first / "right"), "/elsewhere/pretrained"], "metrics": {"fitness": 0.5}},
    )
    records = {
        "make": record_for(
            first,
            {"base": first / "base", "children": [first / "left", first / "right"]},
            {"left/accuracy": 0.25, "right/accuracy": 0.75, "base/accuracy": 0.1, "seconds": 3.0},
        ),
        "merge": record_for(second, {"merged": second / "merged"}),
    }
    registry = open_registry(run_dir)
    registry.record_run("r1", run_dir, {"seed": 0}, "running", "2025-01-01T00:00:00+00:00")
    yield run_dir, registry, records
    registry.close()


def record_both(run_dir, registry, records):
    registry.record_phase("r1", run_dir, MAKE, run_dir / "01-make", records["make"])
    registry.record_phase("r1", run_dir, MERGE, run_dir / "02-merge", records["merge"])


def test_the_database_is_in_wal_mode(run):
    run_dir, _, _ = run
    with sqlite3.connect(run_dir / "registry.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_model_rows_describe_each_artifact(run):
    run_dir, registry, records = run
    record_both(run_dir, registry, records)
    models = {m["id"]: m for m in registry.models("r1")}
    assert list(models) == ["make/base", "make/left", "make/right", "merge/merged"]
    left = models["make/left"]
    assert (left["phase"], left["artifact"], left["name"], left["path"]) == ("make", "children", "left", "01-make/left")
    assert left["parameters"] == tiny_llama(16).num_parameters()  # tied embeddings counted once
    assert left["bytes"] == sum(p.stat().st_size for p in (run_dir / "01-make" / "left").iterdir())
    assert left["sha256"] == rundir.files_digest(sha256_dir(run_dir / "01-make" / "left"))
    assert left["metrics"] == {"accuracy": 0.25} and left["parents"] == ["make/base"]
    merged = models["merge/merged"]
    assert merged["parents"] == ["make/left", "make/right", "/elsewhere/pretrained"]  # outside the run: a path
    assert merged["metrics"] == {"fitness": 0.5}  # from its agentforge.json
    assert registry.handoffs("r1") == [
        {
            "run": "r1",
            "from_phase": "make",
            "artifact": "children",
            "to_phase": "merge",
            "input": "models",
            "models": ["make/left", "make/right"],
        }
    ]


def test_recording_a_phase_again_replaces_its_rows(run):
    run_dir, registry, records = run
    record_both(run_dir, registry, records)
    before = registry.models(), registry.handoffs()
    record_both(run_dir, registry, records)
    assert (registry.models(), registry.handoffs()) == before


def test_forgetting_a_phase_removes_its_models_and_every_handoff_it_took_part_in(run):
    run_dir, registry, records = run
    record_both(run_dir, registry, records)
    registry.forget_phase("r1", "make")
    assert [m["id"] for m in registry.models()] == ["merge/merged"]
    assert registry.handoffs() == []


def test_the_run_row_is_updated_in_place(run):
    run_dir, registry, _ = run
    registry.record_run("r1", run_dir, {"seed": 1}, "completed", "2025-01-01T00:00:00+00:00")
    [row] = registry.runs()
    assert (row["status"], row["config"], row["created"]) == ("completed", {"seed": 1}, "2025-01-01T00:00:00+00:00")


def test_a_transaction_that_fails_half_way_leaves_the_previous_rows(run):
    run_dir, registry, records = run
    record_both(run_dir, registry, records)
    before = registry.models(), registry.handoffs()
    # the merge phase's rows are deleted and its model inserted; then a second model of the same
    # id violates the primary key and the whole transaction rolls back
    twice = {**records["merge"], "artifacts": {"merged": "merged", "copies": ["merged"]}}
    with pytest.raises(sqlite3.IntegrityError):
        registry.record_phase("r1", run_dir, MERGE, run_dir / "02-merge", twice)
    assert (registry.models(), registry.handoffs()) == before


def test_two_connections_see_the_same_rows(run):
    run_dir, registry, records = run
    record_both(run_dir, registry, records)
    with Registry(run_dir / "registry.sqlite") as reader:
        assert reader.models() == registry.models()
