"""Phase 2 end to end on the micro preset, on Cognate siblings and on three fine-tuned variants
of a tiny Llama: a champion that reloads with its recipe and lineage, the full history in
metrics.jsonl, the final comparison on data selection never saw, a rerun that re-evaluates
nothing, and two runs with one seed that write byte-identical champions."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.artifacts import load_model_dir, read_metadata, save_model_dir, sha256_file
from agentforge.data import DOMAINS, load_text, make_split, pack_tasks, train_tokenizer
from agentforge.data.spec import PRESETS as DATA_PRESETS
from agentforge.eval import EvalSuite
from agentforge.figures import evomerge as evomerge_figures
from agentforge.merge import evolve
from agentforge.merge.compute import flops_per_token
from agentforge.phases import evomerge
from agentforge.rundir import read_record
from agentforge.train import read_metrics
from phase_helpers import run_micro

pytestmark = pytest.mark.usefixtures("one_thread")
MICRO = evomerge.PRESETS["micro"]


def cognate_inputs(cognate_micro):
    _, cognate_result = cognate_micro
    return {"trunk": cognate_result.artifacts["trunk"], "siblings": cognate_result.artifacts["siblings"]}


@pytest.fixture(scope="module")
def on_cognate(cognate_micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("evomerge")
    inputs = cognate_inputs(cognate_micro)
    return out, inputs, run_micro(evomerge.SPEC, inputs, out)


def test_champion_reloads_with_its_recipe_and_lineage(on_cognate):
    out, inputs, result = on_cognate
    champion = result.artifacts["champion"]
    model, tokenizer, meta = load_model_dir(champion)
    summary = json.loads((out / "summary.json").read_text())
    assert meta["recipe"] == summary["champion_recipe"] and meta["recipe"]["method"] in MICRO.methods
    assert [(champion / p["path"]).resolve() for p in meta["parents"]] == [s.resolve() for s in inputs["siblings"]]
    assert (champion / meta["base"]["path"]).resolve() == inputs["trunk"].resolve()
    assert meta["base"]["sha256"] == sha256_file(inputs["trunk"] / "agentforge.json")
    assert str(out.parent) not in json.dumps(meta)  # no absolute path: the run directory can move
    assert tokenizer is not None and torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_history_and_final_comparison_are_recorded(on_cognate):
    out, _, result = on_cognate
    candidates = read_metrics(out, phase="evomerge/candidate")
    generations = read_metrics(out, phase="evomerge/generation")
    summary = json.loads((out / "summary.json").read_text())
    assert len(candidates) == summary["evaluations"] and len(generations) == summary["generations"] == 2
    assert all(
        {
            "recipe",
            "fitness",
            "perplexity",
            "accuracy/reasoning",
            "answer_nll/memory",
            "flops_per_token",
            "parameter_bytes",
        }
        <= set(r)
        for r in candidates
    )
    assert not any("tokens_per_s" in key for r in candidates for key in r)  # nothing timed is selected on
    assert summary["champion_selection_fitness"] == max(r["fitness"] for r in candidates)
    assert set(summary["final_fitness"]) == {"champion", "parent_0", "parent_1", "parent_2"}
    assert all(r["tokens_per_s"] > 0 for r in summary["final_reports"].values())  # reported only
    assert summary["margin_over_best_parent"] == pytest.approx(
        summary["final_fitness"]["champion"] - summary["final_fitness"][summary["best_parent"]]
    )
    assert set(summary["ablation"]) == set(MICRO.methods)
    assert result.metrics["margin_over_best_parent"] == summary["margin_over_best_parent"]
    titles = [title for title, _, _ in evomerge_figures.figures(out)]
    assert titles == [
        "EvoMerge fitness per generation",
        "EvoMerge: each method's best recipe vs the champion (test split)",
    ]


def test_fitness_counts_compute_not_time(on_cognate):
    out, _, _ = on_cognate
    summary = json.loads((out / "summary.json").read_text())
    reports = summary["final_reports"]
    reference = evomerge.reference_costs([reports[f"parent_{i}"] for i in range(3)])
    slower = {**reports["champion"], "tokens_per_s": reports["champion"]["tokens_per_s"] / 100}
    assert evomerge.fitness(slower, reference, MICRO) == summary["final_fitness"]["champion"]
    heavier = {**reports["champion"], "flops_per_token": reports["champion"]["flops_per_token"] * 2}
    assert evomerge.fitness(heavier, reference, MICRO) == pytest.approx(
        summary["final_fitness"]["champion"] - MICRO.w_compute * math.log(2)
    )
    champion = load_model_dir(out / "champion")[0]
    assert reports["champion"]["flops_per_token"] == flops_per_token(champion)


def test_rerun_replays_the_search_without_evaluating(on_cognate, monkeypatch):
    out, inputs, result = on_cognate
    before = read_metrics(out, phase="evomerge/candidate")
    manifest = (result.artifacts["champion"] / "agentforge.json").read_text()

    def no_measuring(*args, **kwargs):
        raise AssertionError("a rerun must not evaluate again")

    monkeypatch.setattr(evomerge, "measure", no_measuring)
    again = run_micro(evomerge.SPEC, inputs, out)
    assert read_metrics(out, phase="evomerge/candidate") == before
    assert again.metrics["champion_final_fitness"] == result.metrics["champion_final_fitness"]
    assert (result.artifacts["champion"] / "agentforge.json").read_text() == manifest


def test_a_search_cut_short_resumes_after_its_last_finished_generation(on_cognate, tmp_path, monkeypatch):
    out, inputs, _ = on_cognate
    cut = tmp_path / "evomerge"
    shutil.copytree(out, cut)
    for step in [
        *(cut / "steps").glob("generation_01_*"),
        cut / "steps" / "test_split.json",
        cut / "steps" / "ablation.json",
    ]:
        step.unlink()
    shutil.rmtree(cut / "champion")
    measured, measure = [], evomerge.measure
    monkeypatch.setattr(evomerge, "measure", lambda *args, **kwargs: measured.append(1) or measure(*args, **kwargs))
    run_micro(evomerge.SPEC, inputs, cut)
    second = [r for r in read_metrics(out, phase="evomerge/candidate") if r["generation"] == 1]
    # generation 1 again, then the champion and three parents on the test split, then each method's
    # default and best recipe (once where they are one recipe)
    table = json.loads((out / "steps" / "ablation.json").read_text())["value"]
    distinct = sum(1 if row["best_is_default"] else 2 for row in table.values())
    assert len(measured) == len(second) + 4 + distinct
    assert read_metrics(cut, phase="evomerge/candidate") == read_metrics(out, phase="evomerge/candidate")
    assert (cut / "champion" / "model.safetensors").read_bytes() == (
        out / "champion" / "model.safetensors"
    ).read_bytes()


def test_two_runs_with_one_seed_write_the_same_champion(on_cognate, cognate_micro, tmp_path_factory):
    out, inputs, result = on_cognate
    twin = tmp_path_factory.mktemp("evomerge")
    again = run_micro(evomerge.SPEC, inputs, twin)
    ours, theirs = result.artifacts["champion"], again.artifacts["champion"]
    files = sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    assert all((ours / f).read_bytes() == (theirs / f).read_bytes() for f in files)
    assert read_metrics(out, phase="evomerge/candidate") == read_metrics(twin, phase="evomerge/candidate")


def test_selection_and_final_data_do_not_overlap(cognate_micro):
    _, result = cognate_micro
    tokenizer = load_model_dir(result.artifacts["trunk"])[1]
    selection, final = evomerge.held_out_sets(EvalSuite(DATA_PRESETS["micro"], tokenizer, 0), MICRO)
    for domain in DOMAINS:
        assert not {i.prompt for i in selection.items[domain]} & {i.prompt for i in final.items[domain]}
    assert not {tuple(r) for r in selection.text["input_ids"]} & {tuple(r) for r in final.text["input_ids"]}


def test_the_methods_figure_shows_differences_from_the_best_parent():
    summary = {
        "final_fitness": {"champion": -4.99, "parent_0": -5.0, "parent_1": -5.2},
        "best_parent": "parent_0",
        "champion_recipe": {"method": "ties", "behaviour": 1, "weights": [1.0, 0.4213, 0.8], "density": 0.5},
        "ablation": {"linear": {"best_final_fitness": -5.004}, "ties": {"best_final_fitness": -4.99}},
    }
    ax = evomerge_figures.methods_figure(summary).axes[0]
    low, high = ax.get_ylim()
    assert -0.01 < low < -0.004 and 0.01 < high < 0.02  # zoomed to the differences, not 0 to -5
    assert ax.get_title() == "champion: ties: weights 1/0.42/0.8, density 0.5; config of source 1"
    assert [round(p.get_height(), 6) for p in ax.patches] == [-0.004, 0.01, 0.01]


@pytest.fixture(scope="module")
def llama_variants(tmp_path_factory):
    """A tiny Llama base and three copies fine-tuned on different task domains."""
    root = tmp_path_factory.mktemp("llamas")
    tokenizer = train_tokenizer(load_text("stdlib", max_docs=20), 384)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    base = LlamaForCausalLM(config)
    save_model_dir(base, tokenizer, root / "base", {"role": "base"})
    variants = []
    for domain, families in DOMAINS.items():
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        rows = pack_tasks(
            tokenizer, [it for f in families for it in make_split(f, "train", 40, seed=0, level=0)], 48, seed=0
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for start in list(range(0, len(rows), 8)) * 3:
            batch = rows[start : start + 8]
            loss = model(input_ids=torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["labels"])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        save_model_dir(model, tokenizer, root / domain, {"role": "variant", "domain": domain})
        variants.append(root / domain)
    return {"trunk": root / "base", "siblings": variants}


def test_works_on_fine_tuned_llama_variants(llama_variants, tmp_path):
    result = run_micro(evomerge.SPEC, llama_variants, tmp_path)
    model, _, meta = load_model_dir(result.artifacts["champion"])
    assert isinstance(model, LlamaForCausalLM)
    assert read_record(tmp_path)["data"] == dataclasses.asdict(DATA_PRESETS["micro"])  # the run's data spec
    if meta["recipe"]["method"] == "dfs":
        assert model.config.num_hidden_layers == len(meta["recipe"]["path"])


def test_nested_evolution_settings_reach_the_search(cognate_micro, tmp_path):
    result = run_micro(
        evomerge.SPEC,
        cognate_inputs(cognate_micro),
        tmp_path,
        evolution={"generations": 1, "population": 3},
        methods=["linear", "ties"],
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["generations"] == 1 and summary["evaluations"] == 3
    assert read_metadata(result.artifacts["champion"])["recipe"]["method"] in ("linear", "ties")
    assert evolve.describe(summary["champion_recipe"]).startswith(summary["champion_recipe"]["method"])
