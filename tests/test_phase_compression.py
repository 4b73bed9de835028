"""Phase 8 end to end on the micro preset: a converted micro Cognate (and a tiny Llama) compressed
into one container, gated, reported and reloaded; the rollback ladder when the gate cannot pass;
reruns that reuse the memoised steps, and a damaged artifact rebuilt byte for byte."""

import copy
import json
import shutil

import pytest
import torch

from agentforge.artifacts import MANIFEST, load_model_dir, save_model_dir, sha256_file
from agentforge.compress import load, read_container
from agentforge.errors import ConfigError
from agentforge.figures import compression as compression_figures
from agentforge.nn import convert_to_bitnet, pack_bitnet
from agentforge.phases import compression
from agentforge.runtime import MEASURED
from agentforge.settings import undeclared
from agentforge.train import read_metrics
from phase_helpers import run_micro

pytestmark = pytest.mark.usefixtures("one_thread")


def bitnet_dirs(model, tokenizer, root):
    """(latent dir, packed dir) of ``model`` converted to BitNet, as phases 7 and 4 hand them over."""
    convert_to_bitnet(model)
    latent, packed = root / "latent", root / "packed"
    meta = {"phase": "experts", "parents": []}
    save_model_dir(model, tokenizer, latent, meta)
    save_model_dir(pack_bitnet(copy.deepcopy(model)), tokenizer, packed, meta)
    return latent, packed


@pytest.fixture(scope="module")
def phase_run(cognate_micro, tmp_path_factory):
    root = tmp_path_factory.mktemp("compression")
    model, tokenizer, _ = load_model_dir(cognate_micro[1].artifacts["trunk"])
    latent, packed = bitnet_dirs(model, tokenizer, root)
    inputs = {"model": latent, "packed": packed}
    return root / "phase", inputs, run_micro(compression.SPEC, inputs, root / "phase")


def test_micro_phase_writes_a_gated_artifact_with_exact_accounting(phase_run):
    out, _, result = phase_run
    artifact = result.artifacts["artifact"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bytes"]["total"] == artifact.stat().st_size == result.metrics["artifact_bytes"]
    groups = summary["bytes"]["groups"]
    assert 1.5 < groups["ternary"]["bits_per_weight"] < 2.1 and groups["embedding"]["bits_per_weight"] <= 4.25 + 1e-9
    assert summary["reference_bytes"]["fp32"] > 8 * summary["bytes"]["total"]  # a ternary model and a 4-bit embedding
    assert summary["gate_passed"] and result.metrics["perplexity_ratio"] <= 1.1
    assert [row["budget"] for row in summary["sweep"]] == compression.PRESETS["micro"].sweep_budgets
    assert summary["sweep"][0]["bytes"] < summary["sweep"][-1]["bytes"]
    tensors = {t["tensor"]: t for t in summary["tensors"]}
    assert tensors["model.embed_tokens.weight"]["names"] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert all(t["codec"].startswith("ternary-") for t in summary["tensors"] if t["group"] == "ternary")
    assert summary["decompression_seconds"] > 0 and summary["tokens_per_s"]["compressed"] > 0
    assert any("attempt 0" in line for line in (out / "progress.log").read_text().splitlines())


def test_micro_artifact_loads_generates_and_names_its_parents_relatively(phase_run):
    out, inputs, result = phase_run
    artifact = result.artifacts["artifact"]
    model, tokenizer, metadata = load(artifact)
    assert metadata["phase"] == "compression" and len(metadata["parents"]) == 2
    for parent, name in zip(metadata["parents"], ("model", "packed")):
        assert not parent["path"].startswith("/") and parent["sha256"] == sha256_file(inputs[name] / MANIFEST)
        assert (artifact / parent["path"]).resolve() == inputs[name].resolve()
    assert str(out) not in json.dumps(read_container(artifact).metadata)
    ids = tokenizer("1+2=", return_tensors="pt")["input_ids"]
    generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]


def test_micro_phase_metrics_and_figures(phase_run):
    out, _, result = phase_run
    headline = read_metrics(out, phase="compression")[-1]
    assert headline["artifact_bytes"] == result.metrics["artifact_bytes"]
    assert result.metrics == {k: v for k, v in headline.items() if k not in ("phase", "step")}
    assert len(read_metrics(out, phase="compression/tensor")) == len(
        read_container(result.artifacts["artifact"]).tensors
    )
    assert len(read_metrics(out, phase="compression/sweep")) == len(compression.PRESETS["micro"].sweep_budgets)
    assert len(read_metrics(out, phase="compression/attempt")) == result.metrics["rollbacks"] + 1
    figures = compression_figures.figures(out)
    assert [title.split(":")[0] for title, _, _ in figures] == ["Compression"] * 3


