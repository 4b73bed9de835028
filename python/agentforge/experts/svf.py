"""Singular-value fine-tuning (SVF, Transformer², Sun, Cetin & Tang 2025).

Each chosen weight W [N, K] is decomposed once, W = U diag(σ) Vᵀ (fp32, thin SVD, r = min(N, K)).
An expert is one vector z per matrix, r numbers, and adapts the weight to

    W′ = U diag(σ ⊙ z) Vᵀ          (z = 1 gives W back)

All of an expert's vectors live in one flat tensor (``SVDBasis.split`` cuts it per matrix), which
is what the optimizer trains, what gradient similarity compares and what a mixture adds up.

Mixtures are written around the base model, z′ = 1 + Σₖ αₖ (zₖ − 1): this is the Σₖ αₖ zₖ of the
paper whenever the α sum to 1, and α = 0 is exactly the base model, so a search over α can
always fall back to it.

BitLinear layers (training state) are adapted through their latent weights: the adapted W′
takes the place of the latent weight, so the layer's forward quantizes it to ternary on the fly
(the gradient reaches z through the straight-through estimator) and ``ternary_weights`` gives the
packed codes a kernel runs. Experts stay deployable on the ternary kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import cast

import torch
from torch import nn

DEFAULT_SKIP = ("lm_head", "embed")


def target_weights(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules (BitLinear included) that SVF adapts: every one
    whose name contains none of the ``skip`` substrings (embeddings and the LM head by default)."""
    from agentforge.nn import BitLinear

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(pattern in name for pattern in skip):
            continue
        if isinstance(module, BitLinear) and module.state != "training":
            raise ValueError(
                f"SVF: BitLinear {name!r} is packed; SVF adapts latent weights, so load the "
                "training-state (latent) model"
            )
        names.append(name)
    if not names:
        raise ValueError(f"SVF: {type(model).__name__} has no nn.Linear layer outside the skip patterns {tuple(skip)}")
    return names


class SVDBasis:
    """The thin SVD of each target weight of a model, computed once from its current weights.

    ``names`` are module names; ``sizes[i]`` = r of matrix i; a flat z has ``total`` entries."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = list(names)
        self.dtypes = {}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name in self.names:
            weight = cast(torch.Tensor, model.get_submodule(name).weight).detach()
            if weight.dim() != 2:
                raise ValueError(f"SVF: {name}.weight is not a matrix (shape {list(weight.shape)})")
            self.dtypes[name] = weight.dtype
            self.factors[name] = torch.linalg.svd(weight.float(), full_matrices=False)
        self.sizes = [self.factors[n][1].numel() for n in self.names]
        self.total = sum(self.sizes)

    @classmethod
    def of(cls, model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> SVDBasis:
        """The basis of every target weight of ``model`` (see ``target_weights``)."""
        return cls(model, target_weights(model, skip))

    def ones(self) -> torch.Tensor:
        """The flat z of the base model."""
        return torch.ones(self.total)

    def split(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: z of that matrix}`` views of a flat z."""
        if z.shape != (self.total,):
            raise ValueError(f"SVF: z must be a flat vector of {self.total} values, got shape {list(z.shape)}")
        return dict(zip(self.names, torch.split(z, self.sizes)))

    def adapted(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: U diag(σ ⊙ z) Vᵀ}`` in each weight's dtype; differentiable in z."""
        out = {}
        for name, z_i in self.split(z).items():
            u, s, vh = self.factors[name]
            out[name] = ((u * (s * z_i)) @ vh).to(self.dtypes[name])
        return out

    def singular_values(self) -> dict[str, torch.Tensor]:
        """σ of each matrix (recorded with saved experts, to check a reloaded basis)."""
        return {name: self.factors[name][1] for name in self.names}

    def build_flops(self, n_mixed: int) -> int:
        """FLOPs of building one mixture's adapted weights, counted: z′ from ``n_mixed`` experts (a
        subtraction, a scaling and an addition per z entry and expert), then U diag(σ ⊙ z′) Vᵀ per
        matrix (r + N·r to scale, 2·N·r·K to multiply). 0 with nothing mixed: the base weights."""
        if not n_mixed:
            return 0
        shapes = [
            (self.factors[n][0].shape[0], self.factors[n][1].numel(), self.factors[n][2].shape[1]) for n in self.names
        ]
        return 3 * n_mixed * self.total + sum(r + n * r + 2 * n * r * k for n, r, k in shapes)

    def parameter_counts(self, lora_ranks: Sequence[int] = (1, 8, 16)) -> dict[str, int]:
        """Trainable numbers per expert: SVF's z against LoRA (r·(N + K) per matrix) at each rank."""
        shapes = [(self.factors[n][0].shape[0], self.factors[n][2].shape[1]) for n in self.names]
        counts = {"svf_z": self.total, "matrices": len(self.names)}
        counts.update({f"lora_rank{r}": sum(r * (n + k) for n, k in shapes) for r in lora_ranks})
        return counts


