"""Measuring a candidate tensor where it matters: at the output of the layers that use it, on
calibration activations, rather than by weight MSE alone.

``Calibration`` runs the model once on calibration batches and keeps the inputs of the modules
that own the tensors to compress (``agentforge.eval.capture``; the first ``max_calls`` calls of
each: a weight-shared block runs several times per forward) and their outputs, and then scores any
candidate tensor by re-running only those modules with it substituted
(``torch.func.functional_call``):

    error = Σ_calls ||f(x; Ŵ) − f(x; W)||² / Σ_calls ||f(x; W)||²

averaged over the modules that share the tensor (an embedding tied to the LM head counts at
both). A candidate for some rows only (a row sample of a large matrix) replaces just those rows,
and its error is scaled by rows / sampled rows: an unbiased estimate of the whole matrix's
(a plain ``nn.Linear`` computes only the output features of those rows). ``max_elements`` bounds
the work and memory per module: only its first calls whose outputs hold that many elements in
all (at least one call) score candidates (an LM head's logits on 2048 tokens of a 49k vocabulary
are 400 MB). It also gives each weight an importance for the codecs that can use one: the input
energy ``Σ x_k²`` of a linear layer's column k (the diagonal of its Hessian ``XᵀX``), the
token count of an embedding row, uniform elsewhere.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from agentforge.compress.tensors import TensorSlot
from agentforge.eval.capture import capture_calls


def _tensors(output) -> list[torch.Tensor]:
    """Every tensor inside a module's output (tensor, tuple/list, dict or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


class Calibration:
    """Inputs and outputs of the owner modules of ``slots`` on ``batches`` (dicts with
    ``input_ids`` and optionally ``attention_mask``); ``max_elements``: see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        slots: list[TensorSlot],
        batches: list[dict],
        max_calls: int = 8,
        max_elements: int | None = None,
    ):
        self.model = model
        self.modules = dict(model.named_modules())
        owners = list(dict.fromkeys(owner for slot in slots for owner, _ in slot.owners))
        self.calls = capture_calls(model, owners, batches, max_calls=max_calls, with_kwargs=True)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                self.outputs = {
                    name: self._scored_outputs(self.modules[name], calls, max_elements)
                    for name, calls in self.calls.items()
                }
        finally:
            model.train(was_training)
        # per owner: Σ ||f(x; W)||² over its scored calls, the error's denominator
        self.energy = {
            name: sum(sum(float(r.float().pow(2).sum()) for r in reference) for reference in outputs)
            for name, outputs in self.outputs.items()
        }

    @staticmethod
    def _scored_outputs(module: nn.Module, calls: list, max_elements: int | None) -> list[list[torch.Tensor]]:
        """The outputs of ``module``'s first calls, up to ``max_elements`` in all (at least one call)."""
        outputs: list[list[torch.Tensor]] = []
        elements = 0
        for args, kwargs in calls:
            out = _tensors(module(*args, **kwargs))
            elements += sum(o.numel() for o in out)
            if outputs and max_elements is not None and elements > max_elements:
                break
            outputs.append(out)
        return outputs

    @torch.no_grad()
    def output_error(self, slot: TensorSlot, candidate: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        """Relative error at the outputs of the modules using ``slot`` when they use
        ``candidate`` instead (mean over those modules); with ``rows``, ``candidate`` holds those
        rows of the tensor only and the error is estimated from them."""
        dtype, shape = slot.tensor.dtype, slot.tensor.shape
        errors = []
        for owner, attr in slot.owners:
            module = self.modules[owner]
            if rows is None:
                squared = self._squared_error(owner, attr, candidate.to(dtype).reshape(shape))
            elif type(module) is nn.Linear and attr == "weight":
                squared = self._squared_error_of_features(owner, candidate.to(dtype).reshape(len(rows), -1), rows)
            else:
                whole = slot.tensor.detach().clone()
                whole[rows] = candidate.to(dtype).reshape(len(rows), *shape[1:])
                squared = self._squared_error(owner, attr, whole)
            scale = 1.0 if rows is None else shape[0] / len(rows)
            errors.append(scale * squared / max(self.energy[owner], 1e-30))
        return sum(errors) / len(errors)

    def _squared_error(self, owner: str, attr: str, tensor: torch.Tensor) -> float:
        squared = 0.0
        for (args, kwargs), reference in zip(self.calls[owner], self.outputs[owner]):
            out = _tensors(functional_call(self.modules[owner], {attr: tensor}, args, kwargs))
            squared += sum(float((o - r).float().pow_(2).sum()) for o, r in zip(out, reference))
        return squared

    def _squared_error_of_features(self, owner: str, weight: torch.Tensor, rows: torch.Tensor) -> float:
        """``_squared_error`` of a linear layer whose weight differs in ``rows`` only: the other
        output features are unchanged, so only these are computed."""
        module, squared = self.modules[owner], 0.0
        bias = None if module.bias is None else module.bias[rows]
        for (args, _), (reference,) in zip(self.calls[owner], self.outputs[owner]):
            out = F.linear(args[0], weight, bias)
            squared += float((out - reference[..., rows]).float().pow_(2).sum())
        return squared

    def importance(self, slot: TensorSlot, floor: float) -> torch.Tensor | None:
        """Per-weight importance, mean 1, mixed with a uniform ``floor`` (weights never exercised by
        the calibration data still count); None when no owner gives one."""
        maps = [
            m
            for m in (self._owner_importance(owner, attr, slot.tensor) for owner, attr in slot.owners)
            if m is not None
        ]
        if not maps:
            return None
        mean = cast(torch.Tensor, sum(m / m.mean().clamp(min=1e-30) for m in maps)) / len(maps)
        return (1 - floor) * mean + floor

    def _owner_importance(self, owner: str, attr: str, tensor: torch.Tensor) -> torch.Tensor | None:
        module, calls = self.modules[owner], self.calls[owner]
        if attr != "weight" or not calls or tensor.dim() != 2:
            return None
        if isinstance(module, nn.Embedding):
            counts = cast(
                torch.Tensor,
                sum(torch.bincount(args[0].reshape(-1), minlength=tensor.shape[0]).float() for args, _ in calls),
            )
            return counts[:, None].expand_as(tensor).clone()
        if isinstance(module, nn.Linear):
            energy = sum(args[0].float().reshape(-1, tensor.shape[1]).pow(2).sum(0) for args, _ in calls)
            return energy[None, :].expand_as(tensor).clone()
        return None


def kl_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Differentiable mean KL(teacher ‖ student) over the (masked) positions."""
    teacher = F.log_softmax(teacher_logits.float(), -1)
    per_token = (teacher.exp() * (teacher - F.log_softmax(student_logits.float(), -1))).sum(-1)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
