"""Phase 5 end to end on the micro preset: on the micro Cognate trunk (two levels, control and all
evaluations) and on the same trunk converted to BitNet (quantization-aware: the BitLinear layers
survive training and saving; a hard wall of 1.0 stops it after the first level)."""

import json

import pytest
import torch

from agentforge.artifacts import load_model_dir, read_metadata, save_model_dir, sha256_file
from agentforge.errors import ConfigError
from agentforge.figures import curriculum as curriculum_figures
from agentforge.nn import convert_to_bitnet
from agentforge.phases import curriculum
from agentforge.quant import bitlinear_layers
from agentforge.runtime import MEASURED, run_alone
from agentforge.settings import from_dict, replace, undeclared
from agentforge.train import read_metrics
from phase_helpers import run_micro

pytestmark = pytest.mark.usefixtures("one_thread")

LEVEL_KEYS = {
    "level",
    "accuracy",
    "mastered",
    "skipped",
    "hints",
    "hint_corrected",
    "tool_calls",
    "self_prediction",
    "dream_kept",
    "rounds",
    "steps",
    "remaining",
}


@pytest.fixture(scope="module")
def on_cognate(cognate_micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    inputs = {"model": cognate_micro[1].artifacts["trunk"]}
    return out, inputs, run_micro(curriculum.SPEC, inputs, out)


def test_model_reloads_with_its_lineage_and_record(on_cognate):
    out, inputs, result = on_cognate
    model, tokenizer, meta = load_model_dir(result.artifacts["model"])
    [parent] = meta["parents"]
    assert meta["phase"] == "curriculum" and tokenizer is not None
    assert (result.artifacts["model"] / parent["path"]).resolve() == inputs["model"].resolve()
    assert parent["sha256"] == sha256_file(inputs["model"] / "agentforge.json")
    assert meta["steps"] == meta["curriculum"]["steps"] and meta["stop_reason"] == meta["curriculum"]["stop_reason"]
    assert all("seconds" not in row for row in meta["curriculum"]["levels"])  # metadata holds no timings
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_levels_rounds_and_summary_are_recorded(on_cognate):
    out, _, result = on_cognate
    levels = read_metrics(out, phase="curriculum/level")
    rounds = read_metrics(out, phase="curriculum/round")
    summary = json.loads((out / "summary.json").read_text())
    assert [row["level"] for row in levels] == [0, 1] and all(LEVEL_KEYS <= set(row) for row in levels)
    assert summary["curriculum"]["stop_reason"] == "all 2 levels done"
    assert rounds and all({"level", "round", "remaining"} <= set(r) for r in rounds)
    assert sum(row["steps"] for row in levels) <= summary["curriculum"]["steps"] == result.metrics["steps"]
    assert set(summary["per_level"]) == {"before", "after", "control"}
    for table in summary["per_level"].values():
        assert sorted(table, key=int) == [str(level) for level in range(10)]
        assert all(t["ci"][0] <= t["accuracy"] <= t["ci"][1] for t in table.values())
    all_levels = summary["comparisons"]["after_vs_control"]["all"]
    assert all_levels["difference"] == pytest.approx(all_levels["a"] - all_levels["b"])
    assert set(summary["tools"]) == {"after"} and set(summary["self_prediction"]) == {"before", "after", "control"}
    assert summary["tools"]["after"]["without"]["n"] == 10  # micro: one arithmetic family, one item per level
    assert 0.0 <= summary["self_prediction"]["after"]["accuracy"] <= 1.0
    assert summary["baselines"] == result.metrics["baseline_levels"]
    assert all(summary["perplexity"][name] > 1 for name in ("before", "after", "control"))


def test_the_control_has_equal_compute(on_cognate):
    out, _, result = on_cognate
    record = read_metadata(result.artifacts["model"])["curriculum"]
    _, _, control_meta = load_model_dir(out / "control")
    assert control_meta["steps"] == record["steps"]
    # as many examples, and as many temperature-tagged samples of its own as the curriculum's self-model examples
    assert control_meta["self"] == record["examples_by_kind"].get("self", 0)
    assert control_meta["tasks"] + control_meta["self"] == record["examples"]


def test_rerun_reuses_the_finished_phase(on_cognate, monkeypatch):
    out, inputs, result = on_cognate
    rows = {suffix: read_metrics(out, phase=f"curriculum/{suffix}") for suffix in ("level", "round")}
    manifest = (result.artifacts["model"] / "agentforge.json").read_text()

    def no_work(*args, **kwargs):
        raise AssertionError("a rerun must not train or evaluate again")

    for name in ("assess", "evaluate", "train_curriculum", "train_control"):
        monkeypatch.setattr(curriculum, name, no_work)
    again = run_micro(curriculum.SPEC, inputs, out)
    timed = (*MEASURED, "curriculum_seconds")
    assert {k: v for k, v in again.metrics.items() if k not in timed} == {
        k: v for k, v in result.metrics.items() if k not in timed
    }
    assert rows == {suffix: read_metrics(out, phase=f"curriculum/{suffix}") for suffix in ("level", "round")}
    assert (result.artifacts["model"] / "agentforge.json").read_text() == manifest


def test_figures(on_cognate):
    out, _, _ = on_cognate
    titles = [title for title, _, _ in curriculum_figures.figures(out)]
    assert len(titles) == 3 and any("remaining" in t for t in titles)


def test_bitnet_model_stays_ternary_and_hits_the_hard_wall(cognate_micro, tmp_path):
    model, tokenizer, _ = load_model_dir(cognate_micro[1].artifacts["trunk"])
    convert_to_bitnet(model)
    save_model_dir(model, tokenizer, tmp_path / "latent", {"phase": "bitnet", "parents": []})
    result = run_micro(
        curriculum.SPEC, {"model": tmp_path / "latent"}, tmp_path / "phase", hard_wall=1.0, control=False, text_rows=0
    )
    trained, _, meta = load_model_dir(result.artifacts["model"])
    layers = bitlinear_layers(trained)
    assert set(layers) == set(bitlinear_layers(model)) and all(m.state == "training" for m in layers.values())
    assert meta["bitlinear_layers"] == len(layers)
    moved = [name for name, m in layers.items() if not torch.equal(m.weight, model.get_submodule(name).weight)]
    assert moved  # the latent weights were trained through the STE
    summary = json.loads((tmp_path / "phase" / "summary.json").read_text())
    assert summary["curriculum"]["stop_reason"].startswith("hard wall at level 0")
    assert len(summary["curriculum"]["levels"]) == 1 and "control" not in summary["per_level"]
    assert summary["perplexity"]["after"] is None and not (tmp_path / "phase" / "control").exists()


def test_bad_inputs_and_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="input 'model' is missing"):
        run_alone(curriculum.SPEC, {}, tmp_path, preset="micro", say=lambda _: None)
    micro = curriculum.PRESETS["micro"]
    with pytest.raises(ConfigError, match="families: expected a list of values from"):
        replace(micro, {"families": ["chess"]}, "curriculum")
    with pytest.raises(ConfigError, match="families: expected"):
        replace(micro, {"families": []}, "curriculum")
    with pytest.raises(ConfigError, match=r"hard_wall: expected a number in \[0, 1\]"):
        replace(micro, {"hard_wall": 2.0}, "curriculum")
    with pytest.raises(ConfigError, match="optimizer: expected one of"):
        replace(micro, {"optimizer": "sgd"}, "curriculum")
    with pytest.raises(ConfigError, match="unknown setting"):
        from_dict(curriculum.Settings, {"stepz": 3}, "curriculum")
    assert undeclared(curriculum.Settings) == []
