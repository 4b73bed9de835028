"""agentforge.eval.speed: throughput, parameter counts, stored bytes and peak memory.

No timing assertions beyond "positive and finite": speed comparisons live in benchmarks/.
"""

import gc
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.eval import parameter_bytes, parameter_count, peak_memory_bytes, speed, tokens_per_second
from agentforge.nn import convert_to_bitnet, pack_bitnet

VOCAB, HIDDEN = 64, 32
MIB = 1024 * 1024


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(tie_word_embeddings: bool = False, eos_token_id: int | None = None) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def test_parameter_count_counts_tied_weights_once():
    untied, tied = tiny_llama(tie_word_embeddings=False), tiny_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert parameter_count(untied) == sum(p.numel() for p in untied.parameters())
    assert parameter_count(tied) == parameter_count(untied) - VOCAB * HIDDEN


def test_parameter_bytes_follow_dtype_and_skip_derived_buffers():
    fp32 = tiny_llama()
    bf16 = tiny_llama().to(torch.bfloat16)
    assert parameter_bytes(fp32) == 4 * parameter_count(fp32)  # rotary inv_freq is non-persistent
    assert parameter_bytes(bf16) == 2 * parameter_count(bf16)
    tied = tiny_llama(tie_word_embeddings=True)
    assert parameter_bytes(tied) == 4 * parameter_count(tied)


def test_parameter_bytes_count_persistent_buffers_at_their_dtype():
    module = torch.nn.Linear(8, 4, bias=False)  # 32 fp32 weights
    module.register_buffer("codes", torch.zeros(100, dtype=torch.uint8))
    module.register_buffer("cache", torch.zeros(1000), persistent=False)
    assert parameter_count(module) == 32
    assert parameter_bytes(module) == 32 * 4 + 100


def test_parameter_bytes_of_packed_ternary_model():
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False))
    fp32_bytes = parameter_bytes(model)
    pack_bitnet(convert_to_bitnet(model, skip=()))
    # 2 bits per weight plus one fp32 scale: the stored size, not the kernel-layout copy.
    assert parameter_bytes(model) == 128 * 256 // 4 + 4
    assert parameter_bytes(model) * 15 < fp32_bytes


def test_peak_memory_sees_a_large_allocation():
    size = 256 * MIB

    def allocate():
        return torch.ones(size // 4).sum().item()  # ones() touches every page, so RSS grows

    gc.collect()  # earlier tests' garbage, freed during the measurement, would hide the allocation
    _, idle_peak = peak_memory_bytes(lambda: None, device="cpu")
    result, busy_peak = peak_memory_bytes(allocate, device="cpu")
    assert result == size // 4
    assert busy_peak - idle_peak >= 0.9 * size
    _, after = peak_memory_bytes(lambda: None, device="cpu")
    assert after < busy_peak - 0.9 * size  # the reset works: the old peak is not reported again


def test_peak_memory_fallback_warns_and_reports_an_upper_bound(monkeypatch):
    monkeypatch.setattr(speed, "_reset_peak_rss", lambda: False)
    with pytest.warns(RuntimeWarning, match="lifetime peak"):
        result, peak = peak_memory_bytes(lambda: 7, device="cpu")
    assert result == 7 and peak >= 16 * MIB  # at least the interpreter and torch are resident


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    _, peak = peak_memory_bytes(lambda: torch.ones(64 * MIB, device="cuda").sum().item(), device="cuda")
    assert peak >= 4 * 64 * MIB


def test_peak_memory_rejects_unknown_device():
    with pytest.raises(ValueError, match="device type 'meta'"):
        peak_memory_bytes(lambda: None, device="meta")


def test_tokens_per_second_is_positive_even_when_the_model_would_stop():
    torch.manual_seed(0)
    # Half the vocabulary is eos: unforced, generation would almost surely stop within 8 tokens.
    model = tiny_llama(eos_token_id=list(range(VOCAB // 2)))
    rate = tokens_per_second(model, prompt_len=4, new_tokens=8, batch_size=2, repeats=2)
    assert rate > 0 and math.isfinite(rate)


def test_tokens_per_second_needs_a_vocabulary_size():
    with pytest.raises(ValueError, match="pass vocab_size="):
        tokens_per_second(torch.nn.Linear(2, 2), new_tokens=2, repeats=1)  # no config to read it from
    with pytest.raises(ValueError, match="repeats"):
        tokens_per_second(tiny_llama(), repeats=0)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_peak_rss_counts_a_spike_between_two_readings():
    from agentforge.eval.speed import PeakRss, _reset_peak_rss

    if not _reset_peak_rss():
        pytest.skip("this system does not let a process reset its VmHWM (/proc/self/clear_refs)")
    with PeakRss(interval=60.0) as watch:  # no reading by the thread inside the block
        start = _rss_bytes()
        spike = torch.ones(64 * MIB)  # 256 MiB, touched
        del spike
    assert watch.peak - start > 200 * MIB
