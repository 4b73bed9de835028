"""Knowledge distillation into the codecs' trainable parts: the compressed model (student) is
trained to match the uncompressed one (teacher) by the logit KL on calibration data, and only
what the codecs leave trainable moves — ternary scales, VPTQ codebooks and row scales, SeedLM
mantissas (on their 4-bit grid, straight through) and tensor scales, RTN scales, fp16 values.

The student is a copy of the teacher whose BitLinear layers are plain linear layers on int8
fake-quantised activations (exactly what the packed kernels compute), with every weight
supplied by its codec's trainable decoder through ``torch.func.functional_call``.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from agentforge import ops
from agentforge.compress.calibration import kl_loss
from agentforge.compress.codec import Encoded, TrainableDecode, codec_of
from agentforge.nn import BitLinear


class _ActQuantLinear(nn.Linear):
    """``F.linear`` on per-token int8 fake-quantised inputs: a packed BitLinear's arithmetic with
    its weight supplied from outside (codes × trainable scale)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ops.act_fake_quant(x), self.weight, self.bias)


def student_copy(teacher: nn.Module) -> nn.Module:
    """A frozen copy of ``teacher`` with each BitLinear replaced by an ``_ActQuantLinear``."""
    student = copy.deepcopy(teacher)
    for name, module in list(student.named_modules()):
        if isinstance(module, BitLinear):
            replacement = _ActQuantLinear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            replacement.weight, replacement.bias = module.weight, module.bias
            student.set_submodule(name, replacement)
    student.requires_grad_(False)
    return student


class Distillation(nn.Module):
    """The trainable decoders of ``encodings`` (one per list of tied state-dict names) feeding a
    frozen student; ``forward(**batch)`` returns the student's output, ``loss(batch)`` the KL to
    the teacher. Teacher and student are kept out of the module tree (and its checkpoints)."""

    teacher: nn.Module  # set with object.__setattr__, outside the module tree
    student: nn.Module

    def __init__(
        self, teacher: nn.Module, names: list[list[str]], encodings: list[Encoded], pad_token_id: int | None = None
    ):
        super().__init__()
        self.names, self.pad_token_id = names, pad_token_id
        self.decoders = nn.ModuleList([codec_of(e).trainable(e) for e in encodings])
        object.__setattr__(self, "teacher", teacher.eval())
        object.__setattr__(self, "student", student_copy(teacher).eval())

    def weights(self) -> dict[str, torch.Tensor]:
        """One name per tensor: ``functional_call`` ties the others (embedding and LM head) itself."""
        return {names[0]: decoder() for names, decoder in zip(self.names, self.decoders)}

    def forward(self, **batch):
        return functional_call(self.student, self.weights(), (), batch)

    def loss(self, batch: dict) -> torch.Tensor:
        """KL on every position that is not padding (a packed task row ends in pad tokens)."""
        ids = batch["input_ids"]
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids).logits
        mask = None if self.pad_token_id is None else ids != self.pad_token_id
        return kl_loss(teacher_logits, self(input_ids=ids).logits, mask)

    def export(self) -> list[Encoded]:
        """The Encoded tensors holding the trained values, in the order given."""
        with torch.no_grad():
            return [cast(TrainableDecode, decoder).export() for decoder in self.decoders]


def distillation_loss(model: Distillation, batch: dict) -> torch.Tensor:
    """``loss_fn`` for ``agentforge.train.train``."""
    return model.loss(batch)


@torch.no_grad()
def mean_kl(model: Distillation, batches: list[dict]) -> float:
    """The student's mean KL to the teacher over ``batches`` (for keeping or dropping the result)."""
    return sum(float(model.loss(batch)) for batch in batches) / len(batches)
