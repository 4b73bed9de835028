"""The two-pass adaptive model and the one directory that holds it (format in ``agentforge.experts``;
each router class's weight set for the shipped, packed model in ``agentforge.experts.deploy``).

Pass one reads each prompt with the base weights and lets the router name its class; pass two
installs that class's mixture z′ = 1 + Σₖ αₖ (zₖ − 1) of the expert vectors and answers. Adapted
weights are built once per mixture and cached; prompts of one class are answered as one batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agentforge.experts.router import Router, prompt_features
from agentforge.experts.svf import SVDBasis, compose, installed

FORMAT = 1
EXPERTS_FILE = "experts.safetensors"
ROUTER_FILE = "router.safetensors"
SPEC_FILE = "experts.json"
SIGMA_RTOL = 1e-3  # a reloaded basis must reproduce the recorded singular values this closely


class AdaptiveModel(nn.Module):
    """A base model, its expert z-vectors, a router and one mixture α per router class.

    ``generate(input_ids, attention_mask, **kwargs)`` takes and returns what Hugging Face
    ``generate`` does (left-padded prompts in, prompts + new tokens out), running both passes;
    ``last_routes`` holds the class chosen for each row of the last call."""

    model: Any  # a transformers causal LM (its config and generate)

    def __init__(
        self,
        model: nn.Module,
        basis: SVDBasis,
        experts: Mapping[str, torch.Tensor],
        router: Router,
        mixtures: Mapping[str, Sequence[float]],
    ):
        super().__init__()
        missing = sorted(set(router.classes) - set(mixtures))
        if missing:
            raise ValueError(f"adaptive model: no mixture for router class(es) {missing}")
        if any(len(alphas) != len(experts) for alphas in mixtures.values()):
            raise ValueError(f"adaptive model: every mixture needs {len(experts)} weights, one per expert")
        self.model = model
        self.router = router
        self.basis = basis
        self.expert_names = list(experts)
        self.experts = [experts[name] for name in self.expert_names]
        self.mixtures = {cls: tuple(float(a) for a in alphas) for cls, alphas in mixtures.items()}
        self.last_routes: list[str] = []
        self._cache: dict[tuple[float, ...], dict[str, torch.Tensor]] = {}

    @property
    def config(self):
        return self.model.config

    def adapted_weights(self, alphas: Sequence[float]) -> dict[str, torch.Tensor]:
        """The adapted weights of a mixture, built on first use and cached ({} for α = 0)."""
        key = tuple(float(a) for a in alphas)
        if not any(key):
            return {}
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self.basis.adapted(compose(self.experts, key))
        return self._cache[key]

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """Pass one: the router's class for each (left-padded) prompt, read with the base weights."""
        return self.router.predict(prompt_features(self.model, input_ids, attention_mask))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Pass one routes every row; pass two generates each class's rows under its mixture."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        routes = self.route(input_ids, attention_mask)
        pad = kwargs.get("pad_token_id", self.model.config.pad_token_id)
        pad = pad if pad is not None else self.model.config.eos_token_id
        outputs: dict[int, torch.Tensor] = {}
        for cls in sorted(set(routes)):
            rows = [i for i, r in enumerate(routes) if r == cls]
            with installed(self.model, self.adapted_weights(self.mixtures[cls])):
                generated = self.model.generate(
                    input_ids=input_ids[rows], attention_mask=attention_mask[rows], **kwargs
                )
            outputs.update(zip(rows, generated))
        self.last_routes = routes
        width = max(row.numel() for row in outputs.values())
        result = torch.full((len(routes), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for i, row in outputs.items():
            result[i, : row.numel()] = row
        return result


def adaptive_files(adaptive: AdaptiveModel, describe: dict | None = None) -> Callable[[Path], None]:
    """``write(directory)``: the files that turn a saved base model into an experts directory (expert
    z-vectors, router, ``experts.json``), for ``save_model_dir``'s ``write_extra``. ``describe``
    adds JSON-ready facts to ``experts.json`` (e.g. the units each expert was trained on)."""
    import safetensors.torch

    from agentforge.experts.deploy import DEPLOYED_FILE, deployed_tensors

    tensors = {f"z/{name}": z.detach().float().contiguous() for name, z in zip(adaptive.expert_names, adaptive.experts)}
    deployed = deployed_tensors(adaptive.model, adaptive.basis, adaptive.experts, adaptive.mixtures)
    tensors.update({f"sigma/{name}": s.contiguous() for name, s in adaptive.basis.singular_values().items()})
    router_state = {k: v.detach().contiguous() for k, v in adaptive.router.state_dict().items()}
    spec = {
        "format": FORMAT,
        "experts": adaptive.expert_names,
        "targets": adaptive.basis.names,
        "sizes": adaptive.basis.sizes,
        "router": {"classes": adaptive.router.classes, "features": adaptive.router.linear.in_features},
        "mixtures": {cls: list(alphas) for cls, alphas in adaptive.mixtures.items()},
        **(describe or {}),
    }

    def write(directory: Path) -> None:
        safetensors.torch.save_file(tensors, str(directory / EXPERTS_FILE))
        safetensors.torch.save_file(deployed, str(directory / DEPLOYED_FILE))
        safetensors.torch.save_file(router_state, str(directory / ROUTER_FILE))
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")

    return write


def save_adaptive(
    adaptive: AdaptiveModel, tokenizer, path: str | Path, metadata: dict, describe: dict | None = None
) -> Path:
    """Write the base model, tokenizer, expert z-vectors, router and ``experts.json`` as one hashed
    model directory (atomic); ``describe`` as in ``adaptive_files``."""
    from agentforge.artifacts import save_model_dir

    return save_model_dir(adaptive.model, tokenizer, path, metadata, write_extra=adaptive_files(adaptive, describe))


def adaptive_of(model: nn.Module, path: str | Path) -> AdaptiveModel:
    """The two-pass model of an already loaded latent ``model`` and the experts saved beside it at
    ``path``: the SVD is recomputed from its weights and checked against the singular values
    recorded with the experts."""
    import safetensors.torch

    from agentforge.artifacts import CorruptArtifact

    path = Path(path)
    if not (path / SPEC_FILE).is_file():
        raise CorruptArtifact(f"{path}: no {SPEC_FILE}; not an experts directory (write it with save_adaptive)")
    spec = json.loads((path / SPEC_FILE).read_text())
    if spec.get("format") != FORMAT:
        raise CorruptArtifact(f"{path}: {SPEC_FILE} has format {spec.get('format')!r}, this loader reads {FORMAT}")
    tensors = safetensors.torch.load_file(str(path / EXPERTS_FILE))
    basis = SVDBasis(model, spec["targets"])
    for name in basis.names:
        recorded = tensors[f"sigma/{name}"]
        if recorded.shape != basis.factors[name][1].shape or not torch.allclose(
            basis.factors[name][1], recorded, rtol=SIGMA_RTOL, atol=1e-6
        ):
            raise CorruptArtifact(
                f"{path}: the singular values of {name} differ from those recorded with the experts; "
                "the base weights are not the ones the experts were trained on"
            )
    router = Router(spec["router"]["features"], spec["router"]["classes"])
    router.load_state_dict(safetensors.torch.load_file(str(path / ROUTER_FILE)))
    experts = {name: tensors[f"z/{name}"] for name in spec["experts"]}
    return AdaptiveModel(model, basis, experts, router, spec["mixtures"]).eval()


def load_adaptive(path: str | Path, *, verify: bool = True):
    """The two-pass model saved at ``path``: ``(AdaptiveModel, tokenizer, metadata)``. The base model
    loads as ``load_model_dir`` loads it; see ``adaptive_of``."""
    from agentforge.artifacts import load_model_dir

    model, tokenizer, metadata = load_model_dir(path, verify=verify)
    return adaptive_of(model, path), tokenizer, metadata
