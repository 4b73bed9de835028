"""Fake (meta) kernels and autograd formulas for torch.ops.agentforge.*.

Fake kernels give torch.compile and FakeTensor the output shapes without running a kernel;
the autograd formulas are the straight-through estimator (STE): quantization passes the
gradient through unchanged.
"""
import torch

from agentforge.ops.reference import BLOCK_K, _ceil_div

LIB = "agentforge"


def _fake(name):
    return torch.library.register_fake(f"{LIB}::{name}")


@_fake("quantize_ternary")
def _(w, per_channel=False):
    torch._check(w.dim() == 2, lambda: "agentforge.quantize_ternary: w must be 2-D")
    return (torch.empty_like(w, dtype=torch.int8),
            w.new_empty(w.shape[0] if per_channel else 1, dtype=torch.float32))


@_fake("quantize_activations")
def _(x, bits=8):
    lead = x.shape[:-1]
    return (torch.empty_like(x, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.int32))


@_fake("pack_ternary")
def _(codes):
    return codes.new_empty(codes.shape[0], _ceil_div(codes.shape[1], 4), dtype=torch.uint8)


@_fake("unpack_ternary")
def _(packed, K):
    return packed.new_empty(packed.shape[0], K, dtype=torch.int8)


@_fake("pack_ternary_base3")
def _(codes):
    return codes.new_empty(codes.shape[0], _ceil_div(codes.shape[1], 5), dtype=torch.uint8)


@_fake("unpack_ternary_base3")
def _(packed, K):
    return packed.new_empty(packed.shape[0], K, dtype=torch.int8)


@_fake("prepack_ternary")
def _(packed):
    return packed.new_empty(packed.shape[0], _ceil_div(packed.shape[1] * 4, BLOCK_K) * 32)


@_fake("unprepack_ternary")
def _(w_prepacked, K):
    return w_prepacked.new_empty(w_prepacked.shape[0], _ceil_div(K, 4))


@_fake("ternary_matmul")
def _(x, w_prepacked, w_scale, bias=None, act_bits=8):
    torch._check(w_prepacked.dim() == 2, lambda: "agentforge.ternary_matmul: w_prepacked must be 2-D")
    return x.new_empty(*x.shape[:-1], w_prepacked.shape[0])


@_fake("ternary_fake_quant")
def _(w, per_channel=False):
    return torch.empty_like(w)


@_fake("act_fake_quant")
def _(x, bits=8):
    return torch.empty_like(x)


@_fake("bitlinear")
def _(x, w, bias=None, per_channel=False):
    torch._check(x.shape[-1] == w.shape[1], lambda: "agentforge.bitlinear: x and w disagree on in_features")
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _identity_backward(ctx, grad):
    return grad, None


torch.library.register_autograd(f"{LIB}::ternary_fake_quant", _identity_backward)
torch.library.register_autograd(f"{LIB}::act_fake_quant", _identity_backward)


def _bitlinear_setup(ctx, inputs, output):
    x, w, bias, per_channel = inputs
    ctx.save_for_backward(x, w)
    ctx.per_channel = per_channel
    ctx.has_bias = bias is not None


def _bitlinear_backward(ctx, grad_y):
    """STE: y = Q_a(x) · Q_w(w)ᵀ, with Q treated as identity in the backward pass."""
    x, w = ctx.saved_tensors
    ops = torch.ops.agentforge
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        w_q = ops.ternary_fake_quant(w, ctx.per_channel)
        grad_x = (grad_y @ w_q.to(grad_y.dtype)).to(x.dtype)
    if ctx.needs_input_grad[1]:
        x_q = ops.act_fake_quant(x, 8)
        grad_w = (grad_y.reshape(-1, grad_y.shape[-1]).t() @ x_q.reshape(-1, x.shape[-1]).to(grad_y.dtype)).to(w.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b, None


torch.library.register_autograd(f"{LIB}::bitlinear", _bitlinear_backward, setup_context=_bitlinear_setup)


def _matmul_setup(ctx, inputs, output):
    x, w_prepacked, w_scale, bias, act_bits = inputs
    ctx.save_for_backward(w_prepacked, w_scale)
    ctx.K = x.shape[-1]
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _matmul_backward(ctx, grad_y):
    """Gradient for the activations only (STE through the activation quantizer); packed
    weights and scales are frozen."""
    w_prepacked, w_scale = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        ops = torch.ops.agentforge
        codes = ops.unpack_ternary(ops.unprepack_ternary(w_prepacked, ctx.K), ctx.K)
        scale = w_scale[:, None] if w_scale.shape[0] > 1 else w_scale
        grad_x = (grad_y @ (codes.to(grad_y.dtype) * scale.to(grad_y.dtype))).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, None, grad_b, None


torch.library.register_autograd(f"{LIB}::ternary_matmul", _matmul_backward, setup_context=_matmul_setup)
