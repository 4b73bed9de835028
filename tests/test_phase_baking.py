"""Phase 6 end to end on the micro preset: from the micro Cognate trunk, and from a BitLinear
(convert_to_bitnet) model that reacts to prompts, so that the cycles really bake."""

import json

import pytest
import torch

from agentforge.artifacts import MANIFEST, load_model_dir, read_metadata, save_model_dir, sha256_file
from agentforge.errors import ConfigError
from agentforge.eval.suite import spread
from agentforge.figures import baking as baking_figures
from agentforge.nn import BitLinear, convert_to_bitnet
from agentforge.phases import baking
from agentforge.rundir import read_record
from agentforge.runtime import MEASURED
from agentforge.settings import from_dict
from agentforge.train import read_metrics
from phase_helpers import run_micro

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def on_trunk(cognate_micro, tmp_path_factory):
    trunk = cognate_micro[1].artifacts["trunk"]
    out = tmp_path_factory.mktemp("baking")
    return out, trunk, run_micro(baking.SPEC, {"model": trunk}, out)


def test_phase_on_the_micro_cognate_trunk(on_trunk, cognate_micro):
    out, trunk, result = on_trunk
    model, tokenizer, metadata = load_model_dir(result.artifacts["model"])
    [parent] = metadata["parents"]
    assert metadata["phase"] == "baking" and (result.artifacts["model"] / parent["path"]).resolve() == trunk.resolve()
    assert parent["sha256"] == sha256_file(trunk / MANIFEST)
    assert read_record(out)["data"] == json.loads((cognate_micro[0] / "data.json").read_text())["spec"]
    assert len(tokenizer) == len(load_model_dir(trunk)[1])

    rows = read_metrics(out, phase="baking/iteration")
    assert 1 <= len(rows) <= baking.PRESETS["micro"].max_iterations
    assert rows[0]["cycle"] == "tools" and len(rows[0]["candidates"]) == baking.PRESETS["micro"].candidates
    for row in rows:
        assert row["winner"] == max(row["candidates"], key=lambda c: c["score"])["prompt"]
        assert isinstance(row["plateau"], bool) and row["outcome"]
    summary = json.loads((out / "summary.json").read_text())
    report = summary["report"]
    assert set(report["kl"]) == {"tools", "persona"} and report["kl"]["tools"]["original"] > 0
    assert {"prompted_original", "original", "final"} <= set(report["behaviour"]["tools"])
    assert result.metrics["perplexity/original"] == pytest.approx(report["perplexity"]["original"])
    assert read_metrics(out, phase="baking")[-1]["phase_seconds"] == pytest.approx(result.metrics["phase_seconds"])
    assert len(baking_figures.figures(out)) >= 2


def test_rerun_reuses_the_cycles_and_the_report(on_trunk, monkeypatch):
    out, trunk, result = on_trunk
    manifest = (result.artifacts["model"] / "agentforge.json").read_text()

    def no_work(*args, **kwargs):
        raise AssertionError("a rerun must not bake or measure again")

    for name in ("run_cycles", "tool_prompt_bake", "measure_report"):
        monkeypatch.setattr(baking, name, no_work)
    again = run_micro(baking.SPEC, {"model": trunk}, out)
    assert {k: v for k, v in again.metrics.items() if k not in MEASURED} == {
        k: v for k, v in result.metrics.items() if k not in MEASURED
    }
    assert (again.artifacts["model"] / "agentforge.json").read_text() == manifest


@pytest.fixture(scope="module")
def bitnet_model_dir(cognate_micro, tmp_path_factory):
    """A micro Cognate with large initial weights (its outputs depend strongly on the context, so
    a prompt moves them), converted to BitLinear and saved as the pipeline hands it over."""
    from agentforge.models import CognateConfig, CognateForCausalLM

    trunk = cognate_micro[1].artifacts["trunk"]
    _, tokenizer, _ = load_model_dir(trunk)
    torch.manual_seed(0)
    config = CognateConfig.from_preset(
        "micro",
        vocab_size=len(tokenizer),
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("bitnet") / "model"
    save_model_dir(convert_to_bitnet(CognateForCausalLM(config)), tokenizer, path, {"phase": "bitnet"})
    return path


BITNET_CHANGES = dict(retention_tolerance=1.0, bake={"max_steps": 30})


@pytest.fixture(scope="module")
def on_bitnet(bitnet_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("baking")
    return out, run_micro(baking.SPEC, {"model": bitnet_model_dir}, out, **BITNET_CHANGES)


def test_phase_bakes_a_bitlinear_model_and_keeps_it_ternary(on_bitnet):
    out, result = on_bitnet
    model = load_model_dir(result.artifacts["model"])[0]
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert layers and all(layer.state == "training" for layer in layers)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baked"], "the cycles baked nothing"
    assert read_metadata(result.artifacts["model"])["baked_prompts"] == summary["baked"]
    kl = summary["report"]["kl"]["tools"]
    # the tool prompt's bake, on test inputs it never saw (this micro model plateaus near 25 %
    # removed, before half strength; when a half-baked copy exists it lies between none and full)
    assert kl["original"] > kl["full"]
    if "half" in kl:
        assert kl["original"] > kl["half"] > kl["full"]
    assert result.metrics["kl_removed/full"] > 0.15
    first = summary["baked"][0]
    assert first["kl_after"] < first["kl_before"]


def test_the_same_seed_writes_the_same_model(on_bitnet, bitnet_model_dir, tmp_path_factory):
    out, result = on_bitnet
    assert json.loads((out / "summary.json").read_text())["baked"]  # the cycles changed the model
    again = run_micro(baking.SPEC, {"model": bitnet_model_dir}, tmp_path_factory.mktemp("baking"), **BITNET_CHANGES)
    for name in ("model", "bakes/full"):
        first, second = out / name, again.artifacts["model"].parent / name
        files = sorted(p.name for p in first.iterdir())
        assert files == sorted(p.name for p in second.iterdir())
        for file in files:
            assert (first / file).read_bytes() == (second / file).read_bytes(), f"{name}/{file}"


def test_phase_refuses_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="input 'model' is missing"):
        run_micro(baking.SPEC, {}, tmp_path)
    with pytest.raises(ConfigError, match="unknown setting"):
        from_dict(baking.Settings, {"strenght": 0.5}, "baking")
    for bad, message in (
        (dict(strength=1.0), "strength"),
        (dict(bake={"method": "prefix"}), "bake.method"),
        (dict(tool_families=["nope"]), "tool_families"),
        (dict(persona_prompts=[]), "persona_prompts"),
        (dict(candidates=0), "candidates"),
        (dict(bake={"batch_size": 8, "micro_batch_size": 3}), "bake.micro_batch_size: must divide batch_size"),
        (dict(time_budget_s=40.0), "unknown setting"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_dict(baking.Settings, bad, "baking")


@pytest.mark.parametrize("total,count", [(10, 3), (5, 10), (100, 0), (7, 7), (1000, 32)])
def test_anchor_and_text_rows_are_spread_over_the_split(total, count):
    rows = spread(total, count)
    assert len(rows) == min(total, count) and rows == sorted(set(rows)) and all(0 <= r < total for r in rows)
    if count and total >= 2 * count:  # not the first rows: every stretch of the split is represented
        assert rows[0] >= total // (2 * count) - 1 and rows[-1] >= total - total // count
