"""Converters between agentforge's canonical ternary layout and Hugging Face transformers' BitNet layout.

agentforge (``ops.pack_ternary``): uint8 [N, ceil(K/4)], four codes per byte along the *input*
dim K, code ``w + 1``, first element in the lowest two bits; ``weight_scale`` is the
dequantization multiplier (``mean|W|``): ``W ≈ codes * weight_scale``.

transformers (``integrations/bitnet.py``, ``pack_weights``/``unpack_weights``): uint8 [N/4, K],
packed along the *output* dim N in four slices: byte row r holds output rows r, r + N/4,
r + 2N/4, r + 3N/4 at bits 0, 2, 4, 6 (code ``w + 1``). One scale per tensor, in one of two
conventions that are not interchangeable:

* ``BitLinear`` divides the output by ``weight_scale``: it stores the quantization multiplier
  ``1 / mean|W|``.
* ``AutoBitLinear`` multiplies the output by ``weight_scale``: it stores ``mean|W|``, as we do.

HF's unpacking always returns 4 * (N/4) rows, so it can only represent N divisible by 4.
"""

import torch

from agentforge import ops

HF_LINEAR_CLASSES = ("bitlinear", "autobitlinear")


def _check_linear_class(linear_class: str) -> None:
    if linear_class not in HF_LINEAR_CLASSES:
        raise ValueError(
            f"linear_class must be one of {HF_LINEAR_CLASSES} (the HF BitNetQuantConfig values), got {linear_class!r}"
        )


def pack_hf_bitnet(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes int8 [N, K] in {-1, 0, 1} -> HF packed uint8 [N/4, K]."""
    if codes.dim() != 2:
        raise ValueError(f"pack_hf_bitnet: codes must be 2-D [N, K], got shape {list(codes.shape)}")
    N, K = codes.shape
    if N % 4:
        raise ValueError(
            f"pack_hf_bitnet: HF BitNet packs 4 output rows per byte, so out_features must be divisible by 4; got {N}"
        )
    c = (codes + 1).to(torch.uint8).view(4, N // 4, K)  # slice i = output rows [i*N/4, (i+1)*N/4)
    return c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6


def unpack_hf_bitnet(hf_packed: torch.Tensor) -> torch.Tensor:
    """HF packed uint8 [N/4, K] -> ternary codes int8 [N, K]."""
    if hf_packed.dtype != torch.uint8 or hf_packed.dim() != 2:
        raise ValueError(
            f"unpack_hf_bitnet: expected a 2-D uint8 tensor [N/4, K], got {hf_packed.dtype} {list(hf_packed.shape)}"
        )
    return torch.cat([(hf_packed >> (2 * i)) & 3 for i in range(4)]).to(torch.int8) - 1


def to_hf_bitnet(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, in_features: int, linear_class: str = "bitlinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """agentforge canonical (``weight_packed`` uint8 [N, ceil(K/4)], ``weight_scale`` fp32 [1]) ->
    HF (``weight`` uint8 [N/4, K], ``weight_scale`` fp32 [1]) for ``linear_class``.

    HF casts the scale to the model dtype when it loads it."""
    _check_linear_class(linear_class)
    if weight_scale.numel() != 1:
        raise ValueError(
            f"to_hf_bitnet: HF BitNet layers keep one weight scale per tensor; this weight has "
            f"{weight_scale.numel()} per-channel scales"
        )
    hf_weight = pack_hf_bitnet(ops.unpack_ternary(weight_packed, in_features))
    scale = weight_scale.detach().float().reshape(1)
    return hf_weight, (1.0 / scale if linear_class == "bitlinear" else scale.clone())


def from_hf_bitnet(
    hf_weight: torch.Tensor, hf_scale: torch.Tensor, linear_class: str = "bitlinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF (``weight`` uint8 [N/4, K], ``weight_scale`` [1] in ``linear_class``'s convention) ->
    agentforge canonical (``weight_packed`` uint8 [N, ceil(K/4)], ``weight_scale`` fp32 [1]).

    Feed the result to ``BitLinear.from_packed(weight_packed, weight_scale, in_features=K)``."""
    _check_linear_class(linear_class)
    if hf_scale.numel() != 1:
        raise ValueError(
            f"from_hf_bitnet: HF BitNet weight_scale must hold one value, got shape {list(hf_scale.shape)}"
        )
    scale = hf_scale.detach().float().reshape(1)
    return (
        ops.pack_ternary(unpack_hf_bitnet(hf_weight)),
        1.0 / scale if linear_class == "bitlinear" else scale.clone(),
    )
