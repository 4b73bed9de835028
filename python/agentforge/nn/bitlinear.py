"""BitLinear: an ``nn.Linear`` drop-in with BitNet b1.58 ternary weights and int8 activations.

A layer lives in one of two states:

* ``"training"``: a latent float ``weight`` [N, K] (+ ``bias`` [N]) that the optimizer updates;
  the forward pass quantizes on the fly (ternary weights, per-token int8 activations) and the
  backward pass is the straight-through estimator (STE).
* ``"packed"``: frozen ternary weights in a kernel layout (``w_prepacked``, a self-describing
  prepacked tensor, and the fp32 dequantization scale ``w_scale`` [1] or [N]), run by
  ``ternary_matmul``; the latent weight is gone. ``bits`` is 2 (the 2bit layout) or 1.6 (base3:
  5 weights per byte, 20 % fewer bytes to stream when the weights do not fit in cache). Its
  ``state_dict`` holds a canonical storage format instead (``weight_packed`` and ``weight_scale``):
  uint8 [N, ceil(K/4)] (``pack_ternary``) at 2 bits, [N, ceil(K/5)] (``pack_ternary_base3``) at
  1.6, so checkpoints never depend on a kernel layout.

N is ``out_features``, K is ``in_features`` throughout.
"""

import torch
import torch.nn.functional as F
from torch import nn

from agentforge import ops

TRAINING, PACKED = "training", "packed"
# bits per weight -> (prepacked layout, codes per canonical storage byte)
LAYOUTS = {2: ("2bit", 4), 1.6: ("base3", 5)}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_bits(bits, where: str = "BitLinear") -> float:
    """``bits`` as one of the keys of LAYOUTS (2 or 1.6), else ``ValueError``."""
    if bits not in LAYOUTS:
        raise ValueError(f"{where}: bits must be 2 (2-bit layout) or 1.6 (base-3, 5 weights per byte), got {bits!r}")
    return 1.6 if bits == 1.6 else 2


def check_canonical(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, in_features: int, where: str = "BitLinear", bits=2
) -> None:
    """Raise ``ValueError`` unless ``weight_packed`` (uint8 [N, ceil(K/4)] at 2 bits, [N, ceil(K/5)]
    at 1.6) and ``weight_scale`` (float, [1] or [N], finite, positive) form a valid canonical
    ternary weight for K = in_features."""
    per_byte = LAYOUTS[check_bits(bits, where)][1]
    if weight_packed.dtype != torch.uint8 or weight_packed.dim() != 2:
        raise ValueError(
            f"{where}: weight_packed must be a 2-D uint8 tensor, got {weight_packed.dtype} {list(weight_packed.shape)}"
        )
    N, B = weight_packed.shape
    if B != _ceil_div(in_features, per_byte):
        raise ValueError(
            f"{where}: weight_packed has {B} bytes per row but in_features={in_features} "
            f"needs {_ceil_div(in_features, per_byte)} at {bits} bits"
        )
    if not weight_scale.is_floating_point() or weight_scale.dim() != 1 or weight_scale.numel() not in (1, N):
        raise ValueError(
            f"{where}: weight_scale must be a float tensor of shape [1] or [{N}], got "
            f"{weight_scale.dtype} {list(weight_scale.shape)}"
        )
    if not bool(torch.isfinite(weight_scale).all() and (weight_scale > 0).all()):
        raise ValueError(f"{where}: weight_scale must be finite and positive (corrupt checkpoint?)")
    # Code 3 is unused by the 2-bit format (codes are w + 1 in {0, 1, 2}), bytes above 242 by the
    # base-3 one (3^5 = 243); finding one means the bytes are not ternary weights at all.
    if per_byte == 4 and any(bool(((weight_packed >> shift) & 3).eq(3).any()) for shift in (0, 2, 4, 6)):
        raise ValueError(f"{where}: weight_packed holds the invalid 2-bit code 3 (corrupt checkpoint?)")
    if per_byte == 5 and bool((weight_packed > 242).any()):
        raise ValueError(f"{where}: weight_packed holds a base-3 byte above 242 (corrupt checkpoint?)")


