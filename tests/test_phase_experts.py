"""Phase 7 end to end on the micro preset, from a Cognate trunk, from the same trunk converted to
BitLinear, and from a tiny Llama: one directory that loads as the plain base model and as the
two-pass model, a summary with the discovery, search and test comparison, figures, and a rerun
that reuses everything."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.artifacts import load_model_dir, read_metadata, save_model_dir
from agentforge.eval import generate_answers
from agentforge.experts import AdaptiveModel, compose, load_adaptive, ternary_weights
from agentforge.experts.adaptive import EXPERTS_FILE, SPEC_FILE
from agentforge.nn import BitLinear, convert_to_bitnet
from agentforge.phases import PhaseContext, experts
from agentforge.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a7=3 k2=9 ?k2=", "4+5=", "bits 13="]


def quiet(out, seed=0):
    return PhaseContext(out_dir=out, seed=seed, progress=False, say=lambda _: None)


@pytest.fixture(scope="module")
def trunk(cognate_micro):
    return cognate_micro[1].artifacts["trunk"]


@pytest.fixture(scope="module")
def on_cognate(trunk, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    return out, experts.run({"model": trunk}, experts.PRESETS["micro"], quiet(out))


def test_directory_loads_as_the_unchanged_base_model(on_cognate, trunk):
    _, result = on_cognate
    model, tokenizer, meta = load_model_dir(result.artifacts["model"])
    base, _, base_meta = load_model_dir(trunk)
    assert meta["phase"] == "experts" and meta["parents"] == [str(trunk)] and meta["data"] == base_meta["data"]
    for key, value in base.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert {EXPERTS_FILE, SPEC_FILE, "router.safetensors"} <= set(json.loads(
        (result.artifacts["model"] / "agentforge.json").read_text())["files"])


def test_two_pass_model_routes_and_generates(on_cognate):
    _, result = on_cognate
    adaptive, tokenizer, _ = load_adaptive(result.artifacts["model"])
    assert isinstance(adaptive, AdaptiveModel) and len(adaptive.expert_names) == 3
    answers = generate_answers(adaptive, tokenizer, PROMPTS, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert set(adaptive.last_routes) <= set(adaptive.router.classes) and len(adaptive.last_routes) == 3
    # pass two is the base model under the routed class's mixture: check one row by hand
    cls = adaptive.last_routes[0]
    with torch.no_grad():
        from agentforge.experts import installed
        with installed(adaptive.model, adaptive.adapted_weights(adaptive.mixtures[cls])):
            direct = generate_answers(adaptive.model, tokenizer, PROMPTS[:1], max_new_tokens=4)
    assert direct[0] == generate_answers(adaptive, tokenizer, PROMPTS[:1], max_new_tokens=4)[0]


def test_summary_records_discovery_search_and_comparison(on_cognate):
    out, result = on_cognate
    summary = json.loads((out / "summary.json").read_text())
    discovery = summary["discovery"]
    assert len(discovery["experts"]) == 3 and len(discovery["similarity"]) == len(discovery["families"])
    comparison = summary["comparison"]
    for metric in ("accuracy", "answer_nll"):
        assert set(comparison[metric]["mixed"]) == {"base", "adaptive", *discovery["experts"]}
        assert set(comparison[metric]["expert_gain_on_own_domain"]) == set(discovery["experts"])
        for gain in comparison[metric]["expert_gain_on_own_domain"].values():
            assert gain["low"] <= gain["mean"] <= gain["high"]
    assert comparison["answer_nll"]["mixed"]["base"]["mean"] > 0
    assert 0 <= comparison["router_test_accuracy"] <= 1
    counts = summary["parameter_counts"]
    assert counts["svf_z"] < counts["lora_rank1"] and result.metrics["z_parameters"] == counts["svf_z"]
    candidates = read_metrics(out, phase="experts/candidate")
    assert candidates and all({"class", "alphas", "accuracy", "latency_s", "memory_bytes", "pareto"} <= set(r)
                              for r in candidates)
    assert read_metrics(out, phase="experts")[-1]["phase_seconds"] == summary["phase_seconds"]
    figures = experts.figures(out)
    assert [title for title, _, _ in figures][0].startswith("Experts: held-out accuracy")


def test_rerun_reuses_the_finished_directory(on_cognate, trunk):
    out, result = on_cognate
    rows = len(read_metrics(out))
    again = experts.run({"model": trunk}, experts.PRESETS["micro"], quiet(out))
    assert again.metrics == result.metrics and len(read_metrics(out)) == rows


def test_bad_inputs_fail_in_one_line(tmp_path, trunk):
    with pytest.raises(ValueError, match="needs inputs\\['model'\\]"):
        experts.run({}, experts.PRESETS["micro"], quiet(tmp_path))
    settings = experts.Settings(**{**experts.PRESETS["micro"].__dict__, "families": ["nope"]})
    with pytest.raises(ValueError, match="unknown task families"):
        experts.run({"model": trunk}, settings, quiet(tmp_path))
    with pytest.raises(ValueError, match="n_experts must be in"):
        experts.run({"model": trunk}, experts.Settings(**{**experts.PRESETS["micro"].__dict__, "n_experts": 2}),
                    quiet(tmp_path))


def _save_variant(model, tokenizer, trunk, path):
    save_model_dir(model, tokenizer, path, {"phase": "test", "parents": [str(trunk)],
                                            "data": read_metadata(trunk).get("data")})
    return path


def test_bitlinear_model_keeps_latent_layers_and_deployable_experts(trunk, tmp_path):
    model, tokenizer, _ = load_model_dir(trunk)
    source = _save_variant(convert_to_bitnet(model), tokenizer, trunk, tmp_path / "bitnet")
    result = experts.run({"model": source}, experts.PRESETS["micro"], quiet(tmp_path / "out"))
    adaptive, tokenizer, _ = load_adaptive(result.artifacts["model"])
    layers = [adaptive.model.get_submodule(n) for n in adaptive.basis.names]
    assert all(isinstance(m, BitLinear) and m.state == "training" for m in layers)
    z = compose(adaptive.experts, [1.0] * len(adaptive.experts))
    packed = ternary_weights(adaptive.basis, z)
    assert set(packed) == set(adaptive.basis.names)
    assert len(generate_answers(adaptive, tokenizer, PROMPTS, max_new_tokens=3)) == 3


def test_runs_on_a_tiny_llama(trunk, tmp_path):
    _, tokenizer, _ = load_model_dir(trunk)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    source = _save_variant(llama, tokenizer, trunk, tmp_path / "llama")
    result = experts.run({"model": source}, experts.PRESETS["micro"], quiet(tmp_path / "out"))
    adaptive, tokenizer, _ = load_adaptive(result.artifacts["model"])
    assert isinstance(adaptive.model, LlamaForCausalLM)
    assert len(generate_answers(adaptive, tokenizer, PROMPTS, max_new_tokens=3)) == 3


def test_loader_refuses_experts_of_other_weights(on_cognate, tmp_path):
    import shutil

    from agentforge.artifacts import CorruptArtifact

    _, result = on_cognate
    copy = tmp_path / "copy"
    shutil.copytree(result.artifacts["model"], copy)
    (copy / SPEC_FILE).write_text((copy / SPEC_FILE).read_text().replace('"format": 1', '"format": 9'))
    with pytest.raises(CorruptArtifact, match="changed since it was written"):
        load_adaptive(copy)
    with pytest.raises(CorruptArtifact, match="format 9"):
        load_adaptive(copy, verify=False)
