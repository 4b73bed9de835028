"""Helpers shared by the op tests: input builders, memory layouts, ISA/backend switches and
the exact comparison every op test uses. Fixtures built on these live in conftest.py."""

import contextlib
import os

import torch

import agentforge.ops as ops

ISA_ORDER = ("scalar", "avx2", "avx512")  # each ISA's CPU can also run the ones before it
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# K values that are not multiples of 4 (a packed byte), 64 (a bit-plane word) or 128/512
# (a prepacked block, a SIMD chunk), plus exact multiples on either side of them.
ODD_K = (1, 3, 5, 127, 129, 300, 513, 1000)
LAYOUTS = ("contiguous", "transposed", "strided", "offset")
BACKENDS = ("int8", "popcount")


def supported_isas() -> tuple[str, ...]:
    """Every ISA the kernels can run on this CPU, lowest first."""
    detected = ops.cpu_info()["detected_isa"]
    return ISA_ORDER[: ISA_ORDER.index(detected) + 1]


@contextlib.contextmanager
def using_isa(name: str):
    """Run the kernels of ISA `name`, then restore the ISA that was active before."""
    before = ops.cpu_info()["isa"]
    ops.set_isa(name)
    try:
        yield name
    finally:
        ops.set_isa(before)


@contextlib.contextmanager
def forced_backend(name: str):
    """Force a matmul backend; the kernels read AGENTFORGE_BACKEND on every call. For code that
    cannot use monkeypatch (hypothesis tests run many examples inside one test function)."""
    before = os.environ.get("AGENTFORGE_BACKEND")
    os.environ["AGENTFORGE_BACKEND"] = name
    try:
        yield name
    finally:
        if before is None:
            del os.environ["AGENTFORGE_BACKEND"]
        else:
            os.environ["AGENTFORGE_BACKEND"] = before


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-exact equality: same dtype, shape and device, equal values, NaN where expected has NaN."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to `t` whose memory layout is `layout`:
    contiguous; transposed (last two dims stored swapped, so the last dim has stride > 1);
    strided (every other element of a buffer twice as wide); offset (non-zero storage offset)."""
    if layout == "contiguous":
        out = t.contiguous()
    elif layout == "transposed" and t.dim() >= 2:
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout in ("transposed", "strided"):  # a 1-D tensor cannot be transposed: stride it instead
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        out = buf[..., ::2]
        out.copy_(t)
    elif layout == "offset":
        out = torch.zeros(t.numel() + 3, dtype=t.dtype)[3:].view(t.shape)
        out.copy_(t)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    # A layout that silently came out contiguous would test nothing (size-1 dims and empty tensors cannot be).
    swapped = t.shape[-2:] if layout == "transposed" and t.dim() >= 2 else t.shape[-1:]
    if layout in ("transposed", "strided") and min(swapped, default=0) > 1 and t.numel():
        assert not out.is_contiguous()
    return out


def random_codes(N: int, K: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=generator)


def random_activations(shape, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Gaussian activations with a different magnitude per token, so per-token scales differ."""
    x = torch.randn(*shape, generator=generator)
    if x.dim() >= 1 and x.numel():
        x = x * torch.rand(*shape[:-1], 1, generator=generator).mul(10).add(0.01)
    return x.to(dtype)


PREPACK_LAYOUTS = ("2bit", "base3")


def prepacked(codes: torch.Tensor, layout: str = "2bit") -> torch.Tensor:
    """Int8 codes in {-1, 0, 1} -> a prepacked tensor in `layout`, through the canonical format."""
    return ops.prepack_ternary(ops.pack_ternary(codes), codes.shape[1], layout)


def make_matmul_inputs(
    lead, N, K, dtype=torch.float32, per_channel=False, with_bias=False, generator=None, layout="2bit"
):
    """Inputs for ternary_matmul: x [*lead, K], prepacked codes [N, K], fp32 scale [1] or [N], bias [N] or None."""
    x = random_activations((*lead, K), dtype, generator)
    codes = random_codes(N, K, generator)
    scale = torch.rand(N if per_channel else 1, generator=generator) + 0.05
    bias = torch.randn(N, generator=generator).to(dtype) if with_bias else None
    return x, codes, prepacked(codes, layout), scale, bias


def dequantized_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes · scale as fp32 [N, K] (scale per tensor [1] or per row [N])."""
    return codes.float() * (scale[:, None] if scale.numel() > 1 else scale)
