"""QK-clip (MuonClip, Kimi K2): keep attention logits bounded by shrinking W_q and W_k.

The attention-module contract (the model fills it, the optimizer reads it):

- `q_proj.weight`: `[num_heads * head_dim, d]`, head-major rows (head h owns rows
  `h*head_dim : (h+1)*head_dim`), the layout Hugging Face attention uses; `q_proj.bias` optional.
- `k_proj.weight`: `[num_kv_heads * head_dim, d]`, same layout; `k_proj.bias` optional.
- `num_heads: int`; `num_kv_heads: int` (optional, defaults to `num_heads`; grouped-query
  attention shares key head `j` among query heads `j*G : (j+1)*G`, `G = num_heads // num_kv_heads`).
- `max_logit`: float tensor `[num_heads]`, the largest pre-softmax attention logit of each query
  head (after the 1/sqrt(head_dim) scaling, i.e. the number the softmax sees) over the last
  forward pass. The module writes it there, e.g. `self.max_logit.copy_(scores.amax(dims))` under
  `torch.no_grad()`. With data parallelism, all-reduce it with MAX before the optimizer step.

Logits are bilinear in the q and k projections, so scaling a head's q rows by `a` and its k rows by
`b` scales its logits by exactly `a*b` (rotary embeddings are rotations and do not change this).
A model that normalises q and k after the projections (QK-norm) undoes the scaling; such models
bound their logits already and should not register for QK-clip.
"""

from __future__ import annotations

from typing import Any

import torch

CONTRACT = "q_proj.weight, k_proj.weight, num_heads, optional num_kv_heads, max_logit [num_heads]"

# An nn.Module that follows CONTRACT; its attributes are the model's own, which a type checker
# sees only as nn.Module.__getattr__'s Tensor | Module, so it is typed loosely.
AttentionModule = Any


def check_attention_module(module: AttentionModule) -> None:
    """Raise ValueError naming what is missing or inconsistent if `module` breaks the contract."""
    name = type(module).__name__
    for attribute in ("q_proj", "k_proj", "num_heads", "max_logit"):
        if not hasattr(module, attribute):
            raise ValueError(f"{name} has no `{attribute}`; QK-clip needs {CONTRACT}")
    heads, kv_heads = module.num_heads, _num_kv_heads(module)
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads > 0 and kv_heads > 0):
        raise ValueError(f"{name}: num_heads={heads!r} and num_kv_heads={kv_heads!r} must be positive ints")
    if heads % kv_heads:
        raise ValueError(f"{name}: num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
    q_rows, k_rows = module.q_proj.weight.shape[0], module.k_proj.weight.shape[0]
    if q_rows % heads:
        raise ValueError(f"{name}: q_proj has {q_rows} rows, not a multiple of num_heads={heads}")
    head_dim = q_rows // heads
    if k_rows != kv_heads * head_dim:
        raise ValueError(f"{name}: k_proj has {k_rows} rows, expected num_kv_heads*head_dim = {kv_heads * head_dim}")
    max_logit = module.max_logit
    if not torch.is_tensor(max_logit) or tuple(max_logit.shape) != (heads,):
        shape = tuple(max_logit.shape) if torch.is_tensor(max_logit) else type(max_logit).__name__
        raise ValueError(f"{name}: max_logit must be a tensor of shape ({heads},), got {shape}")


@torch.no_grad()
def qk_clip_(module: AttentionModule, tau: float) -> int:
    """Shrink the q/k rows of every head whose `max_logit` S exceeds `tau` so its logits scale by
    `tau / S`; return the number of query heads clipped.

    Without grouping each such head's q and k rows are scaled by `sqrt(tau / S)` (MuonClip: the
    product, not each factor, is `tau / S`). A key head shared by a group of query heads is scaled
    by the square root of the group's smallest factor, and each query head of the group by the
    rest of its own factor, so every head's logits scale by exactly its own `tau / S` (1 for heads
    at or below `tau`). `max_logit` is lowered to `tau` where clipped, which is what the same
    inputs would now give, so a second step without a forward pass does not clip again.
    """
    heads, kv_heads = module.num_heads, _num_kv_heads(module)
    q_weight = module.q_proj.weight
    head_dim = q_weight.shape[0] // heads
    max_logit = module.max_logit.detach().to(device=q_weight.device, dtype=torch.float32)
    too_large = max_logit > tau
    shrink = torch.where(too_large, tau / max_logit, torch.ones_like(max_logit))  # per query head
    shrink_by_group = shrink.view(kv_heads, heads // kv_heads)
    k_scale = shrink_by_group.amin(dim=1).sqrt()
    q_scale = (shrink_by_group / k_scale[:, None]).reshape(heads)
    _scale_head_rows_(module.q_proj, q_scale, head_dim)
    _scale_head_rows_(module.k_proj, k_scale, head_dim)
    module.max_logit.clamp_(max=tau)
    return int(too_large.sum())


def _scale_head_rows_(projection: Any, scale: torch.Tensor, head_dim: int) -> None:
    """Multiply each head's block of rows (weight and, if present, bias) by its entry of `scale`."""
    weight = projection.weight
    weight.view(-1, head_dim, weight.shape[1]).mul_(scale.to(weight.dtype)[:, None, None])
    bias = getattr(projection, "bias", None)
    if bias is not None:
        bias.view(-1, head_dim).mul_(scale.to(bias.dtype)[:, None])


def _num_kv_heads(module: AttentionModule) -> int:
    kv_heads = getattr(module, "num_kv_heads", None)
    return module.num_heads if kv_heads is None else kv_heads
