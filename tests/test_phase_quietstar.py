"""Phase 3 end to end on the micro preset: a thinking model that reloads both ways, the four-way
comparison with intervals, an equal-compute control of a counted number of steps, and a rerun
that reuses the finished phase."""

import json

import pytest
import torch

from agentforge.artifacts import load_model_dir, sha256_file
from agentforge.data.spec import DataSpec
from agentforge.eval import EvalSuite
from agentforge.figures import quietstar as quietstar_figures
from agentforge.phases import quietstar
from agentforge.quietstar import END, START, ThinkingModel, plain_steps, training_compute
from agentforge.rundir import read_record
from agentforge.runtime import MEASURED
from agentforge.train import read_metrics
from phase_helpers import run_micro

pytestmark = pytest.mark.usefixtures("one_thread")
MICRO = quietstar.PRESETS["micro"]


@pytest.fixture(scope="module")
def phase(cognate_micro, tmp_path_factory):
    _, cognate_result = cognate_micro
    out = tmp_path_factory.mktemp("quietstar")
    inputs = {"model": cognate_result.artifacts["trunk"]}
    return out, inputs, run_micro(quietstar.SPEC, inputs, out)


def test_thinking_model_reloads_as_base_and_as_thinker(phase):
    _, inputs, result = phase
    base, tokenizer, meta = load_model_dir(result.artifacts["model"])
    [parent] = meta["parents"]
    assert (result.artifacts["model"] / parent["path"]).resolve() == inputs["model"].resolve()
    assert parent["sha256"] == sha256_file(inputs["model"] / "agentforge.json")
    assert base.get_input_embeddings().weight.shape[0] == len(tokenizer)
    thinker, tok = ThinkingModel.load(result.artifacts["model"])
    assert tok.convert_tokens_to_ids([START, END]) == list(thinker.tokens)
    assert thinker.settings == MICRO.thought
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
    assert summary["table"]["parent"]["accuracy_minus_parent"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 16}
    assert len(summary["tasks"]) == MICRO.eval_pairs
    assert result.metrics["test_items"] == MICRO.eval_pairs * MICRO.test_items
    assert len(summary["thinker_losses"]) == MICRO.steps
    assert result.metrics == {
        k: v for k, v in read_metrics(out, phase="quietstar")[-1].items() if k not in ("phase", "step")
    }
    assert [len(f) for f in quietstar_figures.figures(out)] == [3, 3]
    effects = {(e["what"], e["control"]): e for e in summary["effects"]}
    assert (
        effects[("answer log-likelihood, thinking", "the equal-compute NLL control")]["value"]
        == result.metrics["thinking_minus_control_loglik"]
    )
    assert all(e["low"] <= e["value"] <= e["high"] for e in effects.values())


def test_the_control_spends_the_thinkers_counted_compute(phase):
    out, inputs, result = phase
    summary = json.loads((out / "summary.json").read_text())
    steps = result.metrics["control_steps"]
    assert steps >= 1 and len(summary["control_losses"]) == steps
    assert read_metrics(out / "train" / "control", phase="quietstar/control")[-1]["step"] == steps
    # the count follows from the thinker's training rows and batch schedule alone
    record = read_record(out)
    suite = EvalSuite(DataSpec(**record["data"]), load_model_dir(inputs["model"])[1], record["seed"])
    labels = torch.tensor(
        suite.rows(quietstar.task_items(suite, summary["tasks"], "train", MICRO.train_items))["labels"]
    )
    compute = training_compute(labels, MICRO.steps, MICRO.batch_size, record["seed"], MICRO.thought)
    assert result.metrics["thinker_compute"] == compute
    assert steps == plain_steps(compute, MICRO.batch_size, labels.shape[1])
    assert abs(result.metrics["control_compute"] - compute) <= 3 * MICRO.batch_size * labels.shape[1] / 2


def test_rerun_reuses_the_finished_phase(phase, monkeypatch):
    out, inputs, result = phase
    monkeypatch.setattr(quietstar, "train_stage", lambda *a, **k: pytest.fail("retrained a finished phase"))
    monkeypatch.setattr(quietstar, "measure_variants", lambda *a, **k: pytest.fail("measured again"))
    again = run_micro(quietstar.SPEC, inputs, out)
    assert {k: v for k, v in again.metrics.items() if k not in MEASURED} == {
        k: v for k, v in result.metrics.items() if k not in MEASURED
    }


def test_bootstrap_interval_is_paired():
    same = quietstar.interval([1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], 200, 0)
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    better = quietstar.interval([1.0] * 50, [0.0] * 50, 200, 0)
    assert better["low"] == better["high"] == 1.0


def test_thinking_with_zero_mixing_weight_scores_exactly_as_off(phase):
    """Both arms are scored alike: with the mixing head's weight at zero, the thinking scorer's
    prediction is the base prediction, so it must equal the not-thinking scorer's (which masks
    the thought tokens too)."""
    _, _, result = phase
    thinker, tokenizer = ThinkingModel.load(result.artifacts["model"])
    with torch.no_grad():
        thinker.mixing_head.net[2].bias.fill_(-1e4)  # sigmoid(-1e4) == 0: no weight on the thought
    suite = EvalSuite(DataSpec(seq_len=48, text_docs=20, task_levels=[0]), tokenizer, 0)
    items = suite.items("test", 3, ["add_small", "count_bits"])
    ids, labels = quietstar.item_rows(tokenizer, items)
    torch.manual_seed(0)
    thinking = quietstar.answer_loglik(quietstar.thinking_scorer(thinker.eval()), ids, labels, 8)
    off = quietstar.answer_loglik(quietstar.plain_scorer(thinker.base, list(thinker.tokens)), ids, labels, 8)
    assert thinking == pytest.approx(off, abs=1e-5)
    unmasked = quietstar.answer_loglik(quietstar.plain_scorer(thinker.base), ids, labels, 8)
    assert sum(unmasked) < sum(off)  # the bias the two scorers had: masking frees probability mass


def test_micro_batch_size_must_divide_the_batch():
    from agentforge.errors import ConfigError
    from agentforge.settings import from_dict

    assert from_dict(quietstar.Settings, {"batch_size": 4, "micro_batch_size": 2}, "quietstar").micro_batch_size == 2
    with pytest.raises(ConfigError, match="micro_batch_size: must divide batch_size"):
        from_dict(quietstar.Settings, {"batch_size": 4, "micro_batch_size": 3}, "quietstar")
