"""Pure-PyTorch references for every agentforge op.

They define the semantics (csrc/cpu/quant.cpp states the conventions), serve as the test
oracle, and run in place of the kernels when the extension is missing. Integer outputs must
match the kernels exactly; float outputs to fp32 rounding.
"""
import torch

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5
BLOCK_K = 128  # prepacked layout: see csrc/cpu/kernels.h
TILE_ROWS = 4


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
        raise RuntimeError("agentforge.quantize_ternary: w contains NaN or Inf; ternary quantization needs finite weights")
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


def prepack_ternary(packed: torch.Tensor) -> torch.Tensor:
    N, B = packed.shape
    KB = _ceil_div(B * 4, BLOCK_K)
    c = torch.ones(N, KB * BLOCK_K, dtype=torch.uint8)
    c[:, : B * 4] = (unpack_ternary(packed, B * 4) + 1).to(torch.uint8)
    c = c.view(N, KB, 4, 32)
    blocks = c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6  # [N, KB, 32]
    tiles = [blocks[t:t + TILE_ROWS].transpose(0, 1).reshape(-1) for t in range(0, N, TILE_ROWS)]
    return torch.cat(tiles).view(N, KB * 32) if tiles else torch.empty(0, KB * 32, dtype=torch.uint8)


def unprepack_ternary(w: torch.Tensor, K: int) -> torch.Tensor:
    N = w.shape[0]
    KB = w.shape[1] // 32
    flat = w.reshape(-1)
    rows = []
    for t in range(0, N, TILE_ROWS):
        r = min(TILE_ROWS, N - t)
        rows.append(flat[t * KB * 32:(t + r) * KB * 32].view(KB, r, 32).transpose(0, 1))
    blocks = torch.cat(rows) if rows else torch.empty(0, KB, 32, dtype=torch.uint8)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
    c = ((blocks[:, :, None, :] >> shifts[:, None]) & 3).reshape(N, KB * BLOCK_K)[:, :K]
    return pack_ternary(c.to(torch.int8) - 1)


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
        K = x.shape[-1]
        codes = unpack_ternary(unprepack_ternary(w_prepacked, K), K)
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


def ternary_matmul(x: torch.Tensor, w_prepacked: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, act_bits: int = 8) -> torch.Tensor:
    return _TernaryMatmulSTE.apply(x, w_prepacked, w_scale, bias, act_bits)


def ternary_fake_quant(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    return _FakeQuantSTE.apply(w, _quantize_dequantize_weight, per_channel)


def act_fake_quant(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    return _FakeQuantSTE.apply(x, _quantize_dequantize_activations, bits)


def bitlinear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
              per_channel: bool = False) -> torch.Tensor:
    return _BitLinearSTE.apply(x, w, bias, per_channel)
