"""Tool-using generation (``agentforge.tools.generate_with_tools_batch``) on a tiny Llama: a full
forward over every sequence for every token against incremental decoding with the KV cache.

The model is a freshly initialised 4-layer Llama (hidden 256) on a 320-token tokenizer; each
row is the tool prompt with a few worked examples (the context baking and the curriculum put in
front of a question, ~200 tokens) and a question, 8 rows per batch, 64 new tokens, greedy. Both
paths produce the same text (tests/test_tools_decoding.py checks that); only their cost differs.

Run: ``python -m pytest benchmarks/test_bench_tool_decoding.py -q --benchmark-only``.
"""

import pytest
import torch

from agentforge.tools import TOOL_PROMPT, generate_with_tools_batch

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=1, min_rounds=3)

SHOTS = " ".join(f"{a}*{b}=[calc: {a}*{b}][out: {a * b}]{a * b}" for a, b in ((37, 48), (12, 7), (305, 11), (9, 81)))


@pytest.fixture(scope="module")
def llama_and_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentforge.data import load_text, train_tokenizer

    tokenizer = train_tokenizer(load_text("stdlib", max_docs=10), 320)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.mark.parametrize("impl", ["full forward per token", "KV cache"])
def test_tool_generation(benchmark, llama_and_tokenizer, impl):
    model, tokenizer = llama_and_tokenizer
    prompts = [f"{TOOL_PROMPT} {SHOTS} {a}*{a + 3}=" for a in range(11, 19)]
    model.generation_config.use_cache = impl == "KV cache"  # the switch generation reads
    width = len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    benchmark.group = f"tool generation, tiny Llama (4x256), 8 rows x {width}-token prompt, 64 new tokens, greedy"
    benchmark.extra_info.update(impl=impl, baseline=impl.startswith("full"), threads=torch.get_num_threads())
    outputs = benchmark(generate_with_tools_batch, model, tokenizer, prompts, max_new_tokens=64, batch_size=8)
    assert len(outputs) == len(prompts)
