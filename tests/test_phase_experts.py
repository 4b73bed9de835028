"""Phase 7 end to end on the micro preset, from a Cognate trunk, from the same trunk converted to
BitLinear, and from a tiny Llama: one directory that loads as the plain base model and as the
two-pass model, a summary with the discovery, search and test comparison, figures, settings and
models refused before any work, a rerun that reuses everything, an interrupted run that resumes
without training or searching again, and two runs with one seed that write the same bytes."""

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.artifacts import MANIFEST, load_model_dir, read_manifest_files, save_model_dir, sha256_file
from agentforge.data.spec import PRESETS as DATA_PRESETS
from agentforge.errors import ConfigError
from agentforge.eval import generate_answers
from agentforge.experts import AdaptiveModel, SVDBasis, compose, load_adaptive, ternary_weights
from agentforge.experts.adaptive import EXPERTS_FILE, SPEC_FILE
from agentforge.figures import experts as experts_figures
from agentforge.nn import BitLinear, convert_to_bitnet, pack_bitnet
from agentforge.phases import experts
from agentforge.rundir import read_record
from agentforge.runtime import MEASURED
from agentforge.settings import to_dict, undeclared
from agentforge.train import read_metrics
from phase_helpers import run_micro

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a7=3 k2=9 ?k2=", "4+5=", "bits 13="]


@pytest.fixture(scope="module")
def trunk(cognate_micro):
    return cognate_micro[1].artifacts["trunk"]


@pytest.fixture(scope="module")
def on_cognate(trunk, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    return out, run_micro(experts.SPEC, {"model": trunk}, out)


def model_files(directory):
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def refuse(*args, **kwargs):
    raise AssertionError("this work was done already")


def test_directory_loads_as_the_unchanged_base_model(on_cognate, trunk):
    out, result = on_cognate
    model, tokenizer, meta = load_model_dir(result.artifacts["model"])
    base, _, _ = load_model_dir(trunk)
    [parent] = meta["parents"]
    assert meta["phase"] == "experts" and (result.artifacts["model"] / parent["path"]).resolve() == trunk.resolve()
    assert parent["sha256"] == sha256_file(trunk / MANIFEST)
    assert read_record(out)["data"] == to_dict(DATA_PRESETS["micro"])
    for key, value in base.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert {EXPERTS_FILE, SPEC_FILE, "router.safetensors"} <= set(
        json.loads((result.artifacts["model"] / "agentforge.json").read_text())["files"]
    )


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
    assert set(summary["text_perplexity"]) == {"base", *discovery["experts"]}
    counts = summary["parameter_counts"]
    assert counts["svf_z"] < counts["lora_rank1"] and result.metrics["z_parameters"] == counts["svf_z"]
    candidates = read_metrics(out, phase="experts/candidate")
    assert candidates and all(
        {"class", "alphas", "accuracy", "compute", "latency_s", "memory_bytes", "pareto"} <= set(r) for r in candidates
    )
    for row in candidates:  # the base costs only its answers; a mixture adds the building of its weights
        base = next(r for r in candidates if r["class"] == row["class"] and not any(r["alphas"]))
        assert (row["compute"] > base["compute"]) == any(row["alphas"])
    assert read_metrics(out, phase="experts")[-1]["phase_seconds"] == summary["headline"]["phase_seconds"]
    accuracy, nll = summary["effects"][0], summary["effects"][1]  # the report's first table
    assert accuracy["value"] == comparison["accuracy"]["adaptive_vs_base"]["mean"] and accuracy["better"] == "higher"
    assert nll["value"] == -comparison["answer_nll"]["adaptive_vs_base"]["mean"] and nll["better"] == "lower"
    assert nll["low"] <= nll["value"] <= nll["high"] and all("verdict" in e for e in summary["effects"])
    figures = experts_figures.figures(out)
    assert [title for title, _, _ in figures][0].startswith("Experts: held-out accuracy")


def test_rerun_reuses_everything(on_cognate, trunk, monkeypatch):
    out, result = on_cognate
    rows = len(read_metrics(out))
    files = model_files(result.artifacts["model"])
    monkeypatch.setattr(SVDBasis, "of", refuse)  # not even the SVD
    again = run_micro(experts.SPEC, {"model": trunk}, out)
    assert {k: v for k, v in again.metrics.items() if k not in MEASURED} == {
        k: v for k, v in result.metrics.items() if k not in MEASURED
    }
    assert len(read_metrics(out)) == rows and model_files(result.artifacts["model"]) == files


def test_interrupted_run_resumes_without_training_or_searching_again(on_cognate, trunk, tmp_path, monkeypatch):
    out, result = on_cognate
    copy = tmp_path / "experts"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "model")
    (copy / "steps" / "comparison.json").unlink()
    for name in ("discover_experts", "train_one_expert", "fit_router", "search_mixtures"):
        monkeypatch.setattr(experts, name, refuse)
    again = run_micro(experts.SPEC, {"model": trunk}, copy)
    # the same bytes in every file; the manifest differs only in the parent's path relative to the copy
    assert read_manifest_files(again.artifacts["model"]) == read_manifest_files(result.artifacts["model"])
    assert again.metrics["mixed_accuracy/adaptive"] == result.metrics["mixed_accuracy/adaptive"]


