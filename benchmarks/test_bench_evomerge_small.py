"""What one EvoMerge generation costs on the ``small`` preset, measured on a few candidates.

A ``small`` run (``CognateConfig`` small, ~25M parameters, vocab 8192, sequences of 256) is meant
for a GPU; this measures, on whatever machine runs it, one candidate's evaluation exactly as the
phase does it: merge three siblings (``build``) and measure the merged model on the small
preset's selection split (``measure``: perplexity on the text rows, greedy answers
and answer NLL for every domain). A generation evaluates about ``population`` new candidates, so
``extra_info["generation_s"]`` = median candidate time x population.

The siblings are freshly initialised, not trained: merging and measuring cost the same for any
weights of these shapes, except that greedy decoding stops early at EOS, which untrained models
rarely emit, so this is an upper bound on the decoding part.

Run: ``python -m pytest benchmarks/test_bench_evomerge_small.py -q --benchmark-only -s`` (on a
2-core CPU each candidate takes minutes; DFS is measured besides linear because its layer path
changes the depth, while every parameter-space method yields a model of the parents' shape).
"""

import pytest
import torch

from agentforge.data.spec import PRESETS as DATA_PRESETS
from agentforge.eval import EvalSuite
from agentforge.eval.suite import documents
from agentforge.phases import cognate, evomerge

SMALL = evomerge.PRESETS["small"]
pytestmark = pytest.mark.benchmark(min_rounds=1, warmup=False)


@pytest.fixture(scope="module")
def small_setup():
    from agentforge.data import train_tokenizer
    from agentforge.merge import evolve

    settings, spec = cognate.PRESETS["small"], DATA_PRESETS["small"]
    tokenizer = train_tokenizer(documents(spec), settings.vocab_size, max_chars=2_000_000)
    torch.manual_seed(0)
    trunk = cognate.new_trunk_model(settings, tokenizer).eval()
    siblings = [cognate.sibling_from(trunk, overrides).eval() for _, overrides in cognate.SIBLINGS.values()]
    for sibling in siblings:  # distinct weights, so that every merge method does real work
        with torch.no_grad():
            for p in sibling.parameters():
                p.add_(0.01 * torch.randn_like(p))
    suite = EvalSuite(spec, tokenizer, seed=0)
    selection, _ = evomerge.held_out_sets(suite, SMALL)
    space = evomerge.search_space(siblings, SMALL)
    return suite, trunk, siblings, selection, space, evolve


@pytest.mark.parametrize("method", ["linear", "dfs"])  # every parameter-space merge costs what linear does
def test_small_preset_candidate_evaluation(benchmark, small_setup, method):
    suite, trunk, siblings, selection, space, _ = small_setup
    recipe = space.default(method)

    def evaluate_candidate():
        return evomerge.measure(suite, evomerge.build(recipe, siblings, trunk), selection, SMALL.eval_batch_size)

    benchmark.group = "EvoMerge small preset: one candidate (merge + selection-split measurement)"
    report = benchmark.pedantic(evaluate_candidate, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        impl=method,
        parameters=sum(p.numel() for p in trunk.parameters()),
        text_rows=len(selection.text),
        task_items=sum(map(len, selection.items.values())),
        population=SMALL.population,
        generation_s=seconds * SMALL.population,
        threads=torch.get_num_threads(),
    )
    print(
        f"\n{method}: {seconds:.1f} s per candidate -> {seconds * SMALL.population / 60:.1f} min per generation "
        f"of {SMALL.population}, {seconds * SMALL.population * SMALL.generations / 3600:.1f} h for "
        f"{SMALL.generations} generations ({torch.get_num_threads()} threads)"
    )
    assert report["perplexity"] > 1
