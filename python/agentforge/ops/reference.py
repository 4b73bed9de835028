"""Pure-PyTorch references for every agentforge op.

They define the semantics (csrc/cpu/quant.cpp states the conventions), serve as the test
oracle, and run in place of the kernels when the extension is missing. Integer outputs must
match the kernels exactly; float outputs to fp32 rounding.
"""

from typing import NoReturn

import torch

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5
# prepacked layouts and header: csrc/cpu/kernels.h, csrc/cpu/prepacked.h
BLOCK_K = {"2bit": 128, "base3": 160}  # weights per 32-byte row block
BLOCK_BYTES = 32
TILE_ROWS = 8
HEADER_BYTES = 32
FORMAT_VERSION = 2
LAYOUT_IDS = {"2bit": 1, "base3": 2}
MAGIC = b"AFTW"
MAX_K = 1 << 21  # accumulator bound of the kernels


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ternary_quantize(w: torch.Tensor, per_channel: bool):
    """The BitNet b1.58 reference weight quantizer (the paper's ``weight_quant``, Hugging Face's
    ``WeightQuant``), per tensor or per output row: ``scale = mean|w|.clamp(min=1e-5)``, codes
    ``(w * (1 / scale)).round().clamp(-1, 1)``. Returns codes, scale and ``1 / scale``."""
    wf = w.detach().float().contiguous()  # reduced in row-major order, as the kernel does
    if wf.numel() == 0:
        scale = torch.zeros(wf.shape[0] if per_channel else 1)
    else:
        scale = wf.abs().mean(dim=1) if per_channel else wf.abs().mean().reshape(1)
    scale = scale.clamp(min=WEIGHT_EPS)
    if not torch.isfinite(scale).all():
        if not torch.isfinite(wf).all():
            raise RuntimeError(
                "agentforge.quantize_ternary: w contains NaN or Inf; ternary quantization needs finite weights"
            )
        raise RuntimeError(
            f"agentforge.quantize_ternary: mean |w| overflows fp32 (largest |w| is "
            f"{float(wf.abs().max()):g}); scale the weights down before quantizing"
        )
    inv = 1.0 / scale
    codes = (wf * (inv[:, None] if per_channel else inv)).round().clamp(-1, 1).to(torch.int8)
    return codes, scale, inv


