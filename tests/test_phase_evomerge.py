"""Phase 2 end to end on the micro preset, on Cognate siblings and on three fine-tuned variants
of a tiny Llama: a champion that reloads, the full history in metrics.jsonl, the final
comparison on data selection never saw, and a rerun that re-evaluates nothing."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.artifacts import load_model_dir, save_model_dir
from agentforge.data import DOMAINS, load_text, make_split, pack_tasks, train_tokenizer
from agentforge.phases import PhaseContext, evomerge
from agentforge.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(out, seed=0):
    return PhaseContext(out_dir=out, seed=seed, progress=False, say=lambda _: None)


@pytest.fixture(scope="module")
def on_cognate(cognate_micro, tmp_path_factory):
    src, cognate_result = cognate_micro
    out = tmp_path_factory.mktemp("evomerge")
    inputs = {"trunk": cognate_result.artifacts["trunk"], "siblings": cognate_result.artifacts["siblings"]}
    return out, inputs, evomerge.run(inputs, evomerge.PRESETS["micro"], quiet(out))


def test_champion_reloads_with_its_recipe(on_cognate):
    out, inputs, result = on_cognate
    model, tokenizer, meta = load_model_dir(result.artifacts["champion"])
    summary = json.loads((out / "summary.json").read_text())
    assert meta["recipe"] == summary["champion_recipe"] and meta["base"] == str(inputs["trunk"])
    assert meta["recipe"]["method"] in evomerge.PRESETS["micro"].methods
    assert tokenizer is not None and torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_history_and_final_comparison_are_recorded(on_cognate):
    out, _, result = on_cognate
    candidates = read_metrics(out, phase="evomerge/candidate")
    generations = read_metrics(out, phase="evomerge/generation")
    summary = json.loads((out / "summary.json").read_text())
    assert len(candidates) == summary["evaluations"] and len(generations) == summary["generations"] == 2
    assert all({"recipe", "fitness", "perplexity", "accuracy/reasoning", "answer_nll/memory"} <= set(r)
               for r in candidates)
    assert summary["champion_selection_fitness"] == max(r["fitness"] for r in candidates)
    assert set(summary["final_fitness"]) == {"champion", "parent_0", "parent_1", "parent_2"}
    assert summary["margin_over_best_parent"] == pytest.approx(
        summary["final_fitness"]["champion"] - summary["final_fitness"][summary["best_parent"]])
    assert set(summary["ablation"]) == set(evomerge.PRESETS["micro"].methods)
    assert result.metrics["margin_over_best_parent"] == summary["margin_over_best_parent"]


def test_rerun_replays_the_search_without_evaluating(on_cognate, monkeypatch):
    out, inputs, _ = on_cognate
    before = len(read_metrics(out, phase="evomerge/candidate"))
    evomerge.run(inputs, evomerge.PRESETS["micro"], quiet(out))
    assert len(read_metrics(out, phase="evomerge/candidate")) == before


def test_selection_and_final_data_do_not_overlap(cognate_micro):
    from agentforge.artifacts import read_metadata

    _, result = cognate_micro
    model, tokenizer, meta = load_model_dir(result.artifacts["trunk"])
    settings = evomerge.PRESETS["micro"]
    data = evomerge._data_settings(settings, meta)
    selection, final = evomerge.build_held_out(tokenizer, settings, data, seed=0)
    for domain in DOMAINS:
        assert not {i.prompt for i in selection.items[domain]} & {i.prompt for i in final.items[domain]}
    assert not {tuple(r) for r in selection.text["input_ids"]} & {tuple(r) for r in final.text["input_ids"]}


@pytest.fixture(scope="module")
def llama_variants(tmp_path_factory):
    """A tiny Llama base and three copies fine-tuned on different task domains."""
    root = tmp_path_factory.mktemp("llamas")
    tokenizer = train_tokenizer(load_text("stdlib", max_docs=20), 384)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    base = LlamaForCausalLM(config)
    save_model_dir(base, tokenizer, root / "base", {"role": "base"})
    variants = []
    for domain, families in DOMAINS.items():
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        rows = pack_tasks(tokenizer, [it for f in families for it in make_split(f, "train", 40, seed=0, level=0)],
                          48, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for start in list(range(0, len(rows), 8)) * 3:
            batch = rows[start:start + 8]
            loss = model(input_ids=torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["labels"])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        save_model_dir(model, tokenizer, root / domain, {"role": "variant", "domain": domain})
        variants.append(root / domain)
    return {"trunk": root / "base", "siblings": variants}


def test_works_on_fine_tuned_llama_variants(llama_variants, tmp_path):
    result = evomerge.run(llama_variants, evomerge.PRESETS["micro"], quiet(tmp_path))
    model, _, meta = load_model_dir(result.artifacts["champion"])
    assert isinstance(model, LlamaForCausalLM)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"]["seq_len"] == evomerge.PRESETS["micro"].seq_len  # no Cognate metadata: own settings
    if meta["recipe"]["method"] == "dfs":
        assert model.config.num_hidden_layers == len(meta["recipe"]["path"])
