"""Phase 5 end to end on the micro preset: on the micro Cognate trunk (two levels, control and all
evaluations) and on the same trunk converted to BitNet (quantization-aware: the BitLinear layers
survive training and saving; a hard wall of 1.0 stops it after the first level)."""
import dataclasses
import json

import pytest
import torch

from agentforge.artifacts import load_model_dir, save_model_dir
from agentforge.nn import BitLinear, convert_to_bitnet
from agentforge.phases import PhaseContext, curriculum, settings_from_dict
from agentforge.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

LEVEL_KEYS = {"level", "accuracy", "mastered", "skipped", "hints", "hint_corrected", "tool_calls", "self_prediction",
              "dream_kept", "rounds", "steps", "remaining"}


def quiet(out):
    return PhaseContext(out_dir=out, progress=False, say=lambda _: None, wandb_mode="disabled")


@pytest.fixture(scope="module")
def on_cognate(cognate_micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    inputs = {"model": cognate_micro[1].artifacts["trunk"]}
    return out, inputs, curriculum.run(inputs, curriculum.PRESETS["micro"], quiet(out))


def test_model_reloads_with_its_lineage_and_data_record(on_cognate, cognate_micro):
    out, inputs, result = on_cognate
    model, tokenizer, meta = load_model_dir(result.artifacts["model"])
    _, _, parent_meta = load_model_dir(inputs["model"])
    assert meta["phase"] == "curriculum" and meta["parents"] == [str(inputs["model"])]
    assert meta["data"] == parent_meta["data"] and tokenizer is not None
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


def test_the_control_has_equal_compute(on_cognate):
    out, _, _ = on_cognate
    record = json.loads((out / "record.json").read_text())
    _, _, control_meta = load_model_dir(out / "control")
    assert control_meta["steps"] == record["steps"] and control_meta["tasks"] == record["examples"]


def test_rerun_reuses_the_finished_phase(on_cognate):
    out, inputs, result = on_cognate
    before = (out / "metrics.jsonl").read_text()
    again = curriculum.run(inputs, curriculum.PRESETS["micro"], quiet(out))
    assert again.metrics == result.metrics and (out / "metrics.jsonl").read_text() == before


def test_figures(on_cognate):
    out, _, _ = on_cognate
    titles = [title for title, _, _ in curriculum.figures(out)]
    assert len(titles) == 3 and any("remaining" in t for t in titles)


def test_bitnet_model_stays_ternary_and_hits_the_hard_wall(cognate_micro, tmp_path):
    model, tokenizer, meta = load_model_dir(cognate_micro[1].artifacts["trunk"])
    convert_to_bitnet(model)
    save_model_dir(model, tokenizer, tmp_path / "latent", {"phase": "bitnet", "parents": [], "data": meta["data"]})
    settings = dataclasses.replace(curriculum.PRESETS["micro"], hard_wall=1.0, control=False, text_rows=0)
    result = curriculum.run({"model": tmp_path / "latent"}, settings, quiet(tmp_path / "phase"))
    trained, _, _ = load_model_dir(result.artifacts["model"])
    layers = {name: m for name, m in trained.named_modules() if isinstance(m, BitLinear)}
    assert set(layers) == set(curriculum.bitlinear_layers(model)) and all(m.state == "training" for m in layers.values())
    moved = [name for name, m in layers.items()
             if not torch.equal(m.weight, model.get_submodule(name).weight)]
    assert moved  # the latent weights were trained through the STE
    summary = json.loads((tmp_path / "phase" / "summary.json").read_text())
    assert summary["curriculum"]["stop_reason"].startswith("hard wall at level 0")
    assert len(summary["curriculum"]["levels"]) == 1 and "control" not in summary["per_level"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="inputs must name 'model'"):
        curriculum.run({}, curriculum.PRESETS["micro"], quiet(tmp_path))
    bad = dataclasses.replace(curriculum.PRESETS["micro"], families=["chess"])
    with pytest.raises(ValueError, match="unknown or empty"):
        curriculum.run({"model": tmp_path}, bad, quiet(tmp_path))
    with pytest.raises(ValueError, match="hard_wall must be in"):
        curriculum.run({"model": tmp_path}, dataclasses.replace(curriculum.PRESETS["micro"], hard_wall=2.0),
                       quiet(tmp_path))
    with pytest.raises(ValueError, match="unknown setting"):
        settings_from_dict(curriculum.Settings, {"stepz": 3}, "curriculum")
