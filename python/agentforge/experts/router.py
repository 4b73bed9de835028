"""Pass one of two-pass inference: which expert should answer this prompt?

The base model reads the prompt once; the hidden state that enters its LM head (captured with a
forward pre-hook, so any Hugging Face causal LM works) gives two features, the state at the last
prompt token and the mean over the prompt's tokens. A multinomial logistic regression on the
standardised features, trained on the training split of every task unit, names the class: an
expert, or ``"base"`` for prompts no expert was trained for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BASE_CLASS = "base"


@torch.no_grad()
def prompt_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, 2·hidden] features of left-padded prompts: the final hidden state at the last token
    and its mean over the real tokens, read under the model's current weights."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"router: {type(model).__name__} has no output embeddings (LM head) to read hidden states at")
    captured = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        hook.remove()
    hidden = captured[-1].float()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(hidden.dtype)
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return torch.cat([hidden[:, -1], mean], dim=-1)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of prompts encoded alone, without special tokens."""
    from agentforge.eval._common import left_padded

    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return left_padded(ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def features_of(model, tokenizer, prompts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """``prompt_features`` of many prompts, in batches, in eval mode."""
    from agentforge.eval._common import evaluation_mode

    parts = []
    with evaluation_mode(model):
        for start in range(0, len(prompts), batch_size):
            parts.append(prompt_features(model, *encode_prompts(tokenizer, prompts[start : start + batch_size])))
    return torch.cat(parts)


class Router(nn.Module):
    """Softmax regression over standardised features; ``classes[i]`` names output i."""

    mean: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self, n_features: int, classes: Sequence[str]):
        super().__init__()
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"router: need at least two distinct classes, got {list(classes)}")
        self.classes = list(classes)
        self.linear = nn.Linear(n_features, len(classes))
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [batch, classes]."""
        return self.linear((features - self.mean) / self.scale)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> list[str]:
        """The most probable class name of each row."""
        return [self.classes[i] for i in self(features).argmax(-1).tolist()]

    def fit(
        self, features: torch.Tensor, labels: Sequence[str], *, weight_decay: float = 1e-3, steps: int = 100
    ) -> Router:
        """Full-batch L-BFGS on the cross-entropy + ``weight_decay``·‖W‖²; returns ``self``."""
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise ValueError(f"router: labels {unknown} are not among the classes {self.classes}")
        if features.shape[0] != len(labels):
            raise ValueError(f"router: {features.shape[0]} feature rows but {len(labels)} labels")
        target = torch.tensor([self.classes.index(label) for label in labels])
        self.mean.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp(min=1e-6))
        optimizer = torch.optim.LBFGS(self.linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(self(features), target) + weight_decay * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return self

    def accuracy(self, features: torch.Tensor, labels: Sequence[str]) -> float:
        """The share of rows whose predicted class is their label."""
        predicted = self.predict(features)
        return sum(p == label for p, label in zip(predicted, labels)) / max(len(labels), 1)
