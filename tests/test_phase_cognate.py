"""Phase 1 end to end on the micro preset: four model directories that reload, three siblings with
identical shapes and their own behaviour, a complete summary, and a rerun that reuses them."""

import dataclasses
import json

import pytest
import torch

from agentforge.artifacts import load_model_dir, sha256_file
from agentforge.data.spec import PRESETS as DATA_PRESETS
from agentforge.data.spec import read_data_spec
from agentforge.phases import cognate
from agentforge.settings import from_dict
from phase_helpers import run_micro

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phase_dir(cognate_micro):
    return cognate_micro


def test_writes_trunk_and_three_siblings_that_reload(phase_dir):
    out, result = phase_dir
    assert result.artifacts == {
        "trunk": out / "trunk",
        "siblings": [out / n for n in cognate.SIBLINGS],
        "data": out / "data.json",
    }
    assert read_data_spec(out / "data.json") == (DATA_PRESETS["micro"], 0)
    trunk, tokenizer, meta = load_model_dir(out / "trunk")
    assert meta["role"] == "trunk" and tokenizer.eos_token_id == trunk.config.eos_token_id
    shapes = {k: v.shape for k, v in trunk.state_dict().items()}
    for name, (domain, behaviour) in cognate.SIBLINGS.items():
        model, tok, meta = load_model_dir(out / name)
        assert {k: meta[k] for k in ("phase", "step", "role", "domain", "behaviour")} == {
            "phase": "cognate",
            "step": name,
            "role": "sibling",
            "domain": domain,
            "behaviour": behaviour,
        }
        [parent] = meta["parents"]
        assert parent["path"] == "../trunk" and parent["sha256"] == sha256_file(out / "trunk" / "agentforge.json")
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        assert all(getattr(model.config, key) == value for key, value in behaviour.items())
        assert not torch.equal(model.model.embed_tokens.weight, trunk.model.embed_tokens.weight)  # it trained
        assert tok.get_vocab() == tokenizer.get_vocab()


def test_summary_reports_every_measurement(phase_dir):
    out, result = phase_dir
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identical_shapes"] is True
    assert set(summary["models"]) == {"trunk", *cognate.SIBLINGS}
    for report in summary["models"].values():
        assert report["perplexity"] > 1 and report["tokens_per_s"] > 0 and report["forward_tokens_per_s"] > 0
        assert 1 <= report["act_steps"] <= 4
        assert set(report["accuracy"]) == set(report["answer_nll"]) == {"reasoning", "memory", "speed"}
    assert summary["models"]["speed"]["act_steps"] <= 2  # its cap
    assert set(summary["specialisation"]) == set(cognate.SIBLINGS)
    assert result.metrics["trunk/perplexity"] == summary["models"]["trunk"]["perplexity"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["phase"] == "cognate" and rows[-1]["unigram_perplexity"] == summary["unigram_perplexity"]
    assert (out / "train" / "trunk" / "checkpoint").is_dir()


def test_rerun_reuses_finished_models(phase_dir, monkeypatch):
    out, _ = phase_dir
    before = {name: (out / name / "model.safetensors").stat().st_mtime_ns for name in ("trunk", *cognate.SIBLINGS)}
    monkeypatch.setattr(cognate, "train_stage", lambda *a, **k: pytest.fail("a finished model was retrained"))
    run_micro(cognate.SPEC, {}, out)
    assert before == {name: (out / name / "model.safetensors").stat().st_mtime_ns for name in before}


def test_settings_are_validated():
    base = dataclasses.asdict(cognate.PRESETS["micro"])
    with pytest.raises(ValueError, match=r"cognate: unknown setting 'trunk_stepz'; allowed: model_preset, "):
        from_dict(cognate.Settings, {**base, "trunk_stepz": 3}, "cognate")
    with pytest.raises(ValueError, match=r"cognate.trunk_steps: expected an int in \[1, 10000000\], got 'many'"):
        from_dict(cognate.Settings, {**base, "trunk_steps": "many"}, "cognate")
    with pytest.raises(ValueError, match=r"cognate.vocab_size: expected an int in \[258, 65536\], got 1000000000"):
        from_dict(cognate.Settings, {**base, "vocab_size": 10**9}, "cognate")
