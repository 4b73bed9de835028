"""The fused bitlinear training op: forward bit-exact against the reference and against the
unfused quantize -> pack -> ternary_matmul path; STE gradients against their formula;
opcheck; torch.compile without graph breaks."""

import pytest
import torch
from torch.library import opcheck

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import FLOAT_DTYPES, LAYOUTS, assert_same, make_layout, prepacked, random_activations

# (leading dims of x, N, K): GEMV and GEMM rows, partial row tiles, odd K, a 3-D batch.
SHAPES = [((1,), 1, 1), ((3,), 5, 127), ((5,), 4, 129), ((2, 3), 7, 300), ((4,), 2, 1000)]


def make_inputs(lead, N, K, dtype=torch.float32, with_bias=False):
    x = random_activations((*lead, K), dtype)
    w = torch.randn(N, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    return x, w, bias


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lead, N, K", SHAPES)
def test_forward_matches_reference(isa, backend, lead, N, K, dtype, per_channel, with_bias):
    x, w, bias = make_inputs(lead, N, K, dtype, with_bias)
    y = ops.bitlinear(x, w, bias, per_channel)
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert_same(y, ref.bitlinear(x, w, bias, per_channel))


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_forward_equals_unfused_path(isa, backend, per_channel):
    # What nn.BitLinear's packed state will compute from the same weights.
    x, w, bias = make_inputs((2, 3), 9, 513, with_bias=True)
    codes, scale = ops.quantize_ternary(w, per_channel)
    assert_same(ops.bitlinear(x, w, bias, per_channel), ops.ternary_matmul(x, prepacked(codes), scale, bias, 8))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_ignores_memory_layout(layout):
    x, w, bias = make_inputs((6,), 5, 300, with_bias=True)
    y = ops.bitlinear(make_layout(x, layout), make_layout(w, layout), make_layout(bias, layout), True)
    assert_same(y, ops.bitlinear(x, w, bias, True))


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead, N, K", [((5,), 4, 129), ((2, 3), 7, 300)])
def test_ste_gradients_follow_formula(lead, N, K, dtype, per_channel):
    x, w, bias = make_inputs(lead, N, K, dtype, with_bias=True)
    for t in (x, w, bias):
        t.requires_grad_()
    grad_y = torch.randn(*lead, N).to(dtype)
    ops.bitlinear(x, w, bias, per_channel).backward(grad_y)
    # y = Q_a(x) Q_w(w)^T + b with the quantizers' Jacobians taken as the identity.
    g2d = grad_y.reshape(-1, N)
    torch.testing.assert_close(x.grad, grad_y @ ops.ternary_fake_quant(w.detach(), per_channel))
    torch.testing.assert_close(w.grad, g2d.t() @ ops.act_fake_quant(x.detach(), 8).reshape(-1, K))
    torch.testing.assert_close(bias.grad, g2d.sum(0))


def test_gradients_only_for_inputs_that_need_them():
    x, w, _ = make_inputs((3,), 4, 129)
    w.requires_grad_()
    ops.bitlinear(x, w).sum().backward()
    assert x.grad is None and w.grad is not None and w.grad.shape == w.shape


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(((3,), 5, 129, torch.float32, False, False), id="2d"),
        pytest.param(((2, 3), 4, 7, torch.bfloat16, True, True), id="3d-bf16-per-channel-bias"),
        pytest.param(((1,), 1, 1, torch.float16, False, True), id="1x1-fp16-bias"),
    ],
)
def test_opcheck(case, requires_grad):
    lead, N, K, dtype, per_channel, with_bias = case
    x, w, bias = make_inputs(lead, N, K, dtype, with_bias)
    for t in (x, w, bias):
        if t is not None:
            t.requires_grad_(requires_grad)
    opcheck(torch.ops.agentforge.bitlinear.default, (x, w, bias, per_channel))


def test_compiles_without_graph_breaks():
    # aot_eager traces forward and backward through the fake kernels and autograd formulas
    # (what inductor would see) without needing a C++ compiler at test time.
    x, w, bias = make_inputs((2, 3), 5, 129, with_bias=True)

    def step(x, w, bias):
        return ops.bitlinear(x, w, bias).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (step, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for eager, traced in zip(*grads):
        assert_same(traced, eager)
