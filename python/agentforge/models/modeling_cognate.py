"""Cognate: a small causal LM with a test-time neural memory and adaptive-depth recursion.

    tokens -> embed -> prelude blocks -> core block(s) x n (weight-shared, ACT halting) -> norm -> LM head

* Every block is pre-norm: sliding-window causal attention (RoPE) and a SwiGLU MLP.
* Prelude blocks listed in ``memory_layers`` add a Titans-style neural long-term memory (memory
  as a gate, MAG): an MLP whose weights are updated *inside the forward pass*, chunk by chunk, by
  gradient descent on an associative loss ||M(k) - v||^2 with momentum ("surprise") and a
  forgetting gate, all three rates predicted from the data. Tokens read the memory as it was
  after the previous chunk, so nothing sees the future. A learned gate blends the attention
  and memory outputs.
* The core is applied up to ``max_recursion`` times with shared weights, re-injecting the
  prelude output each time (TRM-style refinement: z <- core(z + e)). A halting head gives each
  token a probability of stopping after each pass; Graves' Adaptive Computation Time turns these
  into mixing weights over the passes, and the ponder cost (passes + remainder) is added to the
  loss. Halted tokens keep their state, so the same computation runs in training and inference,
  and inference stops early once every token has halted.

Strictly causal throughout: position t never depends on tokens after t (tested).
There is no KV cache: ``generate`` re-reads the whole sequence each step (the memory and the
recursion are recomputed), which is what a 1–25M-parameter model can afford.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from agentforge.models.configuration_cognate import CognateConfig


@dataclass
class CognateCausalLMOutput(CausalLMOutputWithPast):
    """``loss`` includes ``ponder_weight * ponder_cost``. ``ponder_cost`` is the mean over tokens of
    passes + remainder (ACT's ρ); ``mean_steps`` the mean number of core passes per token."""

    ponder_cost: torch.FloatTensor | None = None
    mean_steps: torch.FloatTensor | None = None


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, 1, T, head_dim/2] for rotating query/key pairs at ``positions`` [B, T]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None, :, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def attention_mask_4d(positions: torch.Tensor, key_valid: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean [B, 1, T, T]: query i may read key j iff j is a real token, 0 <= pos_i - pos_j < window.
    Every query may read itself, so a padding query has a defined (ignored) output."""
    delta = positions[:, :, None] - positions[:, None, :]
    allowed = (delta >= 0) & (delta < window) & key_valid[:, None, :]
    return (allowed | torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device))[:, None]


class SlidingWindowAttention(nn.Module):
    """Causal multi-head attention over the last ``window`` positions. ``max_logit`` [heads] keeps
    the largest pre-softmax logit of the last forward pass (the QK-clip contract of MuGrokfast)."""

    def __init__(self, config: CognateConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = self.num_kv_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.max_logit = torch.zeros(config.num_heads)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (
            proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        logits = logits.masked_fill(~mask, float("-inf"))
        self.max_logit = logits.detach().amax(dim=(0, 2, 3)).float()
        y = logits.softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def columns_of(reads: list[torch.Tensor], T: int, pad_left: torch.Tensor) -> torch.Tensor:
    """The memory reads of every chunk put back in their ``T`` columns: row b's chunks hold its
    real tokens in order, so token t goes to column pad_left[b] + t (padding columns read zero)."""
    flat = torch.cat(reads, dim=1)
    columns = torch.arange(T, device=flat.device)
    src = (columns - pad_left[:, None]).clamp(min=0)
    y = flat.gather(1, src[..., None].expand(-1, -1, flat.shape[-1]))
    return y * (columns >= pad_left[:, None])[..., None]


def _rms_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _clip_norm(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each sequence's gradient matrix scaled down to Frobenius norm ``max_norm`` if it is larger:
    one surprising chunk must not blow the memory up (unclipped writes diverged at lr 0.2)."""
    norm = g.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]
    return g * (max_norm / norm).clamp(max=1.0)


