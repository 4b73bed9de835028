"""VPTQ-style vector quantisation (Liu et al., EMNLP 2024): each row is cut into vectors of
``vector`` weights, each vector stored as an index into a k-means codebook, and optionally
further indices into residual codebooks that quantise what the previous ones left.

* Rows are divided by their RMS first (one fp16 per row, VPTQ's ``--enable_norm``), so one
  codebook serves rows of very different magnitude (embedding rows of frequent and rare tokens).
* The k-means is weighted by ``importance`` (the diagonal of the layer's input Hessian, or the
  token counts of an embedding, from calibration data): ``Σ_j h_j (x_j − c_j)²`` is the
  second-order estimate of the layer-output error that VPTQ minimises. VPTQ's column-wise
  GPTQ-style error feedback is not done here.
* Codebook sizes are powers of two; indices take exactly ``log2 k`` bits; codebooks are fp16 and
  **counted**: ``bits/weight = Σ log2(k_i) / vector + 16 (Σ k_i · vector + rows) / numel``. On a
  small matrix the codebooks can cost more than the indices save, which the byte count shows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from agentforge.compress.bitpack import pack_bits, unpack_bits
from agentforge.compress.codec import Codec, Encoded, TrainableDecode, as_rows, fp16_scale, register, relative_scale

ASSIGN_CHUNK = 16384  # vectors per distance computation (bounds memory to chunk × k floats)
SEEDING_SAMPLE = 16  # k-means++ seeds from at most this many rows per centroid
# Lloyd steps fit on at most this many vectors (a random sample; every vector is still assigned
# once at the end). 2^18 is over 1000 per centroid for k = 256, where faiss stops at 256; on a
# 28M-weight embedding (7M vectors) it makes the fit 27x cheaper for the same weighted error
# (see benchmarks/test_bench_compress.py), and no matrix of a tiny model is that large.
TRAINING_SAMPLE = 1 << 18


def weighted_assign(x: torch.Tensor, weight: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the codebook row nearest to each row of ``x`` under ``Σ_j weight_j (x_j − c_j)²``."""
    out = []
    for start in range(0, x.shape[0], ASSIGN_CHUNK):
        xs, ws = x[start : start + ASSIGN_CHUNK], weight[start : start + ASSIGN_CHUNK]
        out.append((ws @ codebook.pow(2).T - 2 * (ws * xs) @ codebook.T).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _weighted_errors(x, weight, codebook, index) -> torch.Tensor:
    return (weight * (x - codebook[index]).pow(2)).sum(1)


def _draw(distance: torch.Tensor, generator: torch.Generator) -> int:
    """An index drawn with probability proportional to ``distance`` (k-means++)."""
    cumulative = torch.cumsum(distance.double() + 1e-12, 0)
    return int(torch.searchsorted(cumulative, torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]))


def weighted_kmeans(
    x: torch.Tensor, weight: torch.Tensor, k: int, iterations: int, generator: torch.Generator
) -> torch.Tensor:
    """k centroids for the rows of ``x`` minimising the weighted squared error: k-means++ seeding
    (by weighted distance, on a random sample of ``SEEDING_SAMPLE × k`` rows), then Lloyd steps
    on all rows (at most ``TRAINING_SAMPLE`` of them, drawn at random) whose updates are
    per-coordinate weighted means. A cluster that empties takes the worst-fitted vector."""
    n = x.shape[0]
    if n <= k:
        return torch.cat([x, x.new_zeros(k - n, x.shape[1])])
    if n > TRAINING_SAMPLE:
        subset = torch.randperm(n, generator=generator)[:TRAINING_SAMPLE]
        x, weight, n = x[subset], weight[subset], TRAINING_SAMPLE
    sample = torch.randperm(n, generator=generator)[: SEEDING_SAMPLE * k]
    xs, ws = x[sample], weight[sample]
    chosen = [int(torch.randint(len(sample), (1,), generator=generator))]
    distance = (ws * (xs - xs[chosen[0]]).pow(2)).sum(1)
    for _ in range(1, k):
        chosen.append(_draw(distance, generator))
        distance = torch.minimum(distance, (ws * (xs - xs[chosen[-1]]).pow(2)).sum(1))
    codebook = xs[chosen].clone()
    for _ in range(iterations):
        index = weighted_assign(x, weight, codebook)
        mass = torch.zeros(k, x.shape[1]).index_add_(0, index, weight)
        total = torch.zeros(k, x.shape[1]).index_add_(0, index, weight * x)
        codebook = torch.where(mass > 0, total / mass.clamp(min=1e-12), codebook)
        empty = torch.nonzero(torch.bincount(index, minlength=k) == 0).flatten()
        if empty.numel():
            worst = _weighted_errors(x, weight, codebook, index).topk(empty.numel()).indices
            codebook[empty] = x[worst]
    return codebook