def refuse(what):
    def refused(*args, **kwargs):
        raise AssertionError(f"a rerun must not {what} again")

    return refused


def test_rerun_reuses_every_step(phase_run, monkeypatch):
    out, inputs, result = phase_run
    before = result.artifacts["artifact"].read_bytes()
    for name, what in (
        ("encode_plan", "encode"),
        ("ladder", "climb the ladder"),
        ("sweep", "sweep"),
        ("measure", "measure"),
        ("final_report", "report"),
    ):
        monkeypatch.setattr(compression, name, refuse(what))
    again = run_micro(compression.SPEC, inputs, out)
    assert {k: v for k, v in again.metrics.items() if k not in MEASURED} == {
        k: v for k, v in result.metrics.items() if k not in MEASURED
    }
    assert again.artifacts["artifact"].read_bytes() == before


def test_a_damaged_artifact_is_rebuilt_byte_for_byte_from_the_saved_plan(phase_run, monkeypatch):
    out, inputs, result = phase_run
    copied = out.with_name("phase-copy")  # beside the original: the parents' relative paths are the same
    shutil.copytree(out, copied)
    artifact = copied / "model.afz"
    artifact.write_bytes(artifact.read_bytes()[:-10])
    monkeypatch.setattr(compression, "encode_plan", refuse("encode"))
    again = run_micro(compression.SPEC, inputs, copied)
    assert artifact.read_bytes() == result.artifacts["artifact"].read_bytes()
    assert again.metrics["artifact_bytes"] == result.metrics["artifact_bytes"]
    assert "model.afz is missing or changed" in (copied / "progress.log").read_text()


def test_two_runs_with_the_same_seed_write_the_same_artifact(phase_run):
    out, inputs, result = phase_run
    again = run_micro(compression.SPEC, inputs, out.with_name("phase-again"))  # beside it: same relative parents
    assert again.artifacts["artifact"].read_bytes() == result.artifacts["artifact"].read_bytes()


def test_failing_gate_climbs_the_ladder_on_a_tiny_llama(cognate_micro, tmp_path):
    """An impossible gate (perplexity below half the model's) on a Llama with an untied LM head:
    each attempt raises the most damaging tensor one rung, and the artifact is still written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer, _ = load_model_dir(cognate_micro[1].artifacts["trunk"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    latent, packed = bitnet_dirs(LlamaForCausalLM(config), tokenizer, tmp_path)
    result = run_micro(
        compression.SPEC,
        {"model": latent, "packed": packed},
        tmp_path / "phase",
        max_perplexity_ratio=0.5,
        max_rollbacks=2,
        kd_steps=0,
        sweep_budgets=[4.25],
    )
    summary = json.loads((tmp_path / "phase" / "summary.json").read_text())
    attempts = summary["attempts"]
    assert len(attempts) == 3 and not summary["gate_passed"] and result.artifacts["artifact"].is_file()
    for earlier, later in zip(attempts, attempts[1:]):
        rollback = earlier["rollback"]
        assert later["choices"][rollback["tensor"]] == rollback["now"] != rollback["dropped"]
        assert rollback["damage"][rollback["tensor"]] == max(rollback["damage"].values())
    assert {t["group"] for t in summary["tensors"]} == {"ternary", "embedding", "lm_head", "rest"}


def test_bad_inputs_fail_before_any_work(phase_run, tmp_path):
    _, inputs, _ = phase_run
    with pytest.raises(ConfigError, match="input 'packed' is missing"):
        run_micro(compression.SPEC, {"model": inputs["model"]}, tmp_path / "a")
    not_a_dir = tmp_path / "packed.bin"
    not_a_dir.write_bytes(b"x")
    with pytest.raises(ConfigError, match="input 'packed' must be a model directory"):
        run_micro(compression.SPEC, {"model": inputs["model"], "packed": not_a_dir}, tmp_path / "b")
    assert not (tmp_path / "b" / "steps").exists()


def test_settings_declare_every_value():
    assert undeclared(compression.Settings) == []
    with pytest.raises(ConfigError, match="candidates"):
        compression.Settings(candidates=["rtn4", "zip"])
    with pytest.raises(ConfigError, match="bits_budget"):
        compression.Settings(bits_budget=0.0)
