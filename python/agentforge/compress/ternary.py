"""Ternary layers stored exactly: BitNet b1.58 codes in {-1, 0, 1} plus their fp32 scale(s).

``encode`` quantises a latent weight exactly as ``BitLinear`` does (``ops.quantize_ternary``,
absmean, per tensor or per output row), so the stored layer is the one the model ran. Three
lossless layouts for the codes, all through the core ops or the rANS coder:

* ``2bit``: the canonical kernel layout (``ops.pack_ternary``), 4 codes per byte, 2 bits/weight;
* ``base3``: 5 codes per byte (``ops.pack_ternary_base3``), 1.6 bits/weight;
* ``rans``: the code stream entropy-coded (``compress.rans``), ~H bits/weight for its empirical
  entropy H <= log2 3 = 1.585, plus a small header.

:func:`smallest` encodes all three and keeps the smallest; they decode to the same codes.
"""

from __future__ import annotations

import numpy as np
import torch

from agentforge import ops
from agentforge.compress import rans
from agentforge.compress.codec import Codec, Encoded, TrainableDecode, register, relative_scale

STORAGES = ("2bit", "base3", "rans")


@register
class Ternary(Codec):
    """Ternary codes + fp32 scale; ``storage`` picks the code layout, ``per_channel`` whether
    there is one scale per output row (as the layer's ``BitLinear.per_channel``)."""

    kind = "ternary"
    lossless = True  # exact for the ternary layer the model runs (the latent weight is not kept)

    def __init__(self, storage: str = "base3", per_channel: bool = False):
        if storage not in STORAGES:
            raise ValueError(f"Ternary: storage must be one of {STORAGES}, got {storage!r}")
        self.storage, self.per_channel = storage, bool(per_channel)

    def settings(self) -> dict:
        return {"storage": self.storage, "per_channel": self.per_channel}

    def encode(self, weight, importance=None) -> Encoded:
        if weight.dim() != 2:
            raise ValueError(f"Ternary: a linear weight [out, in] is needed, got shape {list(weight.shape)}")
        codes, scale = ops.quantize_ternary(weight.detach().float().contiguous(), self.per_channel)
        return self.from_codes(codes, scale)

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> Encoded:
        """Store given codes (int8 [N, K] in {-1, 0, 1}) and scale (fp32 [1] or [N])."""
        if self.storage == "2bit":
            parts = {"codes": ops.pack_ternary(codes).numpy()}
        elif self.storage == "base3":
            parts = {"codes": ops.pack_ternary_base3(codes).numpy()}
        else:
            parts = {f"rans_{k}": v for k, v in rans.encode((codes.to(torch.int64) + 1).numpy(), 3).items()}
        parts["scale"] = scale.detach().float().numpy().astype(np.float32).reshape(-1)
        return self._encoded(codes.shape, parts)

    def codes_and_scale(self, encoded: Encoded, symbols: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [N, K], scale fp32 [1] or [N]) as BitLinear.from_packed takes them packed;
        ``symbols``: the rANS stream already decoded (see :func:`codes_and_scales`)."""
        N, K = encoded.shape
        parts = encoded.parts
        if self.storage == "2bit":
            codes = ops.unpack_ternary(torch.from_numpy(parts["codes"]).reshape(N, -1), K)
        elif self.storage == "base3":
            codes = ops.unpack_ternary_base3(torch.from_numpy(parts["codes"]).reshape(N, -1), K)
        else:
            symbols = rans.decode(_stream(encoded), N * K) if symbols is None else symbols
            codes = torch.from_numpy(symbols - 1).to(torch.int8).reshape(N, K)
        scale = torch.from_numpy(parts["scale"].astype(np.float32).copy())
        if scale.numel() not in (1, N):
            raise ValueError(f"Ternary: {scale.numel()} scales for {N} rows")
        return codes, scale

    def decode(self, encoded) -> torch.Tensor:
        codes, scale = self.codes_and_scale(encoded)
        return codes.float() * (scale[:, None] if scale.numel() > 1 else scale)

    def trainable(self, encoded) -> TrainableDecode:
        return _TrainableTernary(self, encoded)


def _stream(encoded: Encoded) -> dict[str, np.ndarray]:
    return {k.removeprefix("rans_"): v for k, v in encoded.parts.items() if k.startswith("rans_")}


def codes_and_scales(encodings: list[Encoded]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``codes_and_scale`` of many ternary tensors, their rANS streams decoded in one batch
    (``rans.decode_many``: a model's layers decode in the time of its largest one)."""
    codecs = [Ternary(**e.params) for e in encodings]
    coded = [i for i, c in enumerate(codecs) if c.storage == "rans"]
    symbols = dict(zip(coded, rans.decode_many([(_stream(encodings[i]), encodings[i].numel) for i in coded])))
    return [codec.codes_and_scale(e, symbols.get(i)) for i, (codec, e) in enumerate(zip(codecs, encodings))]


def smallest(weight: torch.Tensor, per_channel: bool) -> Encoded:
    """The smallest of the three layouts for this layer (all decode to the same codes)."""
    base = Ternary("2bit", per_channel).encode(weight)
    codes, scale = Ternary("2bit", per_channel).codes_and_scale(base)
    others = [Ternary(storage, per_channel).from_codes(codes, scale) for storage in STORAGES[1:]]
    return min([base, *others], key=lambda e: e.nbytes)


class _TrainableTernary(TrainableDecode):
    """Codes fixed, scale trainable (the only real number a ternary layer has)."""

    codes: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self, codec: Ternary, encoded: Encoded):
        super().__init__()
        self.codec, self.encoded = codec, encoded
        codes, scale = codec.codes_and_scale(encoded)
        self.register_buffer("codes", codes.float())
        self.register_buffer("scale", scale)
        self.log_scale = relative_scale(scale)

    def trained_scale(self) -> torch.Tensor:
        return self.scale * self.log_scale.exp()

    def forward(self) -> torch.Tensor:
        scale = self.trained_scale()
        return self.codes * (scale[:, None] if scale.numel() > 1 else scale)

    def export(self) -> Encoded:
        parts = dict(self.encoded.parts)
        parts["scale"] = self.trained_scale().detach().numpy().astype(np.float32)
        return Encoded(self.encoded.kind, dict(self.encoded.params), self.encoded.shape, parts)