class BitLinear(nn.Linear):
    """``y = x Wᵀ + b`` with W ternary (absmean scale) and x int8 (absmax per token).

    Args mirror ``nn.Linear``; ``per_channel`` gives each output row its own weight scale.
    ``lambda_`` in [0, 1] is the quantization warm-up strength of the HF 1.58-bit fine-tuning
    recipe: below 1 the layer blends full-precision and quantized weights and activations.
    Under ``torch.compile`` each distinct ``lambda_`` value is a recompile, so step it coarsely.

    Shapes: x [..., K] -> y [..., N].
    """

    w_prepacked: torch.Tensor  # buffers of the packed state
    w_scale: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, per_channel: bool = False, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.per_channel = per_channel
        self.lambda_ = 1.0
        self.state = TRAINING
        self.bits: float = 2  # of the packed state; set by pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = False) -> "BitLinear":
        """A training-state BitLinear sharing ``linear``'s Parameter objects, so optimizer state
        and tied weights keep pointing at the live tensors."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            per_channel=per_channel,
            device="meta",
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    @classmethod
    def from_packed(
        cls,
        weight_packed: torch.Tensor,
        weight_scale: torch.Tensor,
        in_features: int,
        bias: torch.Tensor | None = None,
        bits=2,
    ) -> "BitLinear":
        """A packed-state BitLinear from canonical tensors: ``weight_packed`` uint8 [N, ceil(K/4)]
        (``bits=2``) or [N, ceil(K/5)] (``bits=1.6``, base-3), ``weight_scale`` fp32 [1] or [N]
        (dequantization multiplier), optional ``bias`` [N]."""
        check_canonical(weight_packed, weight_scale, in_features, "BitLinear.from_packed", bits)
        N = weight_packed.shape[0]
        layer = cls(
            in_features,
            N,
            bias=bias is not None,
            per_channel=weight_scale.numel() > 1,
            device="meta",
            dtype=bias.dtype if bias is not None else None,
        )
        if bias is not None:
            if bias.shape != (N,):
                raise ValueError(f"BitLinear.from_packed: bias must have shape [{N}], got {list(bias.shape)}")
            layer.bias = nn.Parameter(bias.detach())
        layer.bits = check_bits(bits)
        layer._set_packed(layer._to_2bit(weight_packed), weight_scale)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == PACKED:
            return ops.ternary_matmul(x, self.w_prepacked, self.w_scale, self.bias)
        if self.lambda_ >= 1.0:
            return ops.bitlinear(x, self.weight, self.bias, self.per_channel)
        # Warm-up: move each operand a fraction lambda_ of the way to its quantized value. The
        # fake-quant ops pass gradients straight through, so d/dx of the blend is the identity.
        lam = self.lambda_
        x_q = x + lam * (ops.act_fake_quant(x) - x)
        w_q = self.weight + lam * (ops.ternary_fake_quant(self.weight, self.per_channel) - self.weight)
        return F.linear(x_q, w_q, self.bias)

    @torch.no_grad()
    def pack(self, bits=2) -> "BitLinear":
        """Training -> packed: quantize the latent weight once, keep a kernel layout, free the
        latent weight. ``bits=2`` keeps the 2bit layout; ``bits=1.6`` the base3 one (5 weights
        per byte), faster when the model's weights stream from memory rather than cache
        (``pack_bitnet(model, bits="auto")`` measures which). Returns ``self``."""
        if self.state == PACKED:
            raise RuntimeError("BitLinear.pack: this layer is already packed")
        self.bits = check_bits(bits, "BitLinear.pack")
        codes, scale = ops.quantize_ternary(self.weight.detach(), self.per_channel)
        self._set_packed(ops.pack_ternary(codes), scale)
        return self

    def _to_2bit(self, weight_packed: torch.Tensor) -> torch.Tensor:
        """This layer's canonical storage bytes (2-bit or base-3, by ``bits``) as canonical 2-bit."""
        if self.bits == 2:
            return weight_packed
        return ops.pack_ternary(ops.unpack_ternary_base3(weight_packed.contiguous(), self.in_features))

    def _set_packed(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> None:
        """Install canonical 2-bit weights in the kernel layout of ``bits`` and drop the latent weight."""
        if "weight" in self._parameters:
            del self.weight
        # Non-persistent: the state dict carries the canonical layout (see _save_to_state_dict).
        w = ops.prepack_ternary(weight_packed.contiguous(), self.in_features, LAYOUTS[self.bits][0])
        self.register_buffer("w_prepacked", w, persistent=False)
        self.register_buffer("w_scale", weight_scale.detach().float().contiguous(), persistent=False)
        self.state = PACKED

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() cast every float buffer, but the kernels take the scale
        # in fp32 and a bf16 round trip would lose its precision: move it, never cast it.
        if self.state != PACKED:
            return super()._apply(fn, recurse)
        scale = self._buffers.pop("w_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            self.register_buffer("w_scale", scale.to(self.w_prepacked.device), persistent=False)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (training) and bias
        if self.state == PACKED:
            packed = ops.unprepack_ternary(self.w_prepacked, self.in_features)
            if self.bits == 1.6:
                packed = ops.pack_ternary_base3(ops.unpack_ternary(packed, self.in_features))
            destination[prefix + "weight_packed"] = packed
            destination[prefix + "weight_scale"] = self.w_scale if keep_vars else self.w_scale.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        keys = (prefix + "weight_packed", prefix + "weight_scale")
        where = f"BitLinear '{prefix[:-1]}'"
        if self.state == PACKED and all(k in state_dict for k in keys):
            try:
                self._load_packed(state_dict[keys[0]], state_dict[keys[1]], where)
            except ValueError as exc:
                error_msgs.append(str(exc))
        elif self.state == PACKED:
            missing_keys.extend(k for k in keys if k not in state_dict)
        elif keys[0] in state_dict:
            error_msgs.append(
                f"{where} is in training state but the checkpoint holds packed weights; "
                "call pack_bitnet(model) (or layer.pack()) before loading it"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )  # bias, and the latent weight in training state
        if self.state == PACKED:  # the base class does not know the canonical keys
            unexpected_keys[:] = [k for k in unexpected_keys if k not in keys]

    def _load_packed(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, where: str) -> None:
        check_canonical(weight_packed, weight_scale, self.in_features, where, self.bits)
        scales = self.out_features if self.per_channel else 1
        if weight_packed.shape[0] != self.out_features or weight_scale.numel() != scales:
            raise ValueError(
                f"{where}: the checkpoint holds {weight_packed.shape[0]} rows and {weight_scale.numel()} "
                f"scales, the layer needs {self.out_features} rows and {scales}"
            )
        self._set_packed(self._to_2bit(weight_packed).to(self.w_prepacked.device), weight_scale.to(self.w_scale.device))

    def extra_repr(self) -> str:
        bits = f", bits={self.bits}" if self.state == PACKED else ""
        return f"{super().extra_repr()}, per_channel={self.per_channel}, state={self.state}{bits}"
