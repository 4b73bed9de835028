"""quantize_ternary (absmean weights) and quantize_activations (absmax per token): exact
agreement with the reference, hand-computed answers, layouts and opcheck."""

import pytest
import torch
from torch.library import opcheck

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import FLOAT_DTYPES, LAYOUTS, assert_same, make_layout, random_activations

WEIGHT_SHAPES = [(1, 1), (1, 1000), (3, 5), (4, 128), (5, 127), (17, 129), (64, 300), (2, 513)]
ACT_SHAPES = [(1,), (1, 1), (3, 5), (1, 1000), (7, 129), (2, 3, 300), (2, 1, 4, 513)]
ALL_BITS = range(2, 9)


# --- quantize_ternary -------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_quantize_ternary_matches_reference(shape, dtype, per_channel):
    w = torch.randn(shape).to(dtype)
    codes, scale = ops.quantize_ternary(w, per_channel)
    ref_codes, ref_scale = ref.quantize_ternary(w, per_channel)
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)
    assert scale.shape == ((shape[0],) if per_channel else (1,))


def test_quantize_ternary_known_answer():
    # mean|w| = 5.09 / 6, so w / scale = [0, 0.35, -0.35, 2.36, -2.36, 0.58]
    w = torch.tensor([[0.0, 0.3, -0.3, 2.0, -2.0, 0.49]])
    codes, scale = ops.quantize_ternary(w)
    assert codes.tolist() == [[0, 0, 0, 1, -1, 1]]
    torch.testing.assert_close(scale, torch.tensor([5.09 / 6]))


def test_quantize_ternary_per_channel_scales_rows_independently():
    # A per-tensor scale is dominated by the large row and zeroes the small one; per-channel is not.
    w = torch.tensor([[1000.0, 1000.0, -1000.0, 1000.0], [1e-3, -1e-3, 0.0, 0.0]])
    per_tensor, _ = ops.quantize_ternary(w, per_channel=False)
    per_row, scale = ops.quantize_ternary(w, per_channel=True)
    assert per_tensor.tolist() == [[1, 1, -1, 1], [0, 0, 0, 0]]
    assert per_row.tolist() == [[1, 1, -1, 1], [1, -1, 0, 0]]
    torch.testing.assert_close(scale, torch.tensor([1000.0, 5e-4]))


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_ternary_zero_weights_get_eps_scale(per_channel):
    codes, scale = ops.quantize_ternary(torch.zeros(3, 7), per_channel)
    assert not codes.any()
    assert_same(scale, torch.full((3 if per_channel else 1,), 1e-5))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantize_ternary_ignores_memory_layout(layout, per_channel):
    w = torch.randn(129, 300)
    codes, scale = ops.quantize_ternary(make_layout(w, layout), per_channel)
    ref_codes, ref_scale = ref.quantize_ternary(w, per_channel)
    assert_same(codes, ref_codes)
    assert_same(scale, ref_scale)