class NeuralMemory(nn.Module):
    """Titans long-term memory: an MLP M(x) = W2 silu(W1 x) per sequence, learned at test time.

    For each chunk of ``memory_chunk`` tokens: first read y = M(q) with the memory as it was after
    the previous chunk, then write the chunk: g = ∇_W mean ||M(k) - v||² (q, k, v RMS-normalised,
    g clipped to norm 1 per sequence), surprise
    S <- η S - θ g, memory W <- (1 - α) W + S, where η (momentum), θ (learning rate, at most
    ``memory_max_lr``) and α (forgetting) come from the chunk's mean input. The gradient is written
    out by hand (two small matmuls), so the update needs no autograd of its own and the outer
    training backpropagates through every write.

    Chunks start at each sequence's first real token, so a left-padded row of a batch computes
    exactly what it would alone.
    """

    def __init__(self, config: CognateConfig):
        super().__init__()
        d, m, h = config.hidden_size, config.memory_dim, config.memory_hidden
        self.config = config
        self.to_qkv = nn.Linear(d, 3 * m, bias=False)
        # momentum η, learning rate θ, forgetting α: plain parameters so _init_weights owns them
        self.rate_weight = nn.Parameter(torch.empty(3, d))
        self.rate_bias = nn.Parameter(torch.empty(3))
        self.w1 = nn.Parameter(torch.empty(h, m))  # the memory's initial weights, learned
        self.w2 = nn.Parameter(torch.empty(m, h))
        self.out_proj = nn.Linear(m, d, bias=False)

    @staticmethod
    def _read(w1, w2, x):
        pre = torch.einsum("bcm,bhm->bch", x, w1)
        return torch.einsum("bch,bmh->bcm", F.silu(pre), w2), pre

    @staticmethod
    def _gradient(w1, w2, k, v, valid):
        """∇ of the chunk's mean associative loss w.r.t. (w1, w2); padding tokens contribute nothing."""
        pred, pre = NeuralMemory._read(w1, w2, k)
        count = valid.sum(1).clamp(min=1)[:, None, None]
        err = 2 * (pred - v) * valid[..., None] / count
        act = F.silu(pre)
        g2 = torch.einsum("bcm,bch->bmh", err, act)
        sig = torch.sigmoid(pre)
        d_pre = torch.einsum("bcm,bmh->bch", err, w2) * sig * (1 + pre * (1 - sig))
        g1 = torch.einsum("bch,bcm->bhm", d_pre, k)
        return g1, g2

    def forward(self, x: torch.Tensor, pad_left: torch.Tensor) -> torch.Tensor:
        """Memory output for every column: each reads the memory as it was after the chunks
        before its own."""
        T = x.shape[1]
        q, k, v = (_rms_normalize(t) for t in self.to_qkv(x).chunk(3, dim=-1))
        _, reads = self._read_and_write(x, q, k, v, pad_left)
        if not reads:
            return torch.zeros_like(x)
        return self.out_proj(columns_of(reads, T, pad_left))

    def _read_and_write(self, x, q, k, v, pad_left):
        """Walk the chunks: read each with the memory as it stands, then write it. Returns the
        memory state each chunk read with and the reads."""
        B, T, _ = x.shape
        C = self.config.memory_chunk
        w1, w2 = self.w1.expand(B, -1, -1), self.w2.expand(B, -1, -1)
        s1, s2 = torch.zeros_like(w1), torch.zeros_like(w2)
        n_chunks = math.ceil(int((T - pad_left).max()) / C) if T else 0
        offsets = torch.arange(C, device=x.device)
        states, reads = [], []
        for j in range(n_chunks):
            idx = pad_left[:, None] + j * C + offsets  # [B, C] columns of this chunk in each row
            valid = (idx < T).to(x.dtype)
            idx = idx.clamp(max=T - 1)
            take = lambda t, idx=idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
            states.append((w1, w2))
            reads.append(self._read(w1, w2, take(q))[0])
            if j == n_chunks - 1:
                break  # the last write would never be read
            chunk_mean = (take(x) * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
            rates = torch.sigmoid(F.linear(chunk_mean, self.rate_weight, self.rate_bias))
            eta, theta, alpha = (r[:, None, None] for r in rates.unbind(-1))
            g1, g2 = (_clip_norm(g, 1.0) for g in self._gradient(w1, w2, take(k), take(v), valid))
            s1, s2 = (
                eta * s1 - theta * self.config.memory_max_lr * g1,
                eta * s2 - theta * self.config.memory_max_lr * g2,
            )
            w1, w2 = (1 - alpha) * w1 + s1, (1 - alpha) * w2 + s2
        return states, reads


class CognateBlock(nn.Module):
    """Pre-norm block: attention (gated with the neural memory when it has one), then SwiGLU."""

    def __init__(self, config: CognateConfig, with_memory: bool):
        super().__init__()
        d = config.hidden_size
        self.attn_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.attn = SlidingWindowAttention(config)
        self.memory = NeuralMemory(config) if with_memory else None
        self.memory_gate = nn.Linear(2 * d, d) if with_memory else None
        self.mlp_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(d, config.intermediate_size)

    def forward(self, x, rope, mask, pad_left):
        h = self.attn_norm(x)
        a = self.attn(h, rope, mask)
        if self.memory is not None:
            m = self.memory(h, pad_left)
            g = torch.sigmoid(self.memory_gate(torch.cat((a, m), dim=-1)))
            a = g * a + (1 - g) * m
        x = x + a
        return x + self.mlp(self.mlp_norm(x))


class HaltingHead(nn.Module):
    """Per-token probability of stopping after the current core pass."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d))
        self.bias = nn.Parameter(torch.empty(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z @ self.weight + self.bias)


class CognatePreTrainedModel(PreTrainedModel):
    config_class = CognateConfig
    base_model_prefix = "model"
    _no_split_modules = ["CognateBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NeuralMemory):
            init.normal_(module.w1, std=module.w1.shape[1] ** -0.5)
            init.normal_(module.w2, std=module.w2.shape[1] ** -0.5)
            init.zeros_(module.rate_weight)
            # start with little momentum, a moderate write rate and almost no forgetting
            init.copy_(module.rate_bias, torch.tensor([-2.0, 0.0, -4.0]))
        elif isinstance(module, HaltingHead):
            # a low halting probability at first, so early training uses every pass
            init.zeros_(module.weight)
            init.constant_(module.bias, -2.0)


class CognateModel(CognatePreTrainedModel):
    """The backbone: returns the final hidden states and the ACT statistics."""

    def __init__(self, config: CognateConfig):
        super().__init__(config)
        assert config.memory_layers is not None  # CognateConfig.__post_init__ fills it
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = nn.ModuleList(
            CognateBlock(config, i in config.memory_layers) for i in range(config.num_prelude_layers)
        )
        self.core = nn.ModuleList(CognateBlock(config, False) for _ in range(config.num_core_layers))
        self.halt_head = HaltingHead(config.hidden_size)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ):
        """``attention_mask``: [B, T] left padding, or a custom [B, 1, T, T] mask (boolean, True
        where a query may read a key, or additive float, 0 there), as Hugging Face models take
        one; either way a query also reads only keys within ``window`` positions before its own.
        A custom mask carries no padding, so the memory reads every column as one sequence from
        column 0 (pass position_ids with it when the columns are not positions 0..T-1)."""
        custom = attention_mask is not None and attention_mask.dim() == 4
        valid, pad_left = _left_padding(input_ids, None if custom else attention_mask)
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        x = self.embed_tokens(input_ids)
        head_dim = self.config.hidden_size // self.config.num_heads
        rope = rope_tables(position_ids, head_dim, self.config.rope_theta, x.dtype)
        mask = attention_mask_4d(position_ids, valid, self.config.window)
        if custom and attention_mask is not None:  # (custom implies a mask)
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            mask = mask & allowed | torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
        for block in self.prelude:
            x = block(x, rope, mask, pad_left)
        out, ponder, steps = self._recur(x, rope, mask, pad_left)
        weight = valid.to(out.dtype)
        n = weight.sum().clamp(min=1)
        return self.norm(out), (ponder * weight).sum() / n, (steps * weight).sum() / n

    def _recur(self, e, rope, mask, pad_left):
        """ACT over weight-shared core passes z <- core(z + e). Returns the halting-weighted mix of
        the pass outputs and, per token, ponder cost (passes + remainder) and passes run."""
        z, out = e, torch.zeros_like(e)
        cum = e.new_zeros(e.shape[:2])  # sum of halting probabilities before the final pass
        running = torch.ones(e.shape[:2], dtype=torch.bool, device=e.device)
        steps, remainder = torch.zeros_like(cum), torch.zeros_like(cum)
        threshold = 1.0 - self.config.halt_epsilon
        for n in range(1, self.config.max_recursion + 1):
            new = z + e
            for block in self.core:
                new = block(new, rope, mask, pad_left)
            z = torch.where(running[..., None], new, z)  # halted tokens keep their state
            p = self.halt_head(z)
            last = running & ((cum + p >= threshold) | (n == self.config.max_recursion))
            weight = torch.where(last, 1 - cum, torch.where(running, p, torch.zeros_like(p)))
            out = out + weight[..., None] * z
            steps = steps + running.to(steps.dtype)
            remainder = torch.where(last, 1 - cum, remainder)
            cum = cum + torch.where(running & ~last, p, torch.zeros_like(p))
            running = running & ~last
            if not running.any():
                break
        return out, steps + remainder, steps


def _left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Valid-token mask [B, T] and the number of left padding tokens per row [B]."""
    if attention_mask is None:
        return (
            torch.ones_like(input_ids, dtype=torch.bool),
            torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device),
        )
    valid = attention_mask.bool()
    if (valid[:, 1:].long() < valid[:, :-1].long()).any():
        raise ValueError(
            "Cognate: attention_mask must be left padding (zeros, then ones); use tokenizer.padding_side = 'left'"
        )
    return valid, (~valid).sum(1)


class CognateForCausalLM(CognatePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CognateConfig):
        super().__init__(config)
        self.model = CognateModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.generation_config.use_cache = False

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def attention_modules(self) -> list[SlidingWindowAttention]:
        """Every attention module (for MuGrokfast's QK-clip)."""
        return [m for m in self.modules() if isinstance(m, SlidingWindowAttention)]

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CognateCausalLMOutput:
        hidden, ponder, steps = self.model(input_ids, attention_mask, position_ids)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            loss = lm_loss + self.config.ponder_weight * ponder
        return CognateCausalLMOutput(loss=loss, logits=logits, ponder_cost=ponder, mean_steps=steps)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        # No cache: every generation step reads the whole sequence.
        kwargs.pop("cache", None)
        kwargs.pop("use_cache", None)
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=None, **kwargs)
