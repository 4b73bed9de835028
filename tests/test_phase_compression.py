"""Phase 8 end to end on the micro preset: a converted micro Cognate (and a tiny Llama) compressed
into one container, gated, reported and reloaded; the rollback ladder when the gate cannot pass."""
import copy
import dataclasses
import json

import pytest
import torch

from agentforge.artifacts import load_model_dir, save_model_dir
from agentforge.compress import load, read_container
from agentforge.nn import convert_to_bitnet, pack_bitnet
from agentforge.phases import PhaseContext, compression
from agentforge.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def bitnet_dirs(model, tokenizer, metadata, root):
    """(latent dir, packed dir) of ``model`` converted to BitNet, as phase 4 hands them over."""
    convert_to_bitnet(model)
    latent, packed = root / "latent", root / "packed"
    meta = {"phase": "experts", "parents": [], "data": metadata.get("data", {})}
    save_model_dir(model, tokenizer, latent, meta)
    save_model_dir(pack_bitnet(copy.deepcopy(model)), tokenizer, packed, meta)
    return latent, packed


@pytest.fixture(scope="module")
def phase_run(cognate_micro, tmp_path_factory):
    root = tmp_path_factory.mktemp("compression")
    model, tokenizer, metadata = load_model_dir(cognate_micro[1].artifacts["trunk"])
    latent, packed = bitnet_dirs(model, tokenizer, metadata, root)
    inputs = {"model": latent, "packed": packed}
    lines = []
    ctx = PhaseContext(out_dir=root / "phase", progress=False, wandb_mode="disabled", say=lines.append)
    return inputs, ctx, compression.run(inputs, compression.PRESETS["micro"], ctx), lines


def test_micro_phase_writes_a_gated_artifact_with_exact_accounting(phase_run):
    inputs, ctx, result, lines = phase_run
    artifact = result.artifacts["artifact"]
    summary = json.loads((ctx.out_dir / "summary.json").read_text())
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
    assert any("attempt 0" in line for line in lines)


def test_micro_artifact_loads_and_generates(phase_run):
    _, _, result, _ = phase_run
    model, tokenizer, metadata = load(result.artifacts["artifact"])
    assert metadata["phase"] == "compression" and len(metadata["parents"]) == 2
    ids = tokenizer("1+2=", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_micro_phase_metrics_and_figures(phase_run):
    _, ctx, result, _ = phase_run
    assert read_metrics(ctx.out_dir, phase="compression")[-1]["artifact_bytes"] == result.metrics["artifact_bytes"]
    assert len(read_metrics(ctx.out_dir, phase="compression/tensor")) == len(read_container(result.artifacts["artifact"]).tensors)
    figures = compression.figures(ctx.out_dir)
    assert [title.split(":")[0] for title, _, _ in figures] == ["Compression"] * 3


def test_rerun_reuses_the_verified_artifact(phase_run):
    inputs, ctx, result, _ = phase_run
    before = result.artifacts["artifact"].read_bytes()
    lines = []
    again = compression.run(inputs, compression.PRESETS["micro"], dataclasses.replace(ctx, say=lines.append))
    assert lines == ["compression: reusing the verified artifact of a previous run"]
    assert again.metrics == result.metrics and result.artifacts["artifact"].read_bytes() == before


def test_failing_gate_climbs_the_ladder_on_a_tiny_llama(cognate_micro, tmp_path):
    """An impossible gate (perplexity below half the model's) on a Llama with an untied LM head:
    each attempt raises the most damaging tensor one rung, and the artifact is still written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer, metadata = load_model_dir(cognate_micro[1].artifacts["trunk"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    latent, packed = bitnet_dirs(LlamaForCausalLM(config), tokenizer, metadata, tmp_path)
    settings = dataclasses.replace(compression.PRESETS["micro"], max_perplexity_ratio=0.5, max_rollbacks=2,
                                   kd_steps=0, sweep_budgets=[4.25])
    ctx = PhaseContext(out_dir=tmp_path / "phase", progress=False, wandb_mode="disabled", say=lambda _: None)
    compression.run({"model": latent, "packed": packed}, settings, ctx)
    summary = json.loads((ctx.out_dir / "summary.json").read_text())
    attempts = summary["attempts"]
    assert len(attempts) == 3 and not summary["gate_passed"]
    for earlier, later in zip(attempts, attempts[1:]):
        rollback = earlier["rollback"]
        assert later["choices"][rollback["tensor"]] == rollback["now"] != rollback["dropped"]
        assert rollback["damage"][rollback["tensor"]] == max(rollback["damage"].values())
    assert {t["group"] for t in summary["tensors"]} == {"ternary", "embedding", "lm_head", "rest"}


def test_bad_inputs_fail_before_any_work(tmp_path):
    ctx = PhaseContext(out_dir=tmp_path / "phase", progress=False, say=lambda _: None)
    with pytest.raises(ValueError, match="input 'packed' must be a model directory"):
        compression.run({"model": tmp_path}, compression.PRESETS["micro"], ctx)
