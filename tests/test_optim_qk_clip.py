"""QK-clip (MuonClip): hand-computed scales, exact logit shrink factors, the optimizer hook,
and clear errors for modules that break the contract."""

import math

import pytest
import torch
from torch import nn

from agentforge.optim import MuGrokfast
from agentforge.optim.qk_clip import check_attention_module, qk_clip_


class FakeAttention(nn.Module):
    """Just enough attention for QK-clip: q/k projections, head counts, a max_logit buffer."""

    def __init__(self, dim=3, heads=2, kv_heads=2, head_dim=2, bias=False):
        super().__init__()
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.register_buffer("max_logit", torch.zeros(heads))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits [heads, T, T] for x [T, dim] (key heads shared across their group)."""
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=0)
        return q @ k.transpose(1, 2) / math.sqrt(self.head_dim)


def filled(module: FakeAttention, q_value: float, k_value: float) -> FakeAttention:
    with torch.no_grad():
        module.q_proj.weight.fill_(q_value)
        module.k_proj.weight.fill_(k_value)
        for projection in (module.q_proj, module.k_proj):
            if projection.bias is not None:
                projection.bias.fill_(1.0)
    return module


def test_multi_head_hand_numbers():
    attention = filled(FakeAttention(bias=True), q_value=1.0, k_value=2.0)
    attention.max_logit.copy_(torch.tensor([80.0, 10.0]))
    clipped = qk_clip_(attention, tau=20.0)
    # Head 0: S = 80 > 20, so q and k rows each scale by sqrt(20/80) = 0.5; head 1 is untouched.
    assert clipped == 1
    assert torch.equal(attention.q_proj.weight, torch.tensor([[0.5] * 3] * 2 + [[1.0] * 3] * 2))
    assert torch.equal(attention.k_proj.weight, torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
    assert torch.equal(attention.q_proj.bias, torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.equal(attention.k_proj.bias, torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.equal(attention.max_logit, torch.tensor([20.0, 10.0]))


def test_grouped_query_hand_numbers():
    attention = filled(FakeAttention(heads=4, kv_heads=2), q_value=1.0, k_value=1.0)
    attention.max_logit.copy_(torch.tensor([80.0, 10.0, 45.0, 5.0]))
    assert qk_clip_(attention, tau=20.0) == 2
    # Per-head factors tau/S: [1/4, 1, 4/9, 1]. A shared key head takes sqrt of its group's smallest
    # factor ([1/2, 2/3]); each query head the rest of its own: [1/2, 2, 2/3, 3/2].
    q_rows = torch.tensor([0.5, 2.0, 2 / 3, 1.5]).repeat_interleave(2)
    k_rows = torch.tensor([0.5, 2 / 3]).repeat_interleave(2)
    torch.testing.assert_close(attention.q_proj.weight, q_rows[:, None].expand(8, 3).contiguous())
    torch.testing.assert_close(attention.k_proj.weight, k_rows[:, None].expand(4, 3).contiguous())


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_each_head_logits_shrink_by_tau_over_s(heads, kv_heads):
    attention = FakeAttention(dim=8, heads=heads, kv_heads=kv_heads, head_dim=4, bias=True).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        before = attention.logits(x)
        max_logit = before.amax(dim=(1, 2))
        attention.max_logit.copy_(max_logit)
        tau = max_logit.median().item()  # about half the heads exceed it
        qk_clip_(attention, tau)
        after = attention.logits(x)
    expected_factor = torch.where(max_logit > tau, tau / max_logit, torch.ones_like(max_logit))
    assert (expected_factor < 1).any() and (expected_factor == 1).any()
    torch.testing.assert_close(after, before * expected_factor[:, None, None])
    torch.testing.assert_close(after.amax(dim=(1, 2)), max_logit.clamp(max=tau))


def optimizer_for(model: nn.Module, **changes) -> MuGrokfast:
    arguments = dict(
        muon_lr=0.02,
        adamw_lr=3e-3,
        weight_decay=0.0,
        adamw_betas=(0.9, 0.95),
        momentum=0.95,
        grokfast_alpha=0.98,
        grokfast_lambda=0.0,
        warmup_steps=0,
        total_steps=10,
        min_lr_ratio=1.0,
        qk_clip_tau=20.0,
    )
    arguments.update(changes)
    return MuGrokfast(model, **arguments)


def test_step_clips_registered_modules_once():
    attention = filled(FakeAttention(), q_value=1.0, k_value=2.0)
    optimizer = optimizer_for(attention)
    optimizer.register_qk_clip([attention])
    attention.max_logit.copy_(torch.tensor([80.0, 10.0]))
    optimizer.step()  # no gradients: the inner optimizers leave the weights alone, QK-clip does not
    assert optimizer.last_qk_clipped_heads == 1
    expected_q = torch.tensor([[0.5] * 3] * 2 + [[1.0] * 3] * 2)
    assert torch.equal(attention.q_proj.weight, expected_q)
    optimizer.step()  # no forward pass in between: max_logit already says tau, nothing more to clip
    assert optimizer.last_qk_clipped_heads == 0
    assert torch.equal(attention.q_proj.weight, expected_q)


def test_step_without_tau_leaves_weights_alone():
    attention = filled(FakeAttention(), q_value=1.0, k_value=2.0)
    attention.max_logit.copy_(torch.tensor([80.0, 10.0]))
    optimizer_for(attention, qk_clip_tau=None).step()
    assert torch.equal(attention.q_proj.weight, torch.ones(4, 3))


def test_register_without_tau_is_refused():
    attention = FakeAttention()
    with pytest.raises(ValueError, match="QK-clip is off"):
        optimizer_for(attention, qk_clip_tau=None).register_qk_clip([attention])


def test_register_twice_is_refused():
    attention = FakeAttention()
    optimizer = optimizer_for(attention)
    optimizer.register_qk_clip([attention])
    with pytest.raises(ValueError, match="already registered"):
        optimizer.register_qk_clip([attention])


def without(attribute: str) -> FakeAttention:
    attention = FakeAttention()
    delattr(attention, attribute)
    return attention


@pytest.mark.parametrize(
    "module,message",
    [
        (without("q_proj"), "has no `q_proj`"),
        (without("max_logit"), "has no `max_logit`"),
        (FakeAttention(heads=3, kv_heads=2), "not a multiple of num_kv_heads"),
    ],
)
def test_contract_violations_are_named(module, message):
    with pytest.raises(ValueError, match=message):
        check_attention_module(module)


def test_contract_shape_mismatches_are_named():
    attention = FakeAttention()
    attention.max_logit = torch.zeros(3)
    with pytest.raises(ValueError, match=r"max_logit must be a tensor of shape \(2,\), got \(3,\)"):
        check_attention_module(attention)
    attention = FakeAttention()
    attention.k_proj = nn.Linear(3, 6, bias=False)
    with pytest.raises(ValueError, match="k_proj has 6 rows, expected num_kv_heads\\*head_dim = 4"):
        check_attention_module(attention)
    attention = FakeAttention()
    attention.num_heads = attention.num_kv_heads = 3
    with pytest.raises(ValueError, match="q_proj has 4 rows, not a multiple of num_heads=3"):
        check_attention_module(attention)