def test_two_runs_with_one_seed_write_the_same_model(on_cognate, trunk, tmp_path_factory):
    _, result = on_cognate
    again = run_micro(experts.SPEC, {"model": trunk}, tmp_path_factory.mktemp("experts_again"))
    assert model_files(again.artifacts["model"]) == model_files(result.artifacts["model"])


def test_settings_declare_every_value_and_nest_the_library_settings():
    from agentforge import config
    from agentforge.data import DOMAINS

    assert undeclared(experts.Settings) == []
    assert experts.PRESETS["tiny"].families == [family for families in DOMAINS.values() for family in families]
    built = config.resolve(
        [experts.SPEC], preset="micro", sets=["experts.search.population=8", "experts.train.ce_steps=5"]
    )
    assert built["experts"].search.population == 8 and built["experts"].train.ce_steps == 5
    assert built["experts"].train.rl_steps == experts.PRESETS["micro"].train.rl_steps


def test_bad_settings_fail_in_one_line_before_any_work(tmp_path, trunk, monkeypatch):
    monkeypatch.setattr(SVDBasis, "of", refuse)
    with pytest.raises(ConfigError, match="input 'model' is missing"):
        run_micro(experts.SPEC, {}, tmp_path)
    with pytest.raises(ConfigError, match=r"families: expected a list of .*got \['nope'\]"):
        run_micro(experts.SPEC, {"model": trunk}, tmp_path, families=["nope"])
    with pytest.raises(ConfigError, match=r"n_experts: expected an int in \[3, 10\]"):
        run_micro(experts.SPEC, {"model": trunk}, tmp_path, n_experts=2)
    with pytest.raises(ConfigError, match="n_experts: must be at most the number of families \\(3\\)"):
        run_micro(experts.SPEC, {"model": trunk}, tmp_path, n_experts=4)
    with pytest.raises(ConfigError, match="search.population: expected an int in \\[2, 10000\\]"):
        run_micro(experts.SPEC, {"model": trunk}, tmp_path, search={"population": 1})
    with pytest.raises(ConfigError, match="train.rl_steps: expert training needs ce_steps \\+ rl_steps > 0"):
        run_micro(experts.SPEC, {"model": trunk}, tmp_path, train={"ce_steps": 0, "rl_steps": 0})
    assert not any(tmp_path.iterdir())


def test_models_it_cannot_adapt_fail_before_the_svd(tmp_path, trunk, monkeypatch):
    model, tokenizer, _ = load_model_dir(trunk)
    monkeypatch.setattr(SVDBasis, "of", refuse)
    packed = _save_variant(pack_bitnet(convert_to_bitnet(model)), tokenizer, trunk, tmp_path / "packed")
    with pytest.raises(ConfigError, match="is packed"):
        run_micro(experts.SPEC, {"model": packed}, tmp_path / "out")
    no_tokenizer = _save_variant(load_model_dir(trunk)[0], None, trunk, tmp_path / "bare")
    with pytest.raises(ConfigError, match="has no tokenizer"):
        run_micro(experts.SPEC, {"model": no_tokenizer}, tmp_path / "out")


def _save_variant(model, tokenizer, trunk, path):
    save_model_dir(model, tokenizer, path, {"phase": "test", "parents": [str(trunk)]})
    return path


def test_bitlinear_model_keeps_latent_layers_and_deployable_experts(trunk, tmp_path):
    model, tokenizer, _ = load_model_dir(trunk)
    source = _save_variant(convert_to_bitnet(model), tokenizer, trunk, tmp_path / "bitnet")
    result = run_micro(experts.SPEC, {"model": source}, tmp_path / "out")
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
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    source = _save_variant(llama, tokenizer, trunk, tmp_path / "llama")
    result = run_micro(experts.SPEC, {"model": source}, tmp_path / "out")
    adaptive, tokenizer, _ = load_adaptive(result.artifacts["model"])
    assert isinstance(adaptive.model, LlamaForCausalLM)
    assert len(generate_answers(adaptive, tokenizer, PROMPTS, max_new_tokens=3)) == 3


def test_loader_refuses_experts_of_other_weights(on_cognate, tmp_path):
    from agentforge.artifacts import CorruptArtifact

    _, result = on_cognate
    copy = tmp_path / "copy"
    shutil.copytree(result.artifacts["model"], copy)
    (copy / SPEC_FILE).write_text((copy / SPEC_FILE).read_text().replace('"format": 1', '"format": 9'))
    with pytest.raises(CorruptArtifact, match="changed since it was written"):
        load_adaptive(copy)
    with pytest.raises(CorruptArtifact, match="format 9"):
        load_adaptive(copy, verify=False)
