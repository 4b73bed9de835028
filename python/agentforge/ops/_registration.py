"""Fake (meta) kernels for torch.ops.agentforge.*.

Fake kernels give torch.compile and FakeTensor the output shapes without running a kernel.
They mirror the real kernels' metadata: outputs are contiguous whatever the inputs' strides,
and every tensor argument must be on one device (a meta tensor among CPU tensors lands here
and must fail as the kernel would). They check every shape, dtype and range relation the
real kernels check. The one thing a fake kernel cannot read is the prepacked header (data,
not shape), so it checks that K fits the tensor's row width in some layout, and the real
kernel then checks the header's exact N, K and layout at run time (compiled or not).
The autograd formulas (the straight-through estimator) are registered in C++, csrc/autograd.cpp.
"""

import torch

from agentforge.ops.reference import BLOCK_BYTES, BLOCK_K, HEADER_BYTES, MAX_K, _ceil_div

LIB = "agentforge"


def _fake(name):
    return torch.library.register_fake(f"{LIB}::{name}")


def _same_device(op: str, **tensors) -> torch.device:
    """The one device of every tensor given (None entries skipped); raise if they differ."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    torch._check(
        len(devices) == 1,
        lambda: (
            f"agentforge.{op}: all tensors must be on one device, got "
            + ", ".join(f"{name} on {t.device}" for name, t in present.items())
        ),
    )
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
    return (
        _empty(x.shape, torch.int8, x.device),
        _empty(lead, torch.float32, x.device),
        _empty(lead, torch.int32, x.device),
    )


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


def _row_bytes(layout: str, K):
    """reference.row_bytes for symbolic K."""
    return torch.sym_max(_ceil_div(K, BLOCK_K[layout]) * BLOCK_BYTES, HEADER_BYTES) + (layout == "base3")


def _check_prepacked_shape(op: str, w, K) -> None:
    """What a prepacked tensor's shape says (prepacked.h): uint8 [N + 1, R], where R % 32 names
    the layout and R the number of blocks, which must be K's."""
    torch._check(
        w.dtype == torch.uint8 and w.dim() == 2,
        lambda: (
            f"agentforge.{op}: w_prepacked must be a 2-D uint8 tensor from prepack_ternary, got "
            f"{w.dtype} {list(w.shape)}"
        ),
    )
    layout = "base3" if w.shape[1] % BLOCK_BYTES == 1 else "2bit"
    torch._check(
        w.shape[0] >= 1 and w.shape[1] >= HEADER_BYTES and w.shape[1] % BLOCK_BYTES in (0, 1),
        lambda: f"agentforge.{op}: w_prepacked of shape {list(w.shape)} has no prepacked header in its last row",
    )
    torch._check(
        w.shape[1] == _row_bytes(layout, K),
        lambda: (
            f"agentforge.{op}: x has K={K} features but w_prepacked (shape {list(w.shape)}, "
            f"{layout} layout) holds rows of {w.shape[1]} bytes, not {_row_bytes(layout, K)}"
        ),
    )


@_fake("prepack_ternary")
def _(packed, K=-1, layout="2bit"):
    op = "prepack_ternary"
    torch._check(
        packed.dtype == torch.uint8 and packed.dim() == 2,
        lambda: f"agentforge.{op}: packed must be uint8 2-D, got {packed.dtype} {list(packed.shape)}",
    )
    torch._check(layout in BLOCK_K, lambda: f"agentforge.{op}: unknown layout '{layout}'; use '2bit' or 'base3'")
    K = 4 * packed.shape[1] if K == -1 else K
    torch._check(
        K >= 0 and _ceil_div(K, 4) == packed.shape[1],
        lambda: (
            f"agentforge.prepack_ternary: K={K} needs {_ceil_div(K, 4)} bytes per canonical row, packed "
            f"has {packed.shape[1]}"
        ),
    )
    return _empty([packed.shape[0] + 1, _row_bytes(layout, K)], torch.uint8, packed.device)


@_fake("unprepack_ternary")
def _(w_prepacked, K):
    torch._check(K >= 0, lambda: f"agentforge.unprepack_ternary: K={K} is negative")
    _check_prepacked_shape("unprepack_ternary", w_prepacked, K)
    return _empty([w_prepacked.shape[0] - 1, _ceil_div(K, 4)], torch.uint8, w_prepacked.device)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@_fake("ternary_matmul")
def _(x, w_prepacked, w_scale, bias=None, act_bits=8):
    op = "ternary_matmul"
    device = _same_device(op, x=x, w_prepacked=w_prepacked, w_scale=w_scale, bias=bias)
    torch._check(x.dtype in _FLOATS, lambda: f"agentforge.{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    torch._check(2 <= act_bits <= 8, lambda: f"agentforge.{op}: bits must be in [2, 8], got {act_bits}")
    torch._check(x.dim() >= 1, lambda: f"agentforge.{op}: x must have at least one dimension")
    K = x.shape[-1]
    _check_prepacked_shape(op, w_prepacked, K)
    torch._check(K < MAX_K, lambda: f"agentforge.{op}: K={K} is too large")
    N = w_prepacked.shape[0] - 1
    torch._check(
        w_scale.dtype == torch.float32 and w_scale.dim() == 1 and w_scale.shape[0] in (1, N),
        lambda: (
            f"agentforge.{op}: w_scale must be float32 of shape [1] or [{N}], got {w_scale.dtype} {list(w_scale.shape)}"
        ),
    )
    if bias is not None:
        torch._check(
            bias.dtype in _FLOATS and bias.dim() == 1 and bias.shape[0] == N,
            lambda: f"agentforge.{op}: bias must have shape [{N}], got {list(bias.shape)}",
        )
    return _empty([*x.shape[:-1], N], x.dtype, device)


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
