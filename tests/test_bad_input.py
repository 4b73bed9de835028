"""Bad input raises a clear RuntimeError naming the op and the problem, never crashes or
reads out of bounds; empty tensors are valid input with correctly shaped output."""

import pytest
import torch

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import ISA_ORDER, assert_same, prepacked, random_codes, supported_isas

mm = ops.ternary_matmul


def codes(N=5, K=7):
    return random_codes(N, K)


def packed(N=5, K=7):
    return ops.pack_ternary(codes(N, K))


def packed5(N=5, K=7):
    return ops.pack_ternary_base3(codes(N, K))


def w_pre(N=5, K=7):
    return prepacked(codes(N, K))


def x(*shape):
    return torch.randn(*(shape or (3, 7)))


def with_byte(t, index, value):
    """A copy of a uint8 tensor with one byte overwritten (the way corrupt files look)."""
    t = t.clone()
    t[index] = value
    return t


def with_header(w, offset, value):
    """A copy of a prepacked tensor with header byte `offset` set and the header checksum fixed,
    as a build with another format version, layout or tile would have written it."""
    w = w.clone()
    w[-1, offset] = value
    h = 2166136261
    for b in w[-1, :28].tolist():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    w[-1, 28:32] = torch.tensor(list(h.to_bytes(4, "little")), dtype=torch.uint8)
    return w


