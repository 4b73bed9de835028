"""Fake (meta) kernels for torch.ops.agentforge.*.

Fake kernels give torch.compile and FakeTensor the output shapes without running a kernel.
They mirror the real kernels' metadata: outputs are contiguous whatever the inputs' strides,
and every tensor argument must be on one device (a meta tensor among CPU tensors lands here
and must fail as the kernel would). The autograd formulas (the straight-through estimator)
are registered in C++, csrc/autograd.cpp.
"""
import torch

from agentforge.ops.reference import BLOCK_K, _ceil_div

LIB = "agentforge"


def _fake(name):
    return torch.library.register_fake(f"{LIB}::{name}")


def _same_device(op: str, **tensors) -> torch.device:
    """The one device of every tensor given (None entries skipped); raise if they differ."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    torch._check(len(devices) == 1, lambda: f"agentforge.{op}: all tensors must be on one device, got "
                 + ", ".join(f"{name} on {t.device}" for name, t in present.items()))
    return devices.pop()


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@_fake("quantize_ternary")
def _(w, per_channel=False):
    torch._check(w.dim() == 2, lambda: "agentforge.quantize_ternary: w must be 2-D")
    return _empty(w.shape, torch.int8, w.device), _empty([w.shape[0] if per_channel else 1], torch.float32, w.device)


@_fake("quantize_activations")
def _(x, bits=8):
    lead = x.shape[:-1]
    return (_empty(x.shape, torch.int8, x.device), _empty(lead, torch.float32, x.device),
            _empty(lead, torch.int32, x.device))


@_fake("pack_ternary")
def _(codes):
    return _empty([codes.shape[0], _ceil_div(codes.shape[1], 4)], torch.uint8, codes.device)


@_fake("unpack_ternary")
def _(packed, K):
    return _empty([packed.shape[0], K], torch.int8, packed.device)


@_fake("pack_ternary_base3")
def _(codes):
    return _empty([codes.shape[0], _ceil_div(codes.shape[1], 5)], torch.uint8, codes.device)


@_fake("unpack_ternary_base3")
def _(packed, K):
    return _empty([packed.shape[0], K], torch.int8, packed.device)


@_fake("prepack_ternary")
def _(packed):
    return _empty([packed.shape[0], _ceil_div(packed.shape[1] * 4, BLOCK_K) * 32], torch.uint8, packed.device)


@_fake("unprepack_ternary")
def _(w_prepacked, K):
    return _empty([w_prepacked.shape[0], _ceil_div(K, 4)], torch.uint8, w_prepacked.device)


@_fake("ternary_matmul")
def _(x, w_prepacked, w_scale, bias=None, act_bits=8):
    device = _same_device("ternary_matmul", x=x, w_prepacked=w_prepacked, w_scale=w_scale, bias=bias)
    torch._check(w_prepacked.dim() == 2, lambda: "agentforge.ternary_matmul: w_prepacked must be 2-D")
    return _empty([*x.shape[:-1], w_prepacked.shape[0]], x.dtype, device)


@_fake("ternary_fake_quant")
def _(w, per_channel=False):
    return _empty(w.shape, w.dtype, w.device)


@_fake("act_fake_quant")
def _(x, bits=8):
    return _empty(x.shape, x.dtype, x.device)


@_fake("bitlinear")
def _(x, w, bias=None, per_channel=False):
    device = _same_device("bitlinear", x=x, w=w, bias=bias)
    torch._check(x.shape[-1] == w.shape[1], lambda: "agentforge.bitlinear: x and w disagree on in_features")
    return _empty([*x.shape[:-1], w.shape[0]], x.dtype, device)