@register
class VPTQ(Codec):
    """Vectors of ``vector`` weights along each row; one codebook per entry of ``codebooks``
    (sizes, powers of two), the later ones residual; ``iterations`` Lloyd steps each."""

    kind = "vptq"

    def __init__(self, vector: int = 4, codebooks: tuple | list = (256,), iterations: int = 20, seed: int = 0):
        codebooks = [int(k) for k in codebooks]
        if not isinstance(vector, int) or not 1 <= vector <= 32:
            raise ValueError(f"VPTQ: vector must be an int in [1, 32], got {vector!r}")
        if not codebooks or any(k < 2 or k & (k - 1) or k > 1 << 16 for k in codebooks):
            raise ValueError(f"VPTQ: codebook sizes must be powers of two in [2, 65536], got {codebooks}")
        if not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"VPTQ: iterations must be an int >= 0, got {iterations!r}")
        self.vector, self.codebooks, self.iterations, self.seed = vector, codebooks, iterations, int(seed)

    def settings(self) -> dict:
        return {"vector": self.vector, "codebooks": self.codebooks, "iterations": self.iterations, "seed": self.seed}

    def _vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, K] -> [N * ceil(K / v), v], the tail of each row padded with zeros."""
        N, K = rows.shape
        padded = rows.new_zeros(N, -(-K // self.vector) * self.vector)
        padded[:, :K] = rows
        return padded.reshape(-1, self.vector)

    def encode(self, weight, importance=None) -> Encoded:
        rows = as_rows(weight)
        scale = fp16_scale(rows.pow(2).mean(1).sqrt())
        importance = torch.ones_like(rows) if importance is None else as_rows(importance).clamp(min=0)
        # the error in weight units is scale² times the error of the normalised vectors
        x = self._vectors(rows / scale[:, None])
        w = self._vectors(importance * scale[:, None].pow(2))  # padding gets weight 0
        generator = torch.Generator().manual_seed(self.seed)
        parts = {"scale": scale.numpy().astype(np.float16)}
        residual = x
        for stage, k in enumerate(self.codebooks):
            codebook = weighted_kmeans(residual, w, k, self.iterations, generator).half().float()
            index = weighted_assign(residual, w, codebook)
            residual = residual - codebook[index]
            parts[f"codebook{stage}"] = codebook.numpy().astype(np.float16)
            parts[f"index{stage}"] = pack_bits(index.numpy(), int(math.log2(k)))
        return self._encoded(weight.shape, parts)

    def unpacked(self, encoded: Encoded) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(row scales [N], codebooks, index tensors) stored in ``encoded``."""
        scale = torch.from_numpy(encoded.parts["scale"].astype(np.float32))
        K = encoded.numel // scale.numel()
        n = scale.numel() * -(-K // self.vector)
        codebooks = [
            torch.from_numpy(encoded.parts[f"codebook{s}"].astype(np.float32)) for s in range(len(self.codebooks))
        ]
        indices = [
            torch.from_numpy(unpack_bits(encoded.parts[f"index{s}"], int(math.log2(k)), n))
            for s, k in enumerate(self.codebooks)
        ]
        return scale, codebooks, indices

    def assemble(self, shape, scale, codebooks, indices) -> torch.Tensor:
        vectors = sum(codebook[index] for codebook, index in zip(codebooks, indices))
        N = scale.numel()
        K = math.prod(shape) // N
        return (vectors.reshape(N, -1)[:, :K] * scale[:, None]).reshape(shape)

    def decode(self, encoded) -> torch.Tensor:
        return self.assemble(encoded.shape, *self.unpacked(encoded))

    def trainable(self, encoded) -> TrainableDecode:
        return _TrainableVPTQ(self, encoded)


class _TrainableVPTQ(TrainableDecode):
    """Indices fixed; codebooks and row scales trainable."""

    scale: torch.Tensor  # buffer

    def __init__(self, codec: VPTQ, encoded: Encoded):
        super().__init__()
        self.codec, self.encoded = codec, encoded
        scale, codebooks, indices = codec.unpacked(encoded)
        self.register_buffer("scale", scale)
        self.log_scale = relative_scale(scale)
        self.codebooks = nn.ParameterList([nn.Parameter(c) for c in codebooks])
        self.indices = indices

    def forward(self) -> torch.Tensor:
        return self.codec.assemble(
            self.encoded.shape, self.scale * self.log_scale.exp(), list(self.codebooks), self.indices
        )

    def export(self) -> Encoded:
        parts = dict(self.encoded.parts)
        parts["scale"] = (self.scale * self.log_scale.exp()).detach().numpy().astype(np.float16)
        for stage, codebook in enumerate(self.codebooks):
            parts[f"codebook{stage}"] = codebook.detach().numpy().astype(np.float16)
        return Encoded(self.encoded.kind, dict(self.encoded.params), self.encoded.shape, parts)