def adapted_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes one set of adapted weights occupies as deployed: 2-bit codes plus fp32 scales for a
    BitLinear (re-quantized to ternary), the weight's own dtype otherwise."""
    from agentforge.nn import BitLinear

    total = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, BitLinear):
            scales = module.out_features if module.per_channel else 1
            total += module.out_features * -(-module.in_features // 4) + 4 * scales
        else:
            weight = cast(torch.Tensor, module.weight)
            total += weight.numel() * weight.element_size()
    return total


def compose(experts: Sequence[torch.Tensor], alphas: Sequence[float]) -> torch.Tensor:
    """The mixture z′ = 1 + Σₖ αₖ (zₖ − 1) of flat expert vectors (α = 0: the base model)."""
    if len(experts) != len(alphas):
        raise ValueError(f"SVF compose: {len(experts)} experts but {len(alphas)} mixing weights")
    if not experts:
        raise ValueError("SVF compose: no experts to mix")
    mixed = torch.ones_like(experts[0])
    for z, alpha in zip(experts, alphas):
        mixed = mixed + float(alpha) * (z - 1)
    return mixed


def adapted_forward(model: nn.Module, basis: SVDBasis, z: torch.Tensor, **inputs):
    """``model(**inputs)`` with every target weight replaced by its adapted weight (gradients flow to z)."""
    weights = {f"{name}.weight": w for name, w in basis.adapted(z).items()}
    return torch.func.functional_call(model, weights, args=(), kwargs=inputs, strict=False)


@contextlib.contextmanager
def installed(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Run ``model`` with ``weights`` ({module name: tensor}) in place of its weights (no autograd:
    for generation and evaluation); the original tensors are back afterwards."""
    originals = {}
    try:
        for name, weight in weights.items():
            parameter = cast(torch.Tensor, model.get_submodule(name).weight)
            if parameter.shape != weight.shape:
                raise ValueError(
                    f"SVF: adapted {name} has shape {list(weight.shape)}, the model's is {list(parameter.shape)}"
                )
            originals[name] = parameter.data
            parameter.data = weight.detach()
        yield model
    finally:
        for name, data in originals.items():
            model.get_submodule(name).weight.data = data


def ternary_weights(
    basis: SVDBasis, z: torch.Tensor, per_channel: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapted weights re-quantized as a packed BitLinear stores them: ``{name: (canonical
    2-bit codes uint8 [N, ceil(K/4)], scale fp32)}``, ready for ``BitLinear.from_packed``."""
    from agentforge import ops

    out = {}
    with torch.no_grad():
        for name, weight in basis.adapted(z).items():
            codes, scale = ops.quantize_ternary(weight.float().contiguous(), per_channel)
            out[name] = (ops.pack_ternary(codes), scale)
    return out


class SVFExpert(nn.Module):
    """One expert as a module whose only parameter is the flat z (init 1 = the base model); calling
    it runs the frozen base model with adapted weights. Its ``state_dict`` is just ``{"z": ...}``, so
    the training loop checkpoints and resumes the expert alone."""

    def __init__(self, model: nn.Module, basis: SVDBasis, z: torch.Tensor | None = None):
        super().__init__()
        # kept out of the module tree: the base model is frozen and not part of the expert's state
        object.__setattr__(self, "base", model)
        self.basis = basis
        self.z = nn.Parameter(basis.ones() if z is None else z.detach().clone().float())

    def forward(self, **inputs):
        return adapted_forward(self.base, self.basis, self.z, **inputs)