def headerless(N=5, K=7):
    """The prepacked layout of agentforge before format 2: [N, KB * 32], no header row."""
    return torch.randint(0, 255, (N, -(-K // 128) * 32), dtype=torch.uint8)


ONE = torch.ones(1)
NAN_W = torch.tensor([[1.0, float("nan")], [0.5, 0.25]])
INF_W = torch.tensor([[1.0, float("inf")], [0.5, 0.25]])

# (call, message regex). Every message names the op, so a user can tell which call failed.
BAD_CALLS = {
    # wrong dtype
    "quantize_ternary-int-w": (
        lambda: ops.quantize_ternary(torch.ones(3, 4, dtype=torch.int32)),
        r"quantize_ternary: w must be float32, bfloat16 or float16, got Int",
    ),
    "quantize_ternary-float64-w": (
        lambda: ops.quantize_ternary(torch.ones(3, 4, dtype=torch.float64)),
        r"quantize_ternary: w must be float32, bfloat16 or float16, got Double",
    ),
    "quantize_activations-int8-x": (
        lambda: ops.quantize_activations(torch.ones(3, 4, dtype=torch.int8)),
        r"quantize_activations: x must be float32, bfloat16 or float16",
    ),
    "act_fake_quant-int-x": (
        lambda: ops.act_fake_quant(torch.ones(3, 4, dtype=torch.int64)),
        r"quantize_activations: x must be float32",
    ),
    "pack_ternary-float-codes": (
        lambda: ops.pack_ternary(torch.zeros(2, 4)),
        r"pack_ternary: codes must be int8, got Float",
    ),
    "pack_ternary_base3-uint8-codes": (
        lambda: ops.pack_ternary_base3(torch.zeros(2, 4, dtype=torch.uint8)),
        r"pack_ternary_base3: codes must be int8, got Byte",
    ),
    "unpack_ternary-int8-packed": (
        lambda: ops.unpack_ternary(packed().to(torch.int8), 7),
        r"unpack_ternary: packed must be uint8, got Char",
    ),
    "prepack_ternary-int8-packed": (
        lambda: ops.prepack_ternary(packed().to(torch.int8)),
        r"prepack_ternary: packed must be uint8",
    ),
    "ternary_matmul-int-x": (
        lambda: mm(torch.ones(3, 7, dtype=torch.int32), w_pre(), ONE),
        r"ternary_matmul: x must be float32, bfloat16 or float16, got Int",
    ),
    "ternary_matmul-int8-w": (
        lambda: mm(x(), w_pre().to(torch.int8), ONE),
        r"ternary_matmul: w_prepacked must be a 2-D uint8 tensor from prepack_ternary",
    ),
    "ternary_matmul-fp16-scale": (
        lambda: mm(x(), w_pre(), ONE.half()),
        r"ternary_matmul: w_scale must be float32 of shape \[1\] or \[5\], got Half",
    ),
    "ternary_matmul-int-bias": (
        lambda: mm(x(), w_pre(), ONE, torch.ones(5, dtype=torch.int32)),
        r"ternary_matmul: bias must be float32, bfloat16 or float16",
    ),
    "bitlinear-int-w": (
        lambda: ops.bitlinear(x(), torch.ones(5, 7, dtype=torch.int32)),
        r"bitlinear: w must be float32, bfloat16 or float16",
    ),
    # codes outside {-1, 0, 1}
    "pack_ternary-code-2": (
        lambda: ops.pack_ternary(torch.tensor([[0, 2]], dtype=torch.int8)),
        r"pack_ternary: codes must be in \{-1, 0, 1\}",
    ),
    "pack_ternary_base3-code--2": (
        lambda: ops.pack_ternary_base3(torch.tensor([[-2, 0]], dtype=torch.int8)),
        r"pack_ternary_base3: codes must be in \{-1, 0, 1\}",
    ),
    # wrong shape
    "quantize_ternary-1d-w": (lambda: ops.quantize_ternary(torch.ones(4)), r"quantize_ternary: w must be 2-D"),
    "ternary_fake_quant-3d-w": (
        lambda: ops.ternary_fake_quant(torch.ones(2, 3, 4)),
        r"ternary_fake_quant: w must be 2-D",
    ),
    "quantize_activations-0d-x": (
        lambda: ops.quantize_activations(torch.tensor(1.0)),
        r"quantize_activations: x must have at least one dimension",
    ),
    "pack_ternary-1d-codes": (
        lambda: ops.pack_ternary(torch.zeros(4, dtype=torch.int8)),
        r"pack_ternary: codes must be 2-D",
    ),
    "unpack_ternary-3d-packed": (lambda: ops.unpack_ternary(packed()[None], 7), r"unpack_ternary: packed must be 2-D"),
    "ternary_matmul-0d-x": (
        lambda: mm(torch.tensor(1.0), w_pre(), ONE),
        r"ternary_matmul: x must have at least one dimension",
    ),
    "ternary_matmul-1d-w": (lambda: mm(x(), w_pre()[0], ONE), r"ternary_matmul: w_prepacked must be a 2-D uint8"),
    "ternary_matmul-K-mismatch": (
        lambda: mm(x(3, 129), w_pre(5, 7), ONE),
        r"ternary_matmul: x has K=129 features \(x shape \[3, 129\]\) but w_prepacked was "
        r"packed for K=7 \(w_prepacked shape \[6, 32\]\)",
    ),
    "ternary_matmul-K-same-block": (
        lambda: mm(x(2, 120), w_pre(5, 100), ONE),
        r"ternary_matmul: x has K=120 features .* packed for K=100",
    ),
    "ternary_matmul-K-same-block-base3": (
        lambda: mm(x(2, 120), prepacked(codes(5, 100), "base3"), ONE),
        r"ternary_matmul: x has K=120 features .* packed for K=100",
    ),
    "ternary_matmul-scale-length": (
        lambda: mm(x(), w_pre(), torch.ones(2)),
        r"ternary_matmul: w_scale must be float32 of shape \[1\] or \[5\]",
    ),
    "ternary_matmul-scale-2d": (
        lambda: mm(x(), w_pre(), torch.ones(5, 1)),
        r"ternary_matmul: w_scale must be float32 of shape",
    ),
    "ternary_matmul-bias-shape": (
        lambda: mm(x(), w_pre(), ONE, torch.ones(4)),
        r"ternary_matmul: bias must have shape \[5\]",
    ),
    "bitlinear-K-mismatch": (
        lambda: ops.bitlinear(x(3, 6), torch.ones(5, 7)),
        r"bitlinear: x has 6 features but w expects 7",
    ),
    "bitlinear-bias-shape": (
        lambda: ops.bitlinear(x(), torch.ones(5, 7), torch.ones(7)),
        r"bitlinear: bias must have shape \[5\]",
    ),
    # packed tensor of the wrong size, wrong K
    "unpack_ternary-K-too-big": (
        lambda: ops.unpack_ternary(packed(5, 7), 9),
        r"unpack_ternary: K=9 needs 3 bytes per row, packed has 2",
    ),
    "unpack_ternary-K-negative": (lambda: ops.unpack_ternary(packed(5, 7), -1), r"unpack_ternary: K=-1"),
    "unpack_ternary_base3-K-too-small": (
        lambda: ops.unpack_ternary_base3(packed5(5, 7), 5),
        r"unpack_ternary_base3: K=5 needs 1 bytes per row, packed has 2",
    ),
    "unprepack_ternary-K-too-big": (
        lambda: ops.unprepack_ternary(w_pre(5, 7), 129),
        r"unprepack_ternary: K=129 but w_prepacked \(shape \[6, 32\]\) was packed for K=7",
    ),
    "unprepack_ternary-K-negative": (lambda: ops.unprepack_ternary(w_pre(5, 7), -3), r"unprepack_ternary: K=-3"),
    "prepack_ternary-K-too-big": (
        lambda: ops.prepack_ternary(packed(5, 7), 9),
        r"prepack_ternary: K=9 needs 3 bytes per canonical row, packed has 2",
    ),
    "prepack_ternary-bad-layout": (
        lambda: ops.prepack_ternary(packed(5, 7), 7, "3bit"),
        r"prepack_ternary: unknown layout '3bit'; use '2bit' or 'base3'",
    ),
    "prepack_ternary-padding": (
        lambda: ops.prepack_ternary(ops.pack_ternary(-torch.ones(2, 8, dtype=torch.int8)), 6),
        r"prepack_ternary: .*non-zero padding at row 0, element 6 \(is K=6 right\?\)",
    ),
    # not a prepacked tensor: canonical bytes, the headerless format before version 2, views
    "ternary_matmul-w-not-prepacked": (
        lambda: mm(x(), packed(5, 7), ONE),
        r"ternary_matmul: w_prepacked of shape \[5, 2\] has no prepacked header",
    ),
    "ternary_matmul-w-format-1": (
        lambda: mm(x(), headerless(5, 7), ONE),
        r"ternary_matmul: .*has no prepacked header.*older than prepack format 2",
    ),
    "ternary_matmul-row-slice": (
        lambda: mm(x(), w_pre(12, 7)[2:], ONE),
        r"ternary_matmul: w_prepacked has shape \[11, 32\] but its header describes "
        r"N=12, K=7 in the 2bit layout, i.e. shape \[13, 32\]: a slice",
    ),
    "ternary_matmul-row-slice-drops-header": (
        lambda: mm(x(), w_pre(12, 7)[:6], ONE),
        r"ternary_matmul: w_prepacked of shape \[6, 32\] has no prepacked header "
        r"in its last row: .*a slice or view",
    ),
    "ternary_matmul-column-slice": (
        lambda: mm(x(3, 300), w_pre(5, 300)[:, :64], ONE),
        r"ternary_matmul: w_prepacked has shape \[6, 64\] but its header describes "
        r"N=5, K=300 in the 2bit layout, i.e. shape \[6, 96\]",
    ),
    "ternary_matmul-reshape": (
        lambda: mm(x(3, 129), w_pre(5, 129).reshape(12, 32), ONE),
        r"ternary_matmul: w_prepacked of shape \[12, 32\] has no prepacked header",
    ),
    "unprepack_ternary-row-slice": (
        lambda: ops.unprepack_ternary(w_pre(12, 7)[2:], 7),
        r"unprepack_ternary: w_prepacked has shape \[11, 32\] but its header describes",
    ),
    # corrupt or foreign headers
    "ternary_matmul-header-byte": (
        lambda: mm(x(), with_byte(w_pre(5, 7), (-1, 9), 1), ONE),
        r"ternary_matmul: the header of w_prepacked \(shape \[6, 32\]\) is corrupt",
    ),
    "ternary_matmul-header-checksum": (
        lambda: mm(x(), with_byte(w_pre(5, 7), (-1, 30), 0), ONE),
        r"ternary_matmul: the header .* is corrupt: its checksum does not match",
    ),
    "ternary_matmul-header-version": (
        lambda: mm(x(), with_header(w_pre(5, 7), 4, 3), ONE),
        r"ternary_matmul: w_prepacked has prepack format version 3; this build reads "
        r"version 2",
    ),
    "ternary_matmul-header-layout": (
        lambda: mm(x(), with_header(w_pre(5, 7), 5, 9), ONE),
        r"ternary_matmul: w_prepacked names layout 9, which this build does not know",
    ),
    "ternary_matmul-header-tile": (
        lambda: mm(x(), with_header(w_pre(5, 7), 6, 4), ONE),
        r"ternary_matmul: w_prepacked was laid out in tiles of 4 rows; this build's kernels "
        r"read tiles of 8",
    ),
    "ternary_matmul-header-other-layout": (
        lambda: mm(x(3, 300), with_header(w_pre(5, 300), 5, 2), ONE),
        r"header describes N=5, K=300 in the base3 layout, i.e. shape \[6, 65\]",
    ),
    # corrupt packed bytes
    "unpack_ternary-code-3": (
        lambda: ops.unpack_ternary(with_byte(packed(5, 7), (2, 0), 0b11), 7),
        r"unpack_ternary: corrupt packed ternary tensor: invalid code 3 at row 2, element 0",
    ),
    "unpack_ternary-padding": (
        lambda: ops.unpack_ternary(with_byte(packed(5, 7), (4, 1), 0b10_010101), 7),
        r"unpack_ternary: corrupt packed ternary tensor: non-zero padding at row 4, element 7",
    ),
    "unpack_ternary-wrong-K": (
        lambda: ops.unpack_ternary(ops.pack_ternary(-torch.ones(2, 8, dtype=torch.int8)), 6),
        r"unpack_ternary: .*non-zero padding at row 0, element 6 \(is K=6 right\?\)",
    ),
    "unpack_ternary_base3-byte-243": (
        lambda: ops.unpack_ternary_base3(with_byte(packed5(5, 7), (1, 0), 243), 7),
        r"unpack_ternary_base3: corrupt base-3 tensor: byte 243 > 242 at row 1, byte 0",
    ),
    "unpack_ternary_base3-byte-255": (
        lambda: ops.unpack_ternary_base3(with_byte(packed5(5, 7), (0, 1), 255), 7),
        r"unpack_ternary_base3: corrupt base-3 tensor: byte 255 > 242",
    ),
    "unpack_ternary_base3-padding": (
        lambda: ops.unpack_ternary_base3(with_byte(packed5(5, 7), (3, 1), 0), 7),
        r"unpack_ternary_base3: corrupt base-3 tensor: non-zero padding at row 3",
    ),
    "prepack_ternary-code-3": (
        lambda: ops.prepack_ternary(with_byte(packed(5, 7), (0, 1), 0xFF)),
        r"prepack_ternary: corrupt packed ternary tensor: invalid code 3",
    ),
    "unprepack_ternary-code-3": (
        lambda: ops.unprepack_ternary(with_byte(w_pre(5, 7), (0, 3), 0xFF), 7),
        r"unprepack_ternary: corrupt prepacked tensor: invalid code 3",
    ),
    # activation bits out of range
    "quantize_activations-bits-1": (
        lambda: ops.quantize_activations(x(), 1),
        r"quantize_activations: bits must be in \[2, 8\], got 1",
    ),
    "quantize_activations-bits-9": (
        lambda: ops.quantize_activations(x(), 9),
        r"quantize_activations: bits must be in \[2, 8\], got 9",
    ),
    "act_fake_quant-bits-0": (lambda: ops.act_fake_quant(x(), 0), r"bits must be in \[2, 8\], got 0"),
    "ternary_matmul-act_bits-16": (
        lambda: mm(x(), w_pre(), ONE, act_bits=16),
        r"ternary_matmul: bits must be in \[2, 8\], got 16",
    ),
    "ternary_matmul-act_bits--1": (
        lambda: mm(x(), w_pre(), ONE, act_bits=-1),
        r"ternary_matmul: bits must be in \[2, 8\], got -1",
    ),
    # non-finite weights cannot be quantized
    "quantize_ternary-nan": (lambda: ops.quantize_ternary(NAN_W), r"quantize_ternary: w contains NaN or Inf"),
    "quantize_ternary-nan-per-channel": (
        lambda: ops.quantize_ternary(NAN_W, True),
        r"quantize_ternary: w contains NaN or Inf",
    ),
    "quantize_ternary-inf": (lambda: ops.quantize_ternary(INF_W), r"quantize_ternary: w contains NaN or Inf"),
    "quantize_ternary-nan-bf16": (
        lambda: ops.quantize_ternary(NAN_W.bfloat16()),
        r"quantize_ternary: w contains NaN or Inf",
    ),
    "ternary_fake_quant-nan": (lambda: ops.ternary_fake_quant(NAN_W), r"ternary_fake_quant: w contains NaN or Inf"),
    "bitlinear-nan-w": (lambda: ops.bitlinear(x(3, 2), NAN_W), r"bitlinear: w contains NaN or Inf"),
    # finite, but too large for an fp32 mean: named as such, not as NaN or Inf
    "quantize_ternary-huge": (lambda: ops.quantize_ternary(torch.full((2, 4), 3e38)), r"mean \|w\| overflows fp32"),
    "quantize_ternary-huge-per-channel": (
        lambda: ops.quantize_ternary(torch.full((2, 4), 3e38), True),
        r"mean \|w\| overflows fp32",
    ),
}


@pytest.mark.parametrize("call, match", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize(
    "unpack, pack, col, byte, message",
    [
        (ops.unpack_ternary, ops.pack_ternary, 0, 0b11, "invalid code 3"),
        (ops.unpack_ternary, ops.pack_ternary, 1, 0b10_010101, "non-zero padding"),
        (ops.unpack_ternary_base3, ops.pack_ternary_base3, 0, 243, "byte 243 > 242"),
        (ops.unpack_ternary_base3, ops.pack_ternary_base3, 1, 0, "non-zero padding"),
    ],
    ids=["2bit-code-3", "2bit-padding", "base3-byte-243", "base3-padding"],
)
def test_corruption_is_found_in_every_row(unpack, pack, col, byte, message):
    # A validation that looked at only some rows (the first, or one per thread) would pass
    # the single-row cases above by luck; the message must also name the right row.
    for row in range(5):
        bad = with_byte(pack(codes(5, 7)), (row, col), byte)
        with pytest.raises(RuntimeError, match=f"{message}.* at row {row}"):
            unpack(bad, 7)


@pytest.mark.parametrize("byte, code", [(0, -1), (121, 0), (242, 1)])
def test_base3_accepts_the_extreme_valid_bytes(byte, code):
    # 0 is five codes -1, 121 = 1+3+9+27+81 five 0s, 242 = 2 * 121 five +1s: the largest valid byte.
    assert ops.unpack_ternary_base3(torch.tensor([[byte]], dtype=torch.uint8), 5).tolist() == [[code] * 5]


# --- ISA and backend switches -------------------------------------------------------------


@pytest.mark.skipif(supported_isas() == ISA_ORDER, reason="this CPU supports every ISA")
def test_set_isa_refuses_an_unsupported_isa():
    unsupported = ISA_ORDER[len(supported_isas())]
    with pytest.raises(RuntimeError, match=f"cannot use ISA {unsupported}: this CPU supports at most"):
        ops.set_isa(unsupported)
    assert ops.cpu_info()["isa"] == ops.cpu_info()["detected_isa"]


def test_set_isa_refuses_an_unknown_name():
    with pytest.raises(RuntimeError, match="unknown ISA 'sse2'; use one of scalar, avx2, avx512"):
        ops.set_isa("sse2")


def test_popcount_backend_refuses_base3_weights(monkeypatch):
    monkeypatch.setenv("AGENTFORGE_BACKEND", "popcount")
    with pytest.raises(RuntimeError, match="the popcount backend reads the 2bit layout and these weights are base3"):
        mm(x(), prepacked(codes(5, 7), "base3"), ONE)


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("AGENTFORGE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="AGENTFORGE_BACKEND='cuda' is not one of auto, int8, popcount"):
        mm(x(), w_pre(), ONE)


# --- devices ------------------------------------------------------------------------------

MIXED_DEVICE_CALLS = {
    "ternary_matmul-meta-x": lambda: mm(x().to("meta"), w_pre(), ONE),
    "ternary_matmul-meta-w": lambda: mm(x(), w_pre().to("meta"), ONE),
    "ternary_matmul-meta-scale": lambda: mm(x(), w_pre(), ONE.to("meta")),
    "ternary_matmul-meta-bias": lambda: mm(x(), w_pre(), ONE, torch.ones(5, device="meta")),
    "bitlinear-meta-x": lambda: ops.bitlinear(x().to("meta"), torch.randn(5, 7)),
    "bitlinear-meta-w": lambda: ops.bitlinear(x(), torch.randn(5, 7, device="meta")),
    "bitlinear-meta-bias": lambda: ops.bitlinear(x(), torch.randn(5, 7), torch.ones(5, device="meta")),
}


@pytest.mark.parametrize("call", MIXED_DEVICE_CALLS.values(), ids=MIXED_DEVICE_CALLS.keys())
def test_mixed_devices_raise(call):
    with pytest.raises(RuntimeError, match="device"):
        call()


# --- empty tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("N, K", [(0, 5), (3, 0), (0, 0)])
def test_quantize_ternary_empty(N, K, per_channel):
    codes, scale = ops.quantize_ternary(torch.randn(N, K), per_channel)
    assert codes.shape == (N, K) and codes.dtype == torch.int8
    assert_same(scale, torch.full((N if per_channel else 1,), 1e-5))  # the mean of nothing counts as 0


@pytest.mark.parametrize("N, K", [(0, 5), (3, 0), (0, 0)])
def test_pack_ops_empty(N, K):
    c = torch.zeros(N, K, dtype=torch.int8)
    p, p5 = ops.pack_ternary(c), ops.pack_ternary_base3(c)
    assert p.shape == (N, -(-K // 4)) and p5.shape == (N, -(-K // 5))
    pre = ops.prepack_ternary(p, K)
    assert pre.shape == (N + 1, max(-(-K // 128) * 32, 32))
    assert ops.prepack_ternary(p, K, "base3").shape == (N + 1, max(-(-K // 160) * 32, 32) + 1)
    assert_same(ops.unpack_ternary(p, K), c)
    assert_same(ops.unpack_ternary_base3(p5, K), c)
    assert_same(ops.unprepack_ternary(pre, K), p)


@pytest.mark.parametrize("lead, K", [((0,), 5), ((2, 0), 129), ((0, 3), 7)])
def test_quantize_activations_empty_batch(lead, K):
    q, scale, row_sum = ops.quantize_activations(torch.randn(*lead, K), 8, return_row_sum=True)
    assert q.shape == (*lead, K) and scale.shape == lead and row_sum.shape == lead
    assert ops.act_fake_quant(torch.randn(*lead, K)).shape == (*lead, K)


@pytest.mark.parametrize("lead, N, K", [((0,), 5, 129), ((2, 0), 5, 7), ((3,), 0, 129), ((0,), 0, 7)])
def test_matmul_and_bitlinear_empty(isa, backend, lead, N, K):
    y = mm(x(*lead, K), w_pre(N, K), ONE, torch.ones(N))
    assert y.shape == (*lead, N) and y.dtype == torch.float32
    assert ops.bitlinear(x(*lead, K), torch.randn(N, K), torch.ones(N)).shape == (*lead, N)


@pytest.mark.parametrize("lead", [(3,), (0,), (2, 4)])
def test_quantize_activations_zero_features(lead):
    q, scale = ops.quantize_activations(torch.randn(*lead, 0))
    assert q.shape == (*lead, 0) and scale.shape == lead


@pytest.mark.parametrize("op", ["ternary_matmul", "bitlinear", "act_fake_quant"])
def test_zero_features(op):
    # y = x @ w^T with K = 0 is an all-zero [M, N] (plus bias), as F.linear gives.
    x0, bias = torch.randn(3, 0), torch.arange(4.0)
    calls = {
        "ternary_matmul": lambda: mm(x0, w_pre(4, 0), ONE, bias),
        "bitlinear": lambda: ops.bitlinear(x0, torch.randn(4, 0), bias),
        "act_fake_quant": lambda: ops.act_fake_quant(x0),
    }
    expected = {"act_fake_quant": x0}.get(op, bias.expand(3, 4))
    assert_same(calls[op](), expected)


REFERENCE_PACK_FNS = {
    "pack_ternary": lambda: ref.pack_ternary(torch.zeros(0, 5, dtype=torch.int8)),
    "pack_ternary_base3": lambda: ref.pack_ternary_base3(torch.zeros(0, 5, dtype=torch.int8)),
    "unpack_ternary": lambda: ref.unpack_ternary(torch.zeros(0, 2, dtype=torch.uint8), 5),
    "unpack_ternary_base3": lambda: ref.unpack_ternary_base3(torch.zeros(0, 1, dtype=torch.uint8), 5),
    "prepack_ternary": lambda: ref.prepack_ternary(torch.zeros(0, 2, dtype=torch.uint8), 5)[:-1],  # the header row
    "unprepack_ternary": lambda: ref.unprepack_ternary(ref.prepack_ternary(torch.zeros(0, 2, dtype=torch.uint8), 5), 5),
}


@pytest.mark.parametrize("call", REFERENCE_PACK_FNS.values(), ids=REFERENCE_PACK_FNS.keys())
def test_reference_pack_ops_take_zero_rows(call):
    assert call().shape[0] == 0


@pytest.mark.parametrize("op", ["ternary_matmul", "bitlinear"])
def test_k_beyond_exact_accumulation_is_refused(op):
    K = 1 << 21  # the AVX-512 GEMV's plane accumulators are exact below this
    x_big = torch.ones(1, K)
    call = (
        (lambda: mm(x_big, w_pre(1, K), ONE))
        if op == "ternary_matmul"
        else (lambda: ops.bitlinear(x_big, torch.ones(1, K)))
    )
    with pytest.raises(RuntimeError, match=rf"{op}: K={K} is too large"):
        call()


# --- fake kernels refuse what the real kernels refuse ---------------------------------------

# Calls whose error is decided by shapes, dtypes and ranges alone, so torch.compile's fake
# kernels must raise too (a fake kernel cannot read the header: the exact-K cases are above).
SHAPE_ERRORS = {
    "K-300-vs-1-block": (lambda: (x(3, 300), w_pre(5, 100), ONE, None, 8)),
    "K-129-vs-1-block": (lambda: (x(3, 129), w_pre(5, 7), ONE, None, 8)),
    "K-161-vs-1-base3-block": (lambda: (x(3, 161), prepacked(codes(5, 7), "base3"), ONE, None, 8)),
    "headerless-rows": (lambda: (x(), packed(5, 7), ONE, None, 8)),
    "1d-w": (lambda: (x(), w_pre()[0], ONE, None, 8)),
    "int8-w": (lambda: (x(), w_pre().to(torch.int8), ONE, None, 8)),
    "scale-length": (lambda: (x(), w_pre(), torch.ones(2), None, 8)),
    "scale-dtype": (lambda: (x(), w_pre(), ONE.half(), None, 8)),
    "bias-shape": (lambda: (x(), w_pre(), ONE, torch.ones(4), 8)),
    "act-bits": (lambda: (x(), w_pre(), ONE, None, 9)),
    "int-x": (lambda: (torch.ones(3, 7, dtype=torch.int32), w_pre(), ONE, None, 8)),
    "0d-x": (lambda: (torch.tensor(1.0), w_pre(), ONE, None, 8)),
}


@pytest.mark.parametrize("make_args", SHAPE_ERRORS.values(), ids=SHAPE_ERRORS.keys())
def test_fake_kernel_refuses_what_the_kernel_refuses(make_args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = make_args()
    with pytest.raises(RuntimeError):
        mm(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError):
            torch.ops.agentforge.ternary_matmul(*fake)


def test_fake_kernels_give_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for layout in ("2bit", "base3"):
        p = packed(9, 300)
        real = ops.prepack_ternary(p, 300, layout)
        with FakeTensorMode() as mode:
            fake_p = mode.from_tensor(p)
            assert torch.ops.agentforge.prepack_ternary(fake_p, 300, layout).shape == real.shape
            fake_w = mode.from_tensor(real)
            assert torch.ops.agentforge.unprepack_ternary(fake_w, 300).shape == (9, 75)
            assert torch.ops.agentforge.ternary_matmul(
                mode.from_tensor(x(2, 300)), fake_w, mode.from_tensor(ONE)
            ).shape == (2, 9)
