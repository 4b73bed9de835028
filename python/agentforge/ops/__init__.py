"""The agentforge ternary ops.

Each function calls ``torch.ops.agentforge.<name>`` (C++/CUDA kernels, fake kernels and STE
autograd registered) or, when the extension is not built, the pure-PyTorch reference in
:mod:`agentforge.ops.reference`. Shapes and conventions: ``csrc/ops.cpp``, ``csrc/cpu/quant.cpp``.
"""

from typing import Any

import torch

from agentforge.ops import reference
from agentforge.ops._native import (
    cache_bytes,
    cold_layout,
    cpu_info,
    extension_loaded,
    last_level_cache_bytes,
    read_bandwidth,
    set_isa,
)

if extension_loaded():
    from agentforge.ops import _registration  # noqa: F401  (registers fake kernels and autograd)

    _impl: Any = torch.ops.agentforge  # the extension's ops or the reference module, alike
else:
    _impl = reference

__all__ = [
    "quantize_ternary",
    "quantize_activations",
    "pack_ternary",
    "unpack_ternary",
    "pack_ternary_base3",
    "unpack_ternary_base3",
    "prepack_ternary",
    "unprepack_ternary",
    "prepacked_info",
    "ternary_matmul",
    "ternary_fake_quant",
    "act_fake_quant",
    "bitlinear",
    "cpu_info",
    "extension_loaded",
    "set_isa",
    "reference",
    "cache_bytes",
    "cold_layout",
    "last_level_cache_bytes",
    "read_bandwidth",
]


def quantize_ternary(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean, exactly as the paper's code and Hugging Face's ``WeightQuant``:
    ``scale = mean|w|.clamp(min=1e-5)`` (per tensor, or per output row), codes
    ``clamp(round(w * (1 / scale)), -1, 1)`` as int8. Returns ``(codes [N, K], scale fp32 [1] or [N])``."""
    return _impl.quantize_ternary(w, per_channel)


def quantize_activations(x: torch.Tensor, bits: int = 8, return_row_sum: bool = False):
    """Per-token absmax quantization over the last dim: ``scale = Qp / max(|x|, 1e-5)``,
    ``x_q = clamp(round(x * scale), -Qp-1, Qp)`` with ``Qp = 2^(bits-1) - 1``; ``x ≈ x_q / scale``.
    Returns ``(x_q int8, scale fp32)``, plus the int32 row sums when ``return_row_sum``."""
    x_q, scale, row_sum = _impl.quantize_activations(x, bits)
    return (x_q, scale, row_sum) if return_row_sum else (x_q, scale)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Canonical 2-bit storage: uint8 ``[N, ceil(K/4)]``, code ``w + 1``, first element lowest."""
    return _impl.pack_ternary(codes)


def unpack_ternary(packed: torch.Tensor, K: int) -> torch.Tensor:
    return _impl.unpack_ternary(packed, K)


def pack_ternary_base3(codes: torch.Tensor) -> torch.Tensor:
    """1.6-bit storage: five codes per byte in base 3, uint8 ``[N, ceil(K/5)]``."""
    return _impl.pack_ternary_base3(codes)


def unpack_ternary_base3(packed: torch.Tensor, K: int) -> torch.Tensor:
    return _impl.unpack_ternary_base3(packed, K)


def prepack_ternary(packed: torch.Tensor, K: int = -1, layout: str = "2bit") -> torch.Tensor:
    """Canonical 2-bit weights ``[N, ceil(K/4)]`` -> a self-describing prepacked tensor
    ``[N + 1, R]`` for the kernels: a header row (N, K, layout, tile, format version) and the
    payload. ``layout`` is ``"2bit"`` (read by the int8 and popcount backends) or ``"base3"``
    (5 weights per byte, 1.6 bits, its own kernel: 20 % fewer bytes to stream). ``K`` is the
    true input width (default ``4 * packed.shape[1]``); the codes are validated here, so a
    prepacked tensor only ever holds valid weights. ``ternary_matmul`` refuses a slice, reshape,
    another K or a corrupt header."""
    return _impl.prepack_ternary(packed, K, layout)


def unprepack_ternary(w_prepacked: torch.Tensor, K: int) -> torch.Tensor:
    """Back to the canonical 2-bit format (for saving); ``K`` must be the one it was packed for."""
    return _impl.unprepack_ternary(w_prepacked, K)


def prepacked_info(w_prepacked: torch.Tensor) -> dict:
    """The header of a prepacked tensor: ``{"N", "K", "layout", "tile_rows", "version"}``
    (raises ``ValueError`` when it has none)."""
    return reference.read_header(w_prepacked)


def ternary_matmul(
    x: torch.Tensor,
    w_prepacked: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_bits: int = 8,
) -> torch.Tensor:
    """``y = (act_quant(x) · codesᵀ) / x_scale · w_scale + bias`` with integer accumulation;
    ``x`` is ``[..., K]`` in fp32/bf16/fp16, ``y`` is ``[..., N]`` in x's dtype."""
    return _impl.ternary_matmul(x, w_prepacked, w_scale, bias, act_bits)


def ternary_fake_quant(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Quantize-dequantize the weights, ``codes / (1 / scale)`` as the reference code computes it;
    the gradient passes straight through (STE)."""
    return _impl.ternary_fake_quant(w, per_channel)


def act_fake_quant(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize-dequantize the activations per token; the gradient passes straight through."""
    return _impl.act_fake_quant(x, bits)


def bitlinear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, per_channel: bool = False
) -> torch.Tensor:
    """Fused BitLinear training forward, ``F.linear(act_fake_quant(x), ternary_fake_quant(w), bias)``
    computed with the integer kernels; its backward is the STE gradient."""
    return _impl.bitlinear(x, w, bias, per_channel)
