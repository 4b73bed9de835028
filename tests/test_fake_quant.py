"""ternary_fake_quant and act_fake_quant: forward equals quantize-then-dequantize exactly
(and the reference), backward is the identity (straight-through estimator), opcheck."""

import pytest
import torch
from torch.library import opcheck

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import FLOAT_DTYPES, LAYOUTS, assert_same, make_layout, random_activations

WEIGHT_SHAPES = [(1, 1), (3, 5), (17, 129), (4, 1000)]
ACT_SHAPES = [(1,), (3, 5), (7, 129), (2, 3, 513)]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_ternary_fake_quant_is_quantize_dequantize(shape, dtype, per_channel):
    w = torch.randn(shape).to(dtype)
    w_q = ops.ternary_fake_quant(w, per_channel)
    assert_same(w_q, ref.ternary_fake_quant(w, per_channel))
    codes, scale = ops.quantize_ternary(w, per_channel)
    inv = 1.0 / (scale[:, None] if per_channel else scale)
    assert_same(w_q, (codes.float() / inv).to(dtype))  # code / (1 / scale), as the reference code


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_act_fake_quant_is_quantize_dequantize(shape, dtype, bits):
    x = random_activations(shape, dtype)
    x_q = ops.act_fake_quant(x, bits)
    assert_same(x_q, ref.act_fake_quant(x, bits))
    q, scale = ops.quantize_activations(x, bits)
    assert_same(x_q, (q.float() / scale[..., None]).to(dtype))


def test_act_fake_quant_known_answer():
    # 2 bits: Qp = 1, scale = Qp / absmax = 1/4, so x * scale rounds to {-1, 0, 1} and back to {-4, 0, 4}.
    x = torch.tensor([4.0, -4.0, 1.9, 2.1, -4.0])
    assert ops.act_fake_quant(x, 2).tolist() == [4.0, -4.0, 0.0, 4.0, -4.0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_quant_ignores_memory_layout(layout):
    w, x = torch.randn(9, 300), random_activations((9, 300))
    assert_same(ops.ternary_fake_quant(make_layout(w, layout), True), ops.ternary_fake_quant(w, True))
    assert_same(ops.act_fake_quant(make_layout(x, layout), 4), ops.act_fake_quant(x, 4))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("op, arg", [("ternary_fake_quant", True), ("act_fake_quant", 4)])
def test_backward_is_identity(op, arg, dtype):
    # The STE: quantization is treated as the identity, so the incoming gradient passes unchanged.
    x = torch.randn(2, 3, 129).to(dtype) if op == "act_fake_quant" else torch.randn(5, 129).to(dtype)
    x.requires_grad_()
    grad = torch.randn_like(x)
    getattr(ops, op)(x, arg).backward(grad)
    assert_same(x.grad, grad)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize(
    "args",
    [
        pytest.param((torch.randn(5, 7), False), id="per-tensor"),
        pytest.param((torch.randn(4, 129, dtype=torch.bfloat16), True), id="per-channel-bf16"),
    ],
)
def test_opcheck_ternary_fake_quant(args, requires_grad):
    w, per_channel = args
    opcheck(torch.ops.agentforge.ternary_fake_quant.default, (w.clone().requires_grad_(requires_grad), per_channel))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize(
    "args",
    [
        pytest.param((torch.randn(3, 129), 8), id="2d"),
        pytest.param((torch.randn(2, 3, 5, dtype=torch.float16), 2), id="3d-fp16"),
    ],
)
def test_opcheck_act_fake_quant(args, requires_grad):
    x, bits = args
    opcheck(torch.ops.agentforge.act_fake_quant.default, (x.clone().requires_grad_(requires_grad), bits))


@pytest.mark.parametrize("op, arg", [("ternary_fake_quant", False), ("act_fake_quant", 8)])
def test_opcheck_fake_quant_noncontiguous(op, arg):
    opcheck(getattr(torch.ops.agentforge, op).default, (make_layout(torch.randn(5, 7), "transposed"), arg))
