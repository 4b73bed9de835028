"""Experts on the shipped model, where no latent float weight is left to adapt.

The experts phase hands on a model whose BitLinear layers hold latent weights; the final
artifact holds them packed (ternary codes and scales only), so the SVD and z-vectors of
``agentforge.experts.svf`` have nothing to act on there. What two-pass inference needs at that
point is known when the phase ends: one weight set per router class (its searched mixture α
applied to the latent weights, then quantized as the layer quantizes). Those sets are written
next to the model (``expert_weights.safetensors``: ``<class>/<layer>.weight_packed`` and
``.weight_scale`` per adapted BitLinear, ``<class>/<layer>.weight`` for a float layer), travel
into ``model.afz`` with the other files, and are counted in its bytes.

    experts = DeployedExperts.attach(packed_model, directory)     # after loading the base model
    routes = experts.route(input_ids, attention_mask)             # pass one, base weights
    with experts.installed(routes[0]):                            # pass two, on the ternary kernels
        packed_model.generate(...)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEPLOYED_FILE = "expert_weights.safetensors"


def deployed_tensors(
    model: nn.Module, basis, experts: list[torch.Tensor], mixtures: Mapping[str, tuple[float, ...]]
) -> dict[str, torch.Tensor]:
    """Each router class's adapted weights as the shipped layer stores them: BitLinear layers
    quantized exactly as the layer quantizes (per tensor or per row) and packed, float layers in
    fp16. Classes whose mixture is all zero run the base weights and store nothing."""
    from agentforge import ops
    from agentforge.experts.svf import compose
    from agentforge.nn import BitLinear

    out = {}
    with torch.no_grad():
        for cls, alphas in mixtures.items():
            if not any(alphas):
                continue
            for name, weight in basis.adapted(compose(experts, alphas)).items():
                module = model.get_submodule(name)
                if isinstance(module, BitLinear):
                    codes, scale = ops.quantize_ternary(weight.float().contiguous(), module.per_channel)
                    out[f"{cls}/{name}.weight_packed"] = ops.pack_ternary(codes)
                    out[f"{cls}/{name}.weight_scale"] = scale.contiguous()
                else:
                    out[f"{cls}/{name}.weight"] = weight.to(torch.float16).contiguous()
    return out


class DeployedExperts:
    """The router and each class's weight set, attached to a loaded base model (packed or float)."""

    def __init__(self, model: nn.Module, router, tensors: Mapping[str, torch.Tensor]):
        from agentforge.nn import BitLinear

        self.model, self.router = model, router
        self.sets: dict[str, dict[str, Any]] = {}  # per class, per layer: its tensors, then its state tuple
        for key, tensor in tensors.items():
            cls, _, rest = key.partition("/")
            name, _, kind = rest.rpartition(".")
            self.sets.setdefault(cls, {}).setdefault(name, {})[kind] = tensor
        self._base = {name: self._state(model.get_submodule(name)) for layers in self.sets.values() for name in layers}
        for cls, layers in self.sets.items():
            for name, parts in layers.items():
                module = model.get_submodule(name)
                if isinstance(module, BitLinear):
                    if module.state != "packed":
                        raise ValueError(
                            f"experts: {name} is a BitLinear in {module.state} state; the deployed "
                            "weights are for the packed model (load the experts directory for the latent one)"
                        )
                    module._load_packed(parts["weight_packed"], parts["weight_scale"], f"experts {cls}/{name}")
                    layers[name] = ("packed", module.w_prepacked, module.w_scale)
                else:
                    layers[name] = ("float", parts["weight"].to(module.weight.dtype))
        for name, state in self._base.items():  # loading the sets swapped weights in: put the base back
            self._install(model.get_submodule(name), state)

    @classmethod
    def attach(cls, model: nn.Module, directory: str | Path) -> DeployedExperts:
        """The deployed experts stored in ``directory`` (``experts.json``, the router, the weight sets)."""
        import safetensors.torch

        from agentforge.experts.adaptive import ROUTER_FILE, SPEC_FILE
        from agentforge.experts.router import Router

        directory = Path(directory)
        spec = json.loads((directory / SPEC_FILE).read_text())
        router = Router(spec["router"]["features"], spec["router"]["classes"])
        router.load_state_dict(safetensors.torch.load_file(str(directory / ROUTER_FILE)))
        return cls(model, router.eval(), safetensors.torch.load_file(str(directory / DEPLOYED_FILE)))

    @staticmethod
    def _state(module: nn.Module) -> tuple:
        from agentforge.nn import BitLinear

        if isinstance(module, BitLinear):
            return ("packed", module.w_prepacked, module.w_scale)
        return ("float", module.weight.data)

    @staticmethod
    def _install(module: nn.Module, state: tuple) -> None:
        if state[0] == "packed":
            module.register_buffer("w_prepacked", state[1], persistent=False)
            module.register_buffer("w_scale", state[2], persistent=False)
        else:
            module.weight.data = state[1]

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """Pass one: each prompt's router class, read with the base weights."""
        from agentforge.experts.router import prompt_features

        return self.router.predict(prompt_features(self.model, input_ids, attention_mask))

    @contextlib.contextmanager
    def installed(self, cls: str) -> Iterator[nn.Module]:
        """The model with class ``cls``'s weights in place (the base weights for a class that
        adapts nothing), restored afterwards."""
        layers = self.sets.get(cls, {})
        try:
            for name, state in layers.items():
                self._install(self.model.get_submodule(name), state)
            yield self.model
        finally:
            for name in layers:
                self._install(self.model.get_submodule(name), self._base[name])
