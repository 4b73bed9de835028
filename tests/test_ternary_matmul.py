"""ternary_matmul on every ISA, prepacked layout and backend: bit-exact against
reference.ternary_matmul on odd shapes, dtypes, scales, bias, act_bits and memory layouts;
known answers at the int16 limit of the AVX2 kernel; NaN/Inf rows; STE gradient for x; opcheck."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import (
    FLOAT_DTYPES,
    LAYOUTS,
    ODD_K,
    PREPACK_LAYOUTS,
    assert_same,
    dequantized_weight,
    make_layout,
    make_matmul_inputs,
    prepacked,
)

# (leading dims of x, N, K). M = 1..3 takes the SIMD GEMV path, M >= 4 the GEMM path, which
# works in blocks of 64 rows and of 32 K blocks (4096 or 5120); N covers full and partial row
# tiles of 8 (and their 4-row halves); K covers every ODD_K and base3's 160-weight blocks;
# 3-D and 4-D batches.
SHAPES = [
    ((1,), 1, 1),
    ((1,), 5, 3),
    ((2,), 1, 5),
    ((3,), 7, 127),
    ((4,), 4, 129),
    ((5,), 6, 300),
    ((2, 3), 9, 513),
    ((17,), 3, 1000),
    ((1,), 33, 128),
    ((2, 2, 2), 2, 64),
    ((9,), 1, 512),
    ((70,), 5, 129),
    ((2, 33), 2, 300),
    ((3,), 2, 4500),
    ((6,), 3, 4097),
    ((1,), 8, 160),
    ((2,), 16, 161),
    ((5,), 13, 5121),
    ((1,), 23, 2000),
]
assert {k for *_, k in SHAPES} >= set(ODD_K)
# A GEMV and a GEMM shape, for the tests that multiply other axes.
SMALL_SHAPES = [((1,), 6, 129), ((5,), 3, 300)]


def check_against_reference(x, w_pre, scale, bias=None, act_bits=8):
    y = ops.ternary_matmul(x, w_pre, scale, bias, act_bits)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w_pre.shape[0] - 1)  # the last row is the header
    assert_same(y, ref.ternary_matmul(x, w_pre, scale, bias, act_bits))
    return y


@pytest.mark.parametrize("act_bits", [2, 4, 8])
@pytest.mark.parametrize("lead, N, K", SHAPES)
def test_matches_reference(isa, kernel, lead, N, K, act_bits):
    x, _, w_pre, scale, _ = make_matmul_inputs(lead, N, K, layout=kernel)
    check_against_reference(x, w_pre, scale, act_bits=act_bits)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lead, N, K", SMALL_SHAPES)
def test_dtypes_scales_and_bias_match_reference(isa, kernel, lead, N, K, dtype, per_channel, with_bias):
    x, _, w_pre, scale, bias = make_matmul_inputs(lead, N, K, dtype, per_channel, with_bias, layout=kernel)
    check_against_reference(x, w_pre, scale, bias, act_bits=4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_noncontiguous_inputs_match_reference(isa, kernel, layout):
    # Every tensor argument in the layout at once: x, prepacked weights, per-channel scale, bias.
    x, _, w_pre, scale, bias = make_matmul_inputs((5,), 7, 300, per_channel=True, with_bias=True, layout=kernel)
    args = [make_layout(t, layout) for t in (x, w_pre, scale, bias)]
    assert_same(ops.ternary_matmul(*args), ref.ternary_matmul(x, w_pre, scale, bias))


def test_auto_backend_matches_reference_and_records_its_choice(monkeypatch):
    monkeypatch.setenv("AGENTFORGE_BACKEND", "auto")
    ops.set_isa(ops.cpu_info()["isa"])  # clears the measured table, so this call measures
    x, _, w_pre, scale, _ = make_matmul_inputs((3,), 300, 129)  # N > the 256 rows the probe times
    check_against_reference(x, w_pre, scale, act_bits=4)
    [row] = [r for r in ops.cpu_info()["dispatch"] if r["shape_class"] == "M=2-3 K~2^7 bits=4"]
    assert row["backend"] in ("int8", "popcount")


@pytest.mark.parametrize("lead", [(1,), (4, 3)], ids=["gemv", "gemm"])
def test_agrees_with_dequantized_linear(isa, kernel, lead):
    # Independent of the reference: the op is F.linear of the fake-quantized activations and
    # the dequantized weights, up to fp32 rounding of the different operation order.
    x, codes, w_pre, scale, bias = make_matmul_inputs(lead, 11, 513, per_channel=True, with_bias=True, layout=kernel)
    expected = F.linear(ops.act_fake_quant(x, 8), dequantized_weight(codes, scale), bias)
    torch.testing.assert_close(ops.ternary_matmul(x, w_pre, scale, bias), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 4], ids=["gemv", "gemm"])
def test_long_rows_do_not_overflow_int16(isa, kernel, M):
    # K = 6000 is 47 (2bit) or 38 (base3) blocks: more than any int16 window of the AVX2 kernels
    # and more than one 32-block GEMM chunk. All-equal activations quantize to 127, so
    # y = ±127 K / 127 = ±K exactly.
    K = 6000
    codes = torch.tensor([[1], [-1], [0], [1]], dtype=torch.int8).expand(4, K)
    y = ops.ternary_matmul(torch.ones(M, K), prepacked(codes, kernel), torch.ones(1))
    assert_same(y, torch.tensor([[K, -K, 0, K]], dtype=torch.float32).expand(M, 4))


@pytest.mark.parametrize("lead", [(1,), (6,)], ids=["gemv", "gemm"])
def test_thread_count_does_not_change_result(isa, kernel, lead):
    x, _, w_pre, scale, bias = make_matmul_inputs(lead, 301, 257, per_channel=True, with_bias=True, layout=kernel)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.ternary_matmul(x, w_pre, scale, bias)
    finally:
        torch.set_num_threads(threads)
    assert_same(ops.ternary_matmul(x, w_pre, scale, bias), single)


def _run_matmul(x, codes, scale, bias, layout):
    return ops.ternary_matmul(x, prepacked(codes, layout), scale, bias)


def _run_bitlinear(x, codes, scale, bias, layout):
    return ops.bitlinear(x, codes.to(x.dtype), bias)  # codes as weights: scale = mean|codes|


@pytest.mark.parametrize("run", [_run_matmul, _run_bitlinear], ids=["ternary_matmul", "bitlinear"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_rows_propagate_like_linear(isa, kernel, run, dtype):
    x, codes, _, scale, bias = make_matmul_inputs((6,), 5, 129, dtype, with_bias=True)
    x[1, 7] = float("nan")
    x[3, 0] = float("inf")
    x[4, 128] = -float("inf")
    y = run(x, codes, scale, bias, kernel)
    linear = F.linear(x.float(), dequantized_weight(codes, scale), bias.float())
    assert torch.equal(~torch.isfinite(y), ~torch.isfinite(linear))
    assert not torch.isfinite(y[[1, 3, 4]]).any()
    # Per-token quantization: the finite rows are what they would be without the bad ones.
    finite = [0, 2, 5]
    assert_same(y[finite], run(x[finite], codes, scale, bias, kernel))


# --- autograd and opcheck ---------------------------------------------------------------


@pytest.mark.parametrize("layout", PREPACK_LAYOUTS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_grad_x_is_straight_through(per_channel, layout):
    x, codes, w_pre, scale, bias = make_matmul_inputs(
        (2, 3), 7, 129, per_channel=per_channel, with_bias=True, layout=layout
    )
    x.requires_grad_()
    bias.requires_grad_()
    grad_y = torch.randn(2, 3, 7)
    ops.ternary_matmul(x, w_pre, scale, bias).backward(grad_y)
    torch.testing.assert_close(x.grad, grad_y @ dequantized_weight(codes, scale))
    torch.testing.assert_close(bias.grad, grad_y.sum((0, 1)))


def _opcheck_args(lead, N, K, dtype, per_channel, with_bias, act_bits, requires_grad, layout="2bit"):
    x, _, w_pre, scale, bias = make_matmul_inputs(lead, N, K, dtype, per_channel, with_bias, layout=layout)
    return (x.requires_grad_(requires_grad), w_pre, scale, bias, act_bits)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(((3,), 5, 129, torch.float32, False, False, 8, False), id="2d"),
        pytest.param(((2, 3), 4, 7, torch.bfloat16, True, True, 4, False), id="3d-bf16-per-channel-bias"),
        pytest.param(((1,), 1, 1, torch.float16, False, True, 2, False), id="1x1-fp16"),
        pytest.param(((3,), 5, 129, torch.float32, False, True, 8, True), id="grad-x"),
        pytest.param(((2, 2), 6, 300, torch.float32, True, False, 4, True), id="grad-x-3d-per-channel"),
        pytest.param(((3,), 9, 161, torch.float32, True, True, 8, True, "base3"), id="base3-grad-x"),
        pytest.param(((5,), 2, 7, torch.bfloat16, False, False, 8, False, "base3"), id="base3-gemm-bf16"),
    ],
)
def test_opcheck(case):
    opcheck(torch.ops.agentforge.ternary_matmul.default, _opcheck_args(*case))


@pytest.mark.parametrize("lead", [(1,), (3,), (5,)], ids=["gemv", "gemv-3", "gemm"])
def test_every_payload_byte_means_one_weight_everywhere(isa, kernel, lead):
    # prepack writes only valid codes, but a payload changed after prepacking (bytes flipped in
    # memory) must still give one answer on every ISA and backend: the reference's reading, in
    # which a 2bit field 3 is w = 2 and every base3 byte decodes to five codes.
    x, _, w_pre, scale, _ = make_matmul_inputs(lead, 13, 700, layout=kernel)
    w_pre[:-1] = torch.randint(0, 256, w_pre[:-1].shape, dtype=torch.uint8)  # all but the header row
    assert kernel == "base3" or ((w_pre[:-1] & 3) == 3).any()
    check_against_reference(x, w_pre, scale)
