"""What every codec is: ``encode(weight) -> Encoded``, ``decode(Encoded) -> weight``, an exact
byte count, and a trainable view for knowledge distillation. Also the two plain codecs every
other one is measured against: raw floats and round-to-nearest (RTN) integers.

An :class:`Encoded` tensor is a codec name with its settings (``params``, JSON) and named
numpy payload arrays (``parts``); ``nbytes`` is the sum of the parts' bytes, which is exactly
what the container stores for it (the container adds only its manifest entry).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from agentforge.compress.bitpack import pack_bits, unpack_bits

FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Encoded:
    """One compressed tensor: ``kind`` and ``params`` name the codec, ``shape`` the tensor,
    ``parts`` hold every byte it needs besides those."""

    kind: str
    params: dict
    shape: tuple[int, ...]
    parts: dict[str, np.ndarray]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Payload bytes: what the container stores for this tensor."""
        return sum(int(part.nbytes) for part in self.parts.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.numel, 1)


class TrainableDecode(nn.Module):
    """A decoded tensor as a function of the parts a codec leaves trainable (scales,
    coefficients, codebooks); ``forward()`` returns the tensor, ``export()`` the Encoded tensor
    holding the trained values (re-quantised where the format needs it)."""

    @abstractmethod
    def forward(self) -> torch.Tensor: ...

    @abstractmethod
    def export(self) -> Encoded: ...


