"""Hyper-compression (Fan et al., arXiv 2409.00592): a group of parameters is replaced by the
index of the nearest point on the trajectory of a dynamical system that fills its space.

Following the authors' released v3 scheme (pairs of weights, an inner square around the
tensor's centre, radial "classes" for the outliers), with the paper's ergodic trajectory:

* consecutive weights form 2-D points p; c is their mean;
* the trajectory is the irrational winding of the torus ``u(n) = frac(n · a)``, a = (1/g, 1/g²)
  with g the plastic number (1.3247…), whose points fill the unit square densely and evenly;
  scaled to the inner square of half-side h around c: ``x(n) = c + h (2 u(n) − 1)``, n = 1..N,
  plus c itself as point 0 (most weights sit near the centre);
* a point outside the square lies in ring j = 1..J (radius r_j = h + j (ρ_max − h) / J); it is
  scaled towards c by h / r_j, which puts it inside the square, matched there, and scaled back;
* stored: one index per pair, ``point + (N + 1) · ring`` in ``index_bits`` bits (so
  ``index_bits / 2`` bits per weight), and c, h, ρ_max (fp32).

h is chosen per tensor from a few quantiles of the points' spread by the squared error it
gives. The codec is kept only where it measurably wins (the phase compares it with the others).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from agentforge.compress.bitpack import pack_bits, unpack_bits
from agentforge.compress.codec import Codec, Encoded, TrainableDecode, register, relative_scale

PLASTIC = 1.324717957244746  # the real root of g³ = g + 1; (1/g, 1/g²) is the best-spread 2-D winding
SPREAD_QUANTILES = (0.6, 0.75, 0.85, 0.92, 0.97, 1.0)
MATCH_CHUNK = 32768
SEARCH_PAIRS = 1 << 20  # torch.quantile's input limit is 2^24; 6 full passes over 14M pairs took 37 s


def trajectory(points: int) -> torch.Tensor:
    """Point 0 = the centre (0, 0), then u(n) mapped to [-1, 1]², n = 1..points: [points + 1, 2]."""
    n = torch.arange(1, points + 1, dtype=torch.float64)[:, None]
    direction = torch.tensor([1 / PLASTIC, 1 / PLASTIC**2], dtype=torch.float64)
    return torch.cat([torch.zeros(1, 2, dtype=torch.float64), 2 * torch.frac(n * direction) - 1]).float()


def nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    out = [torch.cdist(x[i : i + MATCH_CHUNK], table).argmin(1) for i in range(0, x.shape[0], MATCH_CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@register
class Hyper(Codec):
    """Pairs of weights as indices of ``index_bits`` bits into a winding trajectory with
    ``2**index_bits / (rings + 1)`` points per ring (``rings + 1`` a power of two)."""

    kind = "hyper"

    def __init__(self, index_bits: int = 8, rings: int = 3):
        if not isinstance(index_bits, int) or not 2 <= index_bits <= 16:
            raise ValueError(f"Hyper: index_bits must be an int in [2, 16], got {index_bits!r}")
        classes = rings + 1 if isinstance(rings, int) else 0
        if classes < 1 or classes & (classes - 1) or classes >= 1 << index_bits:
            raise ValueError(f"Hyper: rings + 1 must be a power of two below 2**index_bits, got rings={rings!r}")
        self.index_bits, self.rings = index_bits, rings

    def settings(self) -> dict:
        return {"index_bits": self.index_bits, "rings": self.rings}

    @property
    def points(self) -> int:
        return (1 << self.index_bits) // (self.rings + 1) - 1

    @staticmethod
    def _pairs(weight: torch.Tensor) -> torch.Tensor:
        flat = weight.detach().float().reshape(-1)
        return torch.cat([flat, flat.new_zeros(flat.numel() % 2)]).reshape(-1, 2)

    def _radii(self, h: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """Scale of each class: the square's half-side, then the rings' outer radii."""
        steps = torch.arange(1, self.rings + 1, dtype=torch.float32)
        return torch.cat([h.reshape(1), h + steps * (rho - h).clamp(min=0) / max(self.rings, 1)])

    def _quantize(self, p: torch.Tensor, c: torch.Tensor, h: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        offset = p - c
        inside = offset.abs().amax(1) <= h
        radii = self._radii(h, rho)
        ring = (
            torch.bucketize(offset.norm(dim=1), radii[1:]).clamp(max=self.rings - 1) + 1
            if self.rings
            else torch.zeros(len(p), dtype=torch.long)
        )
        ring = torch.where(inside, 0, ring)
        scaled = (offset / radii[ring][:, None]).clamp(-1, 1)  # class 0 clamps outliers when rings = 0
        return nearest(scaled, trajectory(self.points)) + (self.points + 1) * ring

    def reconstruct(self, index: torch.Tensor, c: torch.Tensor, h: torch.Tensor, rho: torch.Tensor, numel: int):
        ring, point = index // (self.points + 1), index % (self.points + 1)
        p = c + trajectory(self.points)[point] * self._radii(h, rho)[ring][:, None]
        return p.reshape(-1)[:numel]

    def encode(self, weight, importance=None) -> Encoded:
        p = self._pairs(weight)
        c = p.mean(0)
        rho = (p - c).norm(dim=1).max().clamp(min=1e-12)
        # h is chosen on evenly spaced pairs (all of them up to SEARCH_PAIRS, which quantile()
        # also needs), then every pair is quantised once with it
        search = p if len(p) <= SEARCH_PAIRS else p[torch.arange(SEARCH_PAIRS) * len(p) // SEARCH_PAIRS]
        spread = (search - c).abs().amax(1)
        best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for q in SPREAD_QUANTILES:
            h = torch.quantile(spread, q).clamp(min=1e-12)
            index = self._quantize(search, c, h, rho)
            error = (self.reconstruct(index, c, h, rho, search.numel()) - search.reshape(-1)).pow(2).sum()
            if best is None or error < best[0]:
                best = (error, h, index)
        assert best is not None  # SPREAD_QUANTILES is not empty
        _, h, index = best
        if search is not p:
            index = self._quantize(p, c, h, rho)
        return self._pack(weight.shape, index, c, h, rho)

    def _pack(self, shape, index, c, h, rho) -> Encoded:
        geometry = torch.cat([c.reshape(2), h.reshape(1), rho.reshape(1)]).numpy().astype(np.float32)
        return self._encoded(shape, {"index": pack_bits(index.numpy(), self.index_bits), "geometry": geometry})

    def unpacked(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        geometry = torch.from_numpy(encoded.parts["geometry"].astype(np.float32).copy())
        index = torch.from_numpy(unpack_bits(encoded.parts["index"], self.index_bits, -(-encoded.numel // 2)))
        return index, geometry[:2].clone(), geometry[2].clone(), geometry[3].clone()

    def decode(self, encoded) -> torch.Tensor:
        index, c, h, rho = self.unpacked(encoded)
        return self.reconstruct(index, c, h, rho, encoded.numel).reshape(encoded.shape)

    def trainable(self, encoded) -> TrainableDecode:
        return _TrainableHyper(self, encoded)


class _TrainableHyper(TrainableDecode):
    """Indices fixed; the centre, the square's half-side and the outer radius trainable."""

    c: torch.Tensor  # buffers
    h: torch.Tensor
    rho: torch.Tensor

    def __init__(self, codec: Hyper, encoded: Encoded):
        super().__init__()
        self.codec, self.encoded = codec, encoded
        index, c, h, rho = codec.unpacked(encoded)
        self.index = index
        for name, value in (("c", c), ("h", h), ("rho", rho)):
            self.register_buffer(name, value)
        self.shift = nn.Parameter(torch.zeros(2))  # in units of h
        self.log_h, self.log_rho = relative_scale(h), relative_scale(rho)

    def geometry(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.h * self.log_h.exp()
        return self.c + self.shift * self.h, h, self.rho * self.log_rho.exp()

    def forward(self) -> torch.Tensor:
        return self.codec.reconstruct(self.index, *self.geometry(), self.encoded.numel).reshape(self.encoded.shape)

    def export(self) -> Encoded:
        c, h, rho = (t.detach() for t in self.geometry())
        return self.codec._pack(self.encoded.shape, self.index, c, h, rho)
