"""Phase 3 end to end on the micro preset: a thinking model that reloads both ways, the four-way
comparison with intervals, and a rerun that reuses the finished phase."""
import json

import pytest
import torch

from agentforge.artifacts import load_model_dir
from agentforge.phases import PhaseContext, quietstar
from agentforge.phases.quietstar.thinking import END, START, ThinkingModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phase(cognate_micro, tmp_path_factory):
    _, cognate_result = cognate_micro
    out = tmp_path_factory.mktemp("quietstar")
    inputs = {"model": cognate_result.artifacts["trunk"]}
    ctx = PhaseContext(out_dir=out, progress=False, say=lambda _: None)
    return out, inputs, quietstar.run(inputs, quietstar.PRESETS["micro"], ctx)


def test_thinking_model_reloads_as_base_and_as_thinker(phase):
    out, inputs, result = phase
    base, tokenizer, meta = load_model_dir(result.artifacts["model"])
    assert meta["parents"] == [str(inputs["model"])] and "data" in meta
    assert base.get_input_embeddings().weight.shape[0] == len(tokenizer)
    thinker, tok = ThinkingModel.load(result.artifacts["model"])
    assert tok.convert_tokens_to_ids([START, END]) == [thinker.settings.start_id, thinker.settings.end_id]
    ids = torch.tensor([tok("3+4=", add_special_tokens=False)["input_ids"]])
    new = thinker.generate(ids, max_new_tokens=2, eos_token_id=tok.eos_token_id)
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 2


def test_summary_compares_four_variants_with_intervals(phase):
    out, _, result = phase
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["table"]) == {"parent", "thinking", "not_thinking", "control"}
    for row in summary["table"].values():
        for stat in row.values():
            assert stat["low"] <= stat["mean"] <= stat["high"]
    assert summary["table"]["parent"]["accuracy_minus_parent"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert len(summary["tasks"]) == quietstar.PRESETS["micro"].eval_pairs
    assert result.metrics["test_items"] == quietstar.PRESETS["micro"].eval_pairs * quietstar.PRESETS["micro"].test_items
    assert result.metrics["control_steps"] >= 1 and len(summary["control_losses"]) == result.metrics["control_steps"]


def test_rerun_reuses_the_finished_phase(phase, monkeypatch):
    out, inputs, result = phase
    monkeypatch.setattr(quietstar, "_train", lambda *a, **k: pytest.fail("retrained a finished phase"))
    again = quietstar.run(inputs, quietstar.PRESETS["micro"], PhaseContext(out_dir=out, progress=False, say=lambda _: None))
    assert again.metrics == result.metrics


def test_bootstrap_interval_is_paired():
    same = quietstar.bootstrap_interval([1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], 200, 0)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}
    better = quietstar.bootstrap_interval([1.0] * 50, [0.0] * 50, 200, 0)
    assert better["low"] == better["high"] == 1.0