def paper_weight_quant(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The BitNet b1.58 weight quantizer as the paper's code writes it, per tensor or per row:
    scale = 1 / mean|w|.clamp(min=1e-5); codes = (w * scale).round().clamp(-1, 1)."""
    wf = w.float()
    scale = (wf.abs().mean(dim=-1, keepdim=True) if per_channel else wf.abs().mean()).clamp(min=1e-5)
    inv = 1.0 / scale
    return (wf * inv).round().clamp(-1, 1).to(torch.int8), scale.reshape(-1)


ODD_WEIGHT_SHAPES = [(1, 1000), (3, 4099), (17, 129), (129, 1000), (7, 2049), (1000, 3)]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", ODD_WEIGHT_SHAPES)
def test_quantize_ternary_is_the_paper_formula_bit_for_bit(shape, per_channel):
    # Weights of mixed magnitudes, some rows tiny (they hit the 1e-5 floor per channel).
    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).pow(4)
    w[0] *= 1e-7
    codes, scale = ops.quantize_ternary(w, per_channel)
    want_codes, want_scale = paper_weight_quant(w, per_channel)
    assert_same(codes, want_codes)
    assert_same(scale, want_scale)
    inv = 1.0 / (want_scale[:, None] if per_channel else want_scale)
    assert_same(ops.ternary_fake_quant(w, per_channel), want_codes.float() / inv)


@pytest.mark.parametrize("shape", ODD_WEIGHT_SHAPES)
def test_ternary_fake_quant_equals_transformers_weight_quant(shape):
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    # WeightQuant.forward is @torch.compile'd; its undecorated body is the reference code itself.
    forward = bitnet.WeightQuant.forward
    forward = getattr(forward, "_torchdynamo_orig_callable", getattr(forward, "__wrapped__", forward))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 0.02
    for dtype in (torch.float32, torch.bfloat16):
        assert_same(ops.ternary_fake_quant(w.to(dtype)), forward(None, w.to(dtype)))


def test_quantize_ternary_no_longer_adds_eps_to_the_scale():
    # mean|w| + 1e-5 moved codes that sit near a rounding boundary; the reference clamps instead.
    w = torch.tensor([[0.5, -0.5, 1.5, 1.5]])  # mean 1.0: w / scale = [0.5, -0.5, 1.5, 1.5]
    codes, scale = ops.quantize_ternary(w)
    assert scale.item() == 1.0 and codes.tolist() == [[0, 0, 1, 1]]  # half to even: 0.5 -> 0


def test_reference_quantize_ternary_ignores_memory_layout():
    w = torch.randn(300, 129)
    assert_same(ref.quantize_ternary(make_layout(w, "transposed"))[1], ref.quantize_ternary(w)[1])


# --- quantize_activations ---------------------------------------------------------------


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_quantize_activations_matches_reference(shape, dtype, bits):
    x = random_activations(shape, dtype)
    x_q, scale, row_sum = ops.quantize_activations(x, bits, return_row_sum=True)
    for actual, expected in zip((x_q, scale, row_sum), ref.quantize_activations(x, bits)):
        assert_same(actual, expected)
    qmax = 2 ** (bits - 1) - 1
    assert -qmax - 1 <= x_q.min() and x_q.max() <= qmax
    assert_same(row_sum, x_q.sum(-1, dtype=torch.int32))


def test_quantize_activations_known_answer():
    # absmax 127 makes the 8-bit scale exactly 1, so x * scale = x: ties round half to even.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -126.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    x_q, scale, row_sum = ops.quantize_activations(x, 8, return_row_sum=True)
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -126], [0, 0, 0, 0, 0, 0]]
    assert_same(scale, torch.tensor([1.0, 127 / 1e-5]))  # an all-zero token uses absmax = eps
    assert row_sum.tolist() == [5, 0]


@pytest.mark.parametrize(
    "bits, expected", [(2, [1, -1, 0, 0, 0]), (4, [7, -7, 2, -2, 4]), (8, [127, -127, 32, -32, 64])]
)
def test_quantize_activations_bits_set_the_range(bits, expected):
    x = torch.tensor([1.0, -1.0, 0.25, -0.25, 0.5])
    x_q, scale = ops.quantize_activations(x, bits)
    assert x_q.tolist() == expected
    assert scale.item() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantize_activations_ignores_memory_layout(layout):
    x = random_activations((9, 300))
    for actual, expected in zip(
        ops.quantize_activations(make_layout(x, layout), 4, return_row_sum=True), ref.quantize_activations(x, 4)
    ):
        assert_same(actual, expected)


# --- opcheck ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param((torch.randn(5, 7), False), id="per-tensor"),
        pytest.param((torch.randn(5, 129, dtype=torch.bfloat16), True), id="per-channel-bf16"),
        pytest.param((torch.randn(1, 1, dtype=torch.float16), False), id="1x1-fp16"),
    ],
)
def test_opcheck_quantize_ternary(args):
    opcheck(torch.ops.agentforge.quantize_ternary.default, args)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param((torch.randn(3, 129), 8), id="2d"),
        pytest.param((torch.randn(2, 3, 5, dtype=torch.bfloat16), 4), id="3d-bf16"),
        pytest.param((torch.randn(7, dtype=torch.float16), 2), id="1d-fp16"),
    ],
)
def test_opcheck_quantize_activations(args):
    opcheck(torch.ops.agentforge.quantize_activations.default, args)


@pytest.mark.parametrize(
    "op, args",
    [
        pytest.param("quantize_ternary", (False,), id="quantize_ternary"),
        pytest.param("quantize_activations", (8,), id="quantize_activations"),
    ],
)
def test_opcheck_quantize_noncontiguous(op, args):
    opcheck(getattr(torch.ops.agentforge, op).default, (make_layout(torch.randn(5, 7), "transposed"), *args))
