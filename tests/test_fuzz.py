"""Property-based fuzzing of the ops against the reference: random shapes (including empty
batches), dtypes, memory layouts, act_bits, scales, bias, ISAs, prepacked layouts and backends;
and prepacked weights sliced, reshaped, fed the wrong K, with corrupt headers or flipped payload
bytes, which must be refused or give the reference's answer: never a crash, never a silent
wrong answer.

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
from helpers import (
    FLOAT_DTYPES,
    LAYOUTS,
    ODD_K,
    PREPACK_LAYOUTS,
    assert_same,
    forced_backend,
    make_layout,
    prepacked,
    random_activations,
    random_codes,
    supported_isas,
    using_isa,
)

FUZZ = settings(
    max_examples=int(os.environ.get("AGENTFORGE_FUZZ_EXAMPLES", 60)),
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# K near the packing boundaries (4, 5, 64, 128, 512) and past one 4096-wide GEMM chunk is drawn
# more often than uniform K would.
k_values = st.one_of(st.sampled_from(ODD_K + (4, 64, 128, 512, 2048, 4097)), st.integers(1, 1100))
# Up to three leading dims with at most 12 tokens in all (a 0 gives an empty batch), or a batch
# around the GEMM kernels' 64-row blocks.
lead_shapes = st.one_of(
    st.lists(st.integers(0, 5), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= 12),
    st.sampled_from([[64], [65], [2, 35]]),
)
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


# (prepacked layout, backend): every kernel family; base3 weights have their own kernel
KERNELS = [("2bit", "int8"), ("2bit", "popcount"), ("2bit", "auto"), ("base3", "auto")]


@FUZZ
@given(
    x=activations(),
    N=st.integers(1, 40),
    act_bits=st.integers(2, 8),
    per_channel=st.booleans(),
    with_bias=st.booleans(),
    isa=st.sampled_from(supported_isas()),
    kernel=st.sampled_from(KERNELS),
    seed=seeds,
)
def test_ternary_matmul_matches_reference(x, N, act_bits, per_channel, with_bias, isa, kernel, seed):
    g = generator(seed)
    layout, backend = kernel
    w_pre = prepacked(random_codes(N, x.shape[-1], g), layout)
    scale = torch.rand(N if per_channel else 1, generator=g) + 0.05
    bias = torch.randn(N, generator=g).to(x.dtype) if with_bias else None
    with using_isa(isa), forced_backend(backend):
        y = ops.ternary_matmul(x, w_pre, scale, bias, act_bits)
    assert_same(y, ref.ternary_matmul(x, w_pre, scale, bias, act_bits))


@FUZZ
@given(
    x=activations(),
    N=st.integers(1, 24),
    per_channel=st.booleans(),
    with_bias=st.booleans(),
    w_layout=st.sampled_from(LAYOUTS),
    isa=st.sampled_from(supported_isas()),
    backend=st.sampled_from(("int8", "popcount")),
    seed=seeds,
)
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
    for actual, expected in zip(
        ops.quantize_activations(x, bits, return_row_sum=True), ref.quantize_activations(x, bits)
    ):
        assert_same(actual, expected)
    assert_same(ops.act_fake_quant(x, bits), ref.act_fake_quant(x, bits))


@FUZZ
@given(
    N=st.integers(1, 20),
    K=st.one_of(st.just(0), k_values),
    dtype=st.sampled_from(FLOAT_DTYPES),
    per_channel=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    seed=seeds,
)
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
    for layout in PREPACK_LAYOUTS:
        pre = ops.prepack_ternary(packed, K, layout)
        assert_same(pre, ref.prepack_ternary(packed, K, layout))
        assert_same(ops.unprepack_ternary(pre, K), packed)


# --- mangled prepacked weights ----------------------------------------------------------------

MANGLES = ("row-slice", "column-slice", "reshape", "wrong-K", "header-byte", "payload-bytes", "other-layout-bytes")


@st.composite
def mangled(draw):
    """(x, w, how): a valid x and prepacked w for N x K weights, then w mangled `how`."""
    N, K = draw(st.integers(1, 40)), draw(k_values)
    layout, how = draw(st.sampled_from(PREPACK_LAYOUTS)), draw(st.sampled_from(MANGLES))
    g = generator(draw(seeds))
    w = prepacked(random_codes(N, K, g), layout)
    x = random_activations((draw(st.integers(1, 5)), K), generator=g)
    if how == "row-slice":  # any rows but all of them
        a = draw(st.integers(0, N))
        b = draw(st.integers(a + 1, N + 1).filter(lambda b: (a, b) != (0, N + 1)))
        w = w[a:b]
    elif how == "column-slice":
        a = draw(st.integers(0, w.shape[1] - 1))
        b = draw(st.integers(a + 1, w.shape[1]).filter(lambda b: (a, b) != (0, w.shape[1])))
        w = w[:, a:b]
    elif how == "reshape":  # every other factorisation of the element count
        shapes = [
            (d, w.numel() // d) for d in range(1, w.numel() + 1) if w.numel() % d == 0 and d != w.shape[0] and d <= 4096
        ]
        w = w.reshape(draw(st.sampled_from(shapes))) if shapes else w.reshape(-1)
    elif how == "wrong-K":
        x = random_activations((x.shape[0], draw(k_values.filter(lambda k: k != K))), generator=g)
    elif how == "header-byte":
        i = draw(st.integers(0, 31))
        w[-1, i] = (int(w[-1, i]) + draw(st.integers(1, 255))) % 256
    elif how == "payload-bytes":  # valid header, payload bytes anything (2bit fields of 3 included)
        n = draw(st.integers(1, 64))
        flat = w[:-1].reshape(-1)
        idx = torch.randint(0, max(flat.numel(), 1), (n,), generator=g)
        if flat.numel():
            flat[idx] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    else:  # other-layout-bytes: the other layout's payload under this header
        other = prepacked(random_codes(N, K, g), "base3" if layout == "2bit" else "2bit")
        rows = min(w.shape[0], other.shape[0]) - 1
        cols = min(w.shape[1], other.shape[1])
        w[:rows, :cols] = other[:rows, :cols]
    return x, w, how


REFUSED = {"row-slice", "column-slice", "reshape", "wrong-K", "header-byte"}


@FUZZ
@given(case=mangled(), isa=st.sampled_from(supported_isas()), backend=st.sampled_from(("int8", "popcount", "auto")))
def test_mangled_prepacked_weights_are_refused_or_read_as_the_reference_reads_them(case, isa, backend):
    x, w, how = case
    with using_isa(isa), forced_backend(backend):
        try:
            y = ops.ternary_matmul(x, w, torch.ones(1))
        except RuntimeError as exc:
            refused = str(exc)
        else:
            refused = None
    if how in REFUSED:
        assert refused is not None and "agentforge.ternary_matmul" in refused, how
        return
    # A valid header over changed payload bytes: every ISA and backend reads the bytes as the
    # reference does (or popcount declines base3 weights by name).
    if refused is not None:
        assert backend == "popcount" and "these weights are base3" in refused, refused
        return
    assert_same(y, ref.ternary_matmul(x, w, torch.ones(1)))