def quantize_ternary(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale, _ = _ternary_quantize(w, per_channel)
    return codes, scale


def quantize_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    absmax = xf.abs().amax(-1) if xf.shape[-1] > 0 else xf.new_zeros(xf.shape[:-1])
    finite = torch.isfinite(absmax)
    scale = torch.full_like(absmax, qmax) / absmax.clamp(min=ACT_EPS)  # true division, as the kernel
    q = torch.round(xf * scale[..., None]).clamp(-qmax - 1, qmax)
    q = torch.where(finite[..., None], q, 0.0).to(torch.int8)
    scale = torch.where(finite, scale, torch.nan)
    return q, scale, q.sum(-1, dtype=torch.int32)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    N, K = codes.shape
    c = torch.ones(N, _ceil_div(K, 4) * 4, dtype=torch.uint8)
    c[:, :K] = (codes + 1).to(torch.uint8)
    c = c.view(N, _ceil_div(K, 4), 4)
    return c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6


def unpack_ternary(packed: torch.Tensor, K: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
    c = (packed[..., None] >> shifts) & 3
    return c.reshape(packed.shape[0], packed.shape[1] * 4)[:, :K].to(torch.int8) - 1


def pack_ternary_base3(codes: torch.Tensor) -> torch.Tensor:
    N, K = codes.shape
    c = torch.ones(N, _ceil_div(K, 5) * 5, dtype=torch.int32)
    c[:, :K] = codes.to(torch.int32) + 1
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    return (c.view(N, _ceil_div(K, 5), 5) * powers).sum(-1).to(torch.uint8)


def unpack_ternary_base3(packed: torch.Tensor, K: int) -> torch.Tensor:
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    c = (packed.to(torch.int32)[..., None] // powers) % 3
    return c.reshape(packed.shape[0], packed.shape[1] * 5)[:, :K].to(torch.int8) - 1


def row_bytes(layout: str, K: int) -> int:
    """Row width of a prepacked tensor [N + 1, R] (prepacked.h): one more byte for base3, so
    that the width alone tells the layouts apart."""
    return max(_ceil_div(K, BLOCK_K[layout]) * BLOCK_BYTES, HEADER_BYTES) + (layout == "base3")


def _fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def _header(N: int, K: int, layout: str) -> torch.Tensor:
    head = (
        MAGIC
        + bytes([FORMAT_VERSION, LAYOUT_IDS[layout], TILE_ROWS, 0])
        + N.to_bytes(8, "little")
        + K.to_bytes(8, "little")
        + bytes(4)
    )
    head += _fnv1a(head).to_bytes(4, "little")
    row = torch.zeros(row_bytes(layout, K), dtype=torch.uint8)
    row[:HEADER_BYTES] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    return row


def read_header(w: torch.Tensor, op: str = "prepacked_info") -> dict:
    """Checks the header of a prepacked tensor as the kernels do; returns its fields."""

    def fail(msg) -> NoReturn:
        raise RuntimeError(f"agentforge.{op}: {msg}")

    if w.dtype != torch.uint8 or w.dim() != 2:
        fail(f"w_prepacked must be a 2-D uint8 tensor from prepack_ternary, got {w.dtype} {list(w.shape)}")
    rows, cols = w.shape
    head = bytes(w[-1, :HEADER_BYTES].tolist()) if rows >= 1 and cols >= HEADER_BYTES else b""
    if head[:4] != MAGIC:
        fail(
            f"w_prepacked of shape [{rows}, {cols}] has no prepacked header in its last row: it was not made by "
            "prepack_ternary, it is a slice or view of a prepacked tensor, or it was made by an agentforge older "
            "than prepack format 2 (prepack the canonical weights again)"
        )
    if int.from_bytes(head[28:32], "little") != _fnv1a(head[:28]):
        fail(f"the header of w_prepacked (shape [{rows}, {cols}]) is corrupt: its checksum does not match")
    if head[4] != FORMAT_VERSION:
        fail(
            f"w_prepacked has prepack format version {head[4]}; this build reads version {FORMAT_VERSION} "
            "(prepack the canonical weights again)"
        )
    layout = {v: k for k, v in LAYOUT_IDS.items()}.get(head[5])
    if layout is None:
        fail(f"w_prepacked names layout {head[5]}, which this build does not know")
    if head[6] != TILE_ROWS:
        fail(
            f"w_prepacked was laid out in tiles of {head[6]} rows; this build's kernels read tiles of {TILE_ROWS} "
            "(prepack the canonical weights again)"
        )
    N, K = (int.from_bytes(head[a : a + 8], "little", signed=True) for a in (8, 16))
    sane = 0 <= N < 1 << 48 and 0 <= K < 1 << 48
    if not (sane and N == rows - 1 and row_bytes(layout, K) == cols):
        want = f"[{N + 1}, {row_bytes(layout, K)}]" if sane else "(invalid)"
        fail(
            f"w_prepacked has shape [{rows}, {cols}] but its header describes N={N}, K={K} in the {layout} layout, "
            f"i.e. shape {want}: a slice, reshape or view of a prepacked tensor is not a prepacked tensor"
        )
    return {"N": N, "K": K, "layout": layout, "tile_rows": head[6], "version": head[4]}


def _tiles_to_rows(N: int, KB: int) -> torch.Tensor:
    """perm such that payload_flat[perm] lists the 32-byte blocks as [N, KB] in row order."""
    idx = []
    for t in range(0, N, TILE_ROWS):
        r = min(TILE_ROWS, N - t)
        base = t * KB
        idx.append((base + torch.arange(KB)[None, :] * r + torch.arange(r)[:, None]).reshape(-1))
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def _encode_base3(c: torch.Tensor) -> torch.Tensor:
    """codes c = w + 1 [..., 5, 32] -> base3 payload bytes [..., 32] (kernels.h)."""
    q = sum(c[..., s, :].to(torch.int32) * 3 ** (4 - s) for s in range(5))
    return ((256 * q + 242) // 243).to(torch.uint8)


def _decode_base3(b: torch.Tensor) -> torch.Tensor:
    """base3 payload bytes [..., 32] -> codes [..., 5, 32]: c_s = floor(3 m_s / 256), m -> 3m mod 256."""
    m = b.to(torch.int32)
    out = []
    for _ in range(5):
        m = m * 3
        out.append(m >> 8)
        m = m & 255
    return torch.stack(out, dim=-2)


def prepack_ternary(packed: torch.Tensor, K: int = -1, layout: str = "2bit") -> torch.Tensor:
    if layout not in BLOCK_K:
        raise RuntimeError(f"agentforge.prepack_ternary: unknown layout '{layout}'; use '2bit' or 'base3'")
    N, B = packed.shape
    K = 4 * B if K == -1 else K
    if K < 0 or _ceil_div(K, 4) != B:
        raise RuntimeError(
            f"agentforge.prepack_ternary: K={K} needs {_ceil_div(K, 4)} bytes per canonical row, packed has {B}"
        )
    codes = unpack_ternary(packed, 4 * B)
    if (codes[:, K:] != 0).any():
        raise RuntimeError("agentforge.prepack_ternary: corrupt packed ternary tensor: non-zero padding")
    bk = BLOCK_K[layout]
    KB = _ceil_div(K, bk)
    c = torch.ones(N, KB * bk, dtype=torch.uint8)
    c[:, :K] = (codes[:, :K] + 1).to(torch.uint8)
    if layout == "base3":
        blocks = _encode_base3(c.view(N, KB, 5, 32))
    else:
        c = c.view(N, KB, 4, 32)
        blocks = c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6  # [N, KB, 32]
    payload = torch.zeros(N * KB, BLOCK_BYTES, dtype=torch.uint8)
    payload[_tiles_to_rows(N, KB)] = blocks.reshape(-1, BLOCK_BYTES)
    out = torch.zeros(N + 1, row_bytes(layout, K), dtype=torch.uint8)
    out.view(-1)[: payload.numel()] = payload.view(-1)  # the payload starts at byte 0, across rows
    out[-1] = _header(N, K, layout)
    return out


def prepacked_codes(w: torch.Tensor, op: str = "ternary_matmul") -> tuple[torch.Tensor, dict]:
    """The weights w = c - 1 a prepacked tensor holds, int8 [N, K], read as every kernel reads
    the payload (a 2bit field 3 means w = 2), and its header."""
    info = read_header(w, op)
    N, K, layout = info["N"], info["K"], info["layout"]
    bk = BLOCK_K[layout]
    KB = _ceil_div(K, bk)
    payload = w.reshape(-1)[: N * KB * BLOCK_BYTES].view(-1, BLOCK_BYTES)
    blocks = payload[_tiles_to_rows(N, KB)].view(N, KB, BLOCK_BYTES) if N else payload.view(0, KB, BLOCK_BYTES)
    if layout == "base3":
        c = _decode_base3(blocks)
    else:
        c = (blocks[:, :, None, :] >> torch.arange(0, 8, 2, dtype=torch.uint8)[:, None]) & 3
    return (c.reshape(N, KB * bk)[:, :K].to(torch.int8) - 1), info


def unprepack_ternary(w: torch.Tensor, K: int) -> torch.Tensor:
    codes, info = prepacked_codes(w, "unprepack_ternary")
    if K != info["K"]:
        raise RuntimeError(
            f"agentforge.unprepack_ternary: K={K} but w_prepacked (shape {list(w.shape)}) was packed for K={info['K']}"
        )
    if (codes == 2).any():
        raise RuntimeError("agentforge.unprepack_ternary: corrupt prepacked tensor: invalid code 3")
    return pack_ternary(codes)


def _quantize_dequantize_weight(w, per_channel):
    codes, _, inv = _ternary_quantize(w, per_channel)
    return (codes.float() / (inv[:, None] if per_channel else inv)).to(w.dtype)


def _quantize_dequantize_activations(x, bits):
    q, scale, _ = quantize_activations(x, bits)
    return (q.float() / scale[..., None]).to(x.dtype)


def _dequant_matmul(x, codes, w_scale, bias, act_bits):
    q, x_scale, _ = quantize_activations(x, act_bits)
    acc = q.float() @ codes.float().t()  # exact: |acc| < 2^24 for K < 2^17
    y = acc / x_scale[..., None] * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _flat(t):
    return t.reshape(-1, t.shape[-1])


# The straight-through estimator, written out as the kernels' autograd (csrc/autograd.cpp) does
# it: quantizers are the identity in the backward pass. Forward values are the exact ones above.


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, quantize_dequantize, arg):
        return quantize_dequantize(t.detach(), arg)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _BitLinearSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, per_channel):
        ctx.save_for_backward(x, w)
        ctx.per_channel, ctx.has_bias = per_channel, bias is not None
        codes, scale = quantize_ternary(w, per_channel)
        return _dequant_matmul(x.detach(), codes, scale, None if bias is None else bias.detach(), 8)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        w_q = _quantize_dequantize_weight(w, ctx.per_channel)
        grad_x = (grad_y @ w_q.to(grad_y.dtype)).to(x.dtype)
        grad_w = (_flat(grad_y).t() @ _flat(_quantize_dequantize_activations(x, 8)).to(grad_y.dtype)).to(w.dtype)
        grad_b = _flat(grad_y).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class _TernaryMatmulSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_prepacked, w_scale, bias, act_bits):
        codes, info = prepacked_codes(w_prepacked)
        if x.shape[-1] != info["K"]:
            raise RuntimeError(
                f"agentforge.ternary_matmul: x has K={x.shape[-1]} features (x shape {list(x.shape)}) "
                f"but w_prepacked was packed for K={info['K']} (w_prepacked shape "
                f"{list(w_prepacked.shape)})"
            )
        ctx.save_for_backward(codes, w_scale)
        ctx.has_bias = bias is not None
        return _dequant_matmul(x.detach(), codes, w_scale, None if bias is None else bias.detach(), act_bits)

    @staticmethod
    def backward(ctx, grad_y):
        codes, w_scale = ctx.saved_tensors
        scale = w_scale[:, None] if w_scale.shape[0] > 1 else w_scale
        grad_x = grad_y @ (codes.to(grad_y.dtype) * scale.to(grad_y.dtype))
        grad_b = _flat(grad_y).sum(0) if ctx.has_bias else None
        return grad_x, None, None, grad_b, None


def ternary_matmul(
    x: torch.Tensor,
    w_prepacked: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_bits: int = 8,
) -> torch.Tensor:
    return _TernaryMatmulSTE.apply(x, w_prepacked, w_scale, bias, act_bits)


def ternary_fake_quant(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    return _FakeQuantSTE.apply(w, _quantize_dequantize_weight, per_channel)


def act_fake_quant(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    return _FakeQuantSTE.apply(x, _quantize_dequantize_activations, bits)


def bitlinear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, per_channel: bool = False
) -> torch.Tensor:
    return _BitLinearSTE.apply(x, w, bias, per_channel)
