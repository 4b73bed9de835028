"""The pure-PyTorch references as a fallback: same STE gradients as the kernels' autograd, and
`agentforge.ops` running on them (with one warning) when the extension cannot be imported."""

import subprocess
import sys
import textwrap

import pytest
import torch

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import prepacked, random_activations, random_codes


def _grads(fn, *tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    fn(*leaves).backward(grad_out)
    return [t.grad for t in leaves if t.is_floating_point()]


@pytest.mark.parametrize("per_channel", [False, True])
def test_bitlinear_gradients_match_kernel(per_channel):
    x, w, bias = random_activations((2, 3, 129)), torch.randn(5, 129), torch.randn(5)
    g = torch.randn(2, 3, 5)
    for kernel, oracle in zip(
        _grads(lambda *a: ops.bitlinear(*a, per_channel), x, w, bias, grad_out=g),
        _grads(lambda *a: ref.bitlinear(*a, per_channel), x, w, bias, grad_out=g),
    ):
        torch.testing.assert_close(kernel, oracle)


@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_matmul_gradients_match_kernel(per_channel):
    x, codes, bias = random_activations((4, 300)), random_codes(6, 300), torch.randn(6)
    scale = torch.rand(6 if per_channel else 1) + 0.1
    g = torch.randn(4, 6)
    w_pre = prepacked(codes)
    kernel = _grads(lambda x, b: ops.ternary_matmul(x, w_pre, scale, b), x, bias, grad_out=g)
    oracle = _grads(lambda x, b: ref.ternary_matmul(x, w_pre, scale, b), x, bias, grad_out=g)
    for k, o in zip(kernel, oracle):
        torch.testing.assert_close(k, o)


@pytest.mark.parametrize("op, arg", [("ternary_fake_quant", True), ("act_fake_quant", 4)])
def test_fake_quant_reference_is_straight_through(op, arg):
    t = torch.randn(3, 129, requires_grad=True)
    g = torch.randn(3, 129)
    getattr(ref, op)(t, arg).backward(g)
    torch.testing.assert_close(t.grad, g, rtol=0, atol=0)


def test_ops_fall_back_to_reference_without_extension():
    # A fresh interpreter in which `agentforge._C` cannot be imported, as after a broken build.
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["agentforge._C"] = None  # makes `from agentforge import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from agentforge import ops
        assert not ops.extension_loaded()
        assert sum("native extension not loaded" in str(w.message) for w in caught) == 1, caught
        w = torch.randn(8, 130, requires_grad=True)
        x = torch.randn(3, 130, requires_grad=True)
        ops.bitlinear(x, w).square().sum().backward()
        assert w.grad.abs().sum() > 0 and x.grad.abs().sum() > 0  # STE, not round()'s zero gradient
        codes, scale = ops.quantize_ternary(w.detach())
        for layout in ("2bit", "base3"):
            y = ops.ternary_matmul(x.detach(), ops.prepack_ternary(ops.pack_ternary(codes), 130, layout), scale)
            torch.testing.assert_close(y, ops.bitlinear(x.detach(), w.detach()), rtol=0, atol=0)
        assert ops.cold_layout(8, 130) == "2bit"  # nothing to measure without the kernels
        print("fallback ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stdout + result.stderr
