"""Property-based fuzzing of the ops against the reference: random shapes (including empty
batches), dtypes, memory layouts, act_bits, scales, bias, ISAs and backends.

Hypothesis is derandomized and keeps no example database, so every run (and CI) draws the
same examples; a failure prints the falsifying example to reproduce it. For a deeper local
run: AGENTFORGE_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py"""
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import (FLOAT_DTYPES, LAYOUTS, ODD_K, assert_same, forced_backend, make_layout, prepacked,
                     random_activations, random_codes, supported_isas, using_isa)

FUZZ = settings(max_examples=int(os.environ.get("AGENTFORGE_FUZZ_EXAMPLES", 60)), deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])

# K near the packing boundaries (4, 5, 64, 128, 512) and past one 4096-wide GEMM chunk is drawn
# more often than uniform K would.
k_values = st.one_of(st.sampled_from(ODD_K + (4, 64, 128, 512, 2048, 4097)), st.integers(1, 1100))
# Up to three leading dims with at most 12 tokens in all (a 0 gives an empty batch), or a batch
# around the GEMM kernels' 64-row blocks.
lead_shapes = st.one_of(st.lists(st.integers(0, 5), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= 12),
                        st.sampled_from([[64], [65], [2, 35]]))
seeds = st.integers(0, 2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def activations(draw):
    """x with a random shape, dtype, layout and value scale; sometimes a row of NaN or Inf."""
    lead, K = draw(lead_shapes), draw(k_values)
    x = random_activations((*lead, K), draw(st.sampled_from(FLOAT_DTYPES)), generator(draw(seeds)))
    x = x * draw(st.sampled_from([1e-6, 1.0, 1e3]))
    if x.numel() and draw(st.booleans()):
        x.view(-1, K)[0, draw(st.integers(0, K - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return make_layout(x, draw(st.sampled_from(LAYOUTS)))


@FUZZ
@given(x=activations(), N=st.integers(1, 40), act_bits=st.integers(2, 8), per_channel=st.booleans(),
       with_bias=st.booleans(), isa=st.sampled_from(supported_isas()),
       backend=st.sampled_from(("int8", "popcount", "auto")), seed=seeds)
def test_ternary_matmul_matches_reference(x, N, act_bits, per_channel, with_bias, isa, backend, seed):
    g = generator(seed)
    w_pre = prepacked(random_codes(N, x.shape[-1], g))
    scale = torch.rand(N if per_channel else 1, generator=g) + 0.05
    bias = torch.randn(N, generator=g).to(x.dtype) if with_bias else None
    with using_isa(isa), forced_backend(backend):
        y = ops.ternary_matmul(x, w_pre, scale, bias, act_bits)
    assert_same(y, ref.ternary_matmul(x, w_pre, scale, bias, act_bits))


@FUZZ
@given(x=activations(), N=st.integers(1, 24), per_channel=st.booleans(), with_bias=st.booleans(),
       w_layout=st.sampled_from(LAYOUTS), isa=st.sampled_from(supported_isas()),
       backend=st.sampled_from(("int8", "popcount")), seed=seeds)
def test_bitlinear_matches_reference(x, N, per_channel, with_bias, w_layout, isa, backend, seed):
    g = generator(seed)
    w = torch.randn(N, x.shape[-1], generator=g).to(x.dtype)
    bias = torch.randn(N, generator=g).to(x.dtype) if with_bias else None
    with using_isa(isa), forced_backend(backend):
        y = ops.bitlinear(x, make_layout(w, w_layout), bias, per_channel)
    # The reference takes w contiguous: it sums mean|w| in memory order (see test_quantize.py).
    assert_same(y, ref.bitlinear(x, w, bias, per_channel))


@FUZZ
@given(x=activations(), bits=st.integers(2, 8))
def test_quantize_activations_matches_reference(x, bits):
    for actual, expected in zip(ops.quantize_activations(x, bits, return_row_sum=True), ref.quantize_activations(x, bits)):
        assert_same(actual, expected)
    assert_same(ops.act_fake_quant(x, bits), ref.act_fake_quant(x, bits))


@FUZZ
@given(N=st.integers(1, 20), K=st.one_of(st.just(0), k_values), dtype=st.sampled_from(FLOAT_DTYPES),
       per_channel=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=seeds)
def test_quantize_ternary_matches_reference(N, K, dtype, per_channel, layout, seed):
    w = torch.randn(N, K, generator=generator(seed)).to(dtype)
    codes, scale = ops.quantize_ternary(make_layout(w, layout), per_channel)
    ref_codes, ref_scale = ref.quantize_ternary(w, per_channel)
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)


@FUZZ
@given(N=st.integers(1, 20), K=st.one_of(st.just(0), k_values), layout=st.sampled_from(LAYOUTS), seed=seeds)
def test_storage_formats_round_trip(N, K, layout, seed):
    codes = make_layout(random_codes(N, K, generator(seed)), layout)
    packed = ops.pack_ternary(codes)
    assert_same(packed, ref.pack_ternary(codes))
    assert_same(ops.unpack_ternary(packed, K), codes.contiguous())
    assert_same(ops.pack_ternary_base3(codes), ref.pack_ternary_base3(codes))
    assert_same(ops.unpack_ternary_base3(ops.pack_ternary_base3(codes), K), codes.contiguous())
    pre = ops.prepack_ternary(packed)
    assert_same(pre, ref.prepack_ternary(packed))
    assert_same(ops.unprepack_ternary(pre, K), packed)
