"""Hidden states of any Hugging Face causal LM with thought tokens appended, through the
mechanisms every such model has, so the model itself needs no Quiet-STaR knowledge.

Attention: the extra tokens of ``Layout.for_steps`` become a custom 4D attention mask (the real
tokens see the real tokens before them, never an extra one; an extra token sees what its layout
row allows) and ``position_ids`` (an extra token at step s of position t sits at t + 1 + s).
Llama-family models and Cognate take both as they are.

Cognate's neural memory is the one piece a mask cannot describe: it is a running state that each
chunk of the sequence writes after reading it, and a thought must read the state its parent
column read and write nothing, so that nothing leaks from the columns after the parent. A thought
chain that extends the last column is, as far as any mask or position can say, a plain
continuation of the sequence, so the model cannot infer this from its inputs. Instead, for the
duration of one forward pass, ``thought_memory`` installs forward hooks on every
``NeuralMemory``: the pre-hook hands the memory an empty sequence (a hook cannot skip a module's
forward, so this makes the module's own pass a no-op) and keeps the real input; the forward hook
returns the memory output computed here from the module's own weights and chunk walk: the real
columns (with their left padding) write and read chunk by chunk exactly as in a plain pass, and
every extra column reads the state its parent's chunk read. The hooks are removed when the pass
ends, so the model is untouched outside it.
"""

from __future__ import annotations

import contextlib

import torch


def hidden_states(base, input_ids, attention_mask, extra=None):
    """Final hidden states [B, Q, d] of ``base`` for ``input_ids`` (real tokens, then the extra
    tokens described by ``extra`` = (parents, mask, positions) from ``Layout.for_steps``);
    ``attention_mask`` [B, Q] marks the real tokens' left padding (None: no padding)."""
    if extra is None:
        return base.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
    parents, mask, positions = extra
    Q, E = input_ids.shape[1], parents.shape[1]
    full = _full_mask(attention_mask, mask, Q)
    with thought_memory(base, Q - E, parents, _left_padding(attention_mask, input_ids[:, : Q - E])):
        return base.base_model(input_ids=input_ids, attention_mask=_hf_mask(base, full), position_ids=positions)[0]


def _left_padding(attention_mask, real_ids) -> torch.Tensor:
    """Left padding tokens per row [B] of the real columns."""
    if attention_mask is None:
        return torch.zeros(real_ids.shape[0], dtype=torch.long, device=real_ids.device)
    return (~attention_mask[:, : real_ids.shape[1]].bool()).sum(1)


def _full_mask(attention_mask, extra_mask, Q):
    """[B, 1, Q, Q] bool: causal (and left padding) among real tokens, ``extra_mask`` for extras."""
    B, E, _ = extra_mask.shape
    T = Q - E
    device = extra_mask.device
    real_valid = (
        torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask[:, :T].bool()
    )
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))[None] & real_valid[:, None, :]
    causal = causal | torch.eye(T, dtype=torch.bool, device=device)[None]
    real_rows = torch.cat((causal, torch.zeros(B, T, E, dtype=torch.bool, device=device)), dim=2)
    extra_rows = (
        extra_mask.bool() & torch.cat((real_valid, torch.ones(B, E, dtype=torch.bool, device=device)), 1)[:, None]
    )
    return torch.cat((real_rows, extra_rows), dim=1)[:, None]


def _hf_mask(base, mask: torch.Tensor) -> torch.Tensor:
    """A custom 4D mask in the form the model's attention implementation expects."""
    if getattr(base.config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=base.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(base.dtype).min
        )
    return mask


# ---------------------------------------------------------------------------------------------
# Cognate's neural memory with thought columns


@contextlib.contextmanager
def thought_memory(base, n_real: int, parents: torch.Tensor, pad_left: torch.Tensor):
    """While open, every Cognate ``NeuralMemory`` in ``base`` treats the columns from ``n_real``
    on as thoughts extending ``parents`` [B, E] (see the module docstring). Nothing for models
    without one."""
    from agentforge.models.modeling_cognate import NeuralMemory

    handles = []
    for memory in (m for m in base.modules() if isinstance(m, NeuralMemory)):
        kept: dict[str, torch.Tensor] = {}

        def keep_input(module, args, kept=kept):
            kept["x"] = args[0]
            return args[0][:, :0], args[1]

        def with_thoughts(module, args, output, kept=kept):
            return _memory_with_thoughts(module, kept.pop("x"), pad_left, n_real, parents)

        handles += [memory.register_forward_pre_hook(keep_input), memory.register_forward_hook(with_thoughts)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _memory_with_thoughts(memory, x, pad_left, n_real: int, parents):
    """The memory output for every column of ``x``: the first ``n_real`` columns as a plain pass
    computes them, each later column read with the state its parent column read; only the real
    columns write."""
    from agentforge.models.modeling_cognate import _rms_normalize, columns_of

    T = n_real
    q, k, v = (_rms_normalize(t) for t in memory.to_qkv(x).chunk(3, dim=-1))
    states, reads = memory._read_and_write(x[:, :T], q[:, :T], k[:, :T], v[:, :T], pad_left)
    if not reads:
        return torch.zeros_like(x)
    y = columns_of(reads, T, pad_left)
    chunk = (parents - pad_left[:, None]) // memory.config.memory_chunk
    q_extra = q[:, T:]
    y_extra = sum(memory._read(w1, w2, q_extra)[0] * (chunk == j)[..., None] for j, (w1, w2) in enumerate(states))
    return memory.out_proj(torch.cat((y, y_extra), dim=1))