class Codec(ABC):
    """A way to store a float tensor. Subclasses set ``kind`` and take their settings as keyword
    arguments, which ``settings()`` returns and ``Encoded.params`` records."""

    kind: ClassVar[str]
    lossless: bool = False  # a class default; Raw decides per instance (float32 is lossless)

    @abstractmethod
    def settings(self) -> dict: ...

    @abstractmethod
    def encode(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> Encoded:
        """``importance`` (same shape, non-negative): how much each weight's error costs at the
        layer output; codecs that can use it weight their fit by it, data-free ones ignore it."""

    @abstractmethod
    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The fp32 tensor of ``encoded.shape``."""

    @abstractmethod
    def trainable(self, encoded: Encoded) -> TrainableDecode: ...

    def _encoded(self, shape, parts: dict[str, np.ndarray]) -> Encoded:
        return Encoded(self.kind, self.settings(), tuple(int(d) for d in shape), parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    REGISTRY[cls.kind] = cls
    return cls


def codec_of(encoded: Encoded) -> Codec:
    """The codec that wrote ``encoded`` (raises ValueError for an unknown kind or bad settings)."""
    if encoded.kind not in REGISTRY:
        raise ValueError(f"unknown codec {encoded.kind!r}; known: {sorted(REGISTRY)}")
    try:
        return REGISTRY[encoded.kind](**encoded.params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"codec {encoded.kind!r}: bad settings {encoded.params}: {e}") from None


def decode(encoded: Encoded) -> torch.Tensor:
    """Decode any Encoded tensor with the codec that wrote it."""
    return codec_of(encoded).decode(encoded)


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """A tensor as a 2-D [rows, columns] fp32 matrix (a vector or scalar is one row)."""
    w = weight.detach().float()
    return w.reshape(1, -1) if w.dim() < 2 else w.reshape(w.shape[0], -1)


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` as decoding will see it (fp16), never 0: an all-zero row (a padding token's
    embedding) gets the smallest fp16 instead of a 0/0."""
    return scale.half().float().clamp(min=2.0**-24)


def relative_scale(value: torch.Tensor) -> nn.Parameter:
    """A trainable log-multiplier (initially 0) for ``value``: Adam moves every scale by the same
    relative amount whatever its magnitude."""
    return nn.Parameter(torch.zeros_like(value, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# raw floats


@register
class Raw(Codec):
    """The tensor itself in ``dtype`` (float32: lossless; float16: round to nearest half)."""

    kind = "raw"

    def __init__(self, dtype: str = "float16"):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"Raw: dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.lossless = dtype == "float32"

    def settings(self) -> dict:
        return {"dtype": self.dtype}

    def encode(self, weight, importance=None) -> Encoded:
        values = weight.detach().float().cpu().numpy().astype(FLOAT_DTYPES[self.dtype])
        return self._encoded(weight.shape, {"values": values.reshape(-1)})

    def decode(self, encoded) -> torch.Tensor:
        return torch.from_numpy(encoded.parts["values"].astype(np.float32)).reshape(encoded.shape)

    def trainable(self, encoded) -> TrainableDecode:
        return _TrainableRaw(self, encoded)


class _TrainableRaw(TrainableDecode):
    initial: torch.Tensor  # buffer

    def __init__(self, codec: Raw, encoded: Encoded):
        super().__init__()
        self.codec, self.shape = codec, encoded.shape
        self.register_buffer("initial", codec.decode(encoded))
        self.unit = float(self.initial.pow(2).mean().sqrt().clamp(min=1e-8))
        self.delta = nn.Parameter(torch.zeros_like(self.initial))  # in units of the tensor's RMS

    def forward(self) -> torch.Tensor:
        return self.initial + self.unit * self.delta

    def export(self) -> Encoded:
        return self.codec.encode(self.forward().detach())


# ---------------------------------------------------------------------------------------------
# round to nearest


@register
class RoundToNearest(Codec):
    """Symmetric ``bits``-bit integers with one fp16 scale per row: ``q = clamp(round(w / s),
    -2^(b-1), 2^(b-1) - 1)``, ``s = max|row| / (2^(b-1) - 1)``. The baseline every other
    lossy codec has to beat at the same bits per weight."""

    kind = "rtn"

    def __init__(self, bits: int = 8):
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"RoundToNearest: bits must be an int in [2, 8], got {bits!r}")
        self.bits = bits

    def settings(self) -> dict:
        return {"bits": self.bits}

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def encode(self, weight, importance=None) -> Encoded:
        rows = as_rows(weight)
        scale = fp16_scale(rows.abs().amax(1) / self.qmax)
        q = torch.round(rows / scale[:, None]).clamp(-self.qmax - 1, self.qmax).to(torch.int64)
        return self._encoded(
            weight.shape,
            {"codes": pack_bits((q + self.qmax + 1).numpy(), self.bits), "scale": scale.numpy().astype(np.float16)},
        )

    def integers(self, encoded: Encoded) -> torch.Tensor:
        rows = encoded.parts["scale"].size
        q = unpack_bits(encoded.parts["codes"], self.bits, encoded.numel) - (self.qmax + 1)
        return torch.from_numpy(q).float().reshape(rows, -1)

    def decode(self, encoded) -> torch.Tensor:
        scale = torch.from_numpy(encoded.parts["scale"].astype(np.float32))
        return (self.integers(encoded) * scale[:, None]).reshape(encoded.shape)

    def trainable(self, encoded) -> TrainableDecode:
        return _TrainableRoundToNearest(self, encoded)


class _TrainableRoundToNearest(TrainableDecode):
    q: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self, codec: RoundToNearest, encoded: Encoded):
        super().__init__()
        self.codec, self.encoded = codec, encoded
        self.register_buffer("q", codec.integers(encoded))
        self.register_buffer("scale", torch.from_numpy(encoded.parts["scale"].astype(np.float32)))
        self.log_scale = relative_scale(self.scale)

    def forward(self) -> torch.Tensor:
        return (self.q * (self.scale * self.log_scale.exp())[:, None]).reshape(self.encoded.shape)

    def export(self) -> Encoded:
        scale = (self.scale * self.log_scale.exp()).detach().numpy().astype(np.float16)
        return Encoded(
            self.encoded.kind,
            dict(self.encoded.params),
            self.encoded.shape,
            {"codes": self.encoded.parts["codes"], "scale": scale},
        )
