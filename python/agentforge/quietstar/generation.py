"""Generating with hidden thoughts: before each new token the model thinks at the last column (a
thought of ``thought_length`` tokens between the start and end tokens, sampled or greedy), and
the token comes from the post-thought prediction mixed with the base one. There is no KV cache:
each step re-reads the sequence, and each thought step re-reads it with the chain so far."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agentforge.quietstar.backbone import hidden_states
from agentforge.quietstar.layout import Layout


@torch.no_grad()
def next_token_logits(model, input_ids, attention_mask=None, think: bool = True, greedy_thoughts: bool = False):
    """Logits of each row's next token [B, V] under the thinking model ``model`` and the thought
    behind it [B, L] (None without thinking): a thought at the last column, then its prediction
    mixed with the base one."""
    s, thought_ids, head = model.settings, list(model.tokens), model.base.get_output_embeddings()
    hidden = hidden_states(model.base, input_ids, attention_mask)
    base_logits = head(hidden[:, -1]).float()
    if not think:
        base_logits[:, thought_ids] = float("-inf")
        return base_logits, None
    chain = torch.full((input_ids.shape[0], 1), model.tokens.start_id, dtype=torch.long, device=input_ids.device)
    for _ in range(s.thought_length):
        logits = head(chain_state(model.base, input_ids, attention_mask, chain)).float()
        logits[:, thought_ids] = float("-inf")
        token = (
            logits.argmax(-1, keepdim=True)
            if greedy_thoughts
            else torch.multinomial(F.softmax(logits / s.temperature, -1), 1)
        )
        chain = torch.cat((chain, token), dim=1)
    chain = torch.cat((chain, torch.full_like(chain[:, :1], model.tokens.end_id)), dim=1)
    end_state = chain_state(model.base, input_ids, attention_mask, chain)
    w = model.mixing_head(hidden[:, -1], end_state)[:, None]
    mixed = w * head(end_state).float() + (1 - w) * base_logits
    mixed[:, thought_ids] = float("-inf")
    return mixed, chain[:, 1:-1]


def chain_state(base, input_ids, attention_mask, chain) -> torch.Tensor:
    """Hidden state [B, d] of the last token of ``chain``, a thought extending the last column."""
    B, T = input_ids.shape
    real_valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = (real_valid.long().cumsum(-1) - 1).clamp(min=0)
    layout = Layout(
        torch.full((B, 1), T - 1, device=input_ids.device),
        torch.ones(B, 1, dtype=torch.bool, device=input_ids.device),
        chain.shape[1],
    )
    extra = layout.for_steps(chain.shape[1], positions)
    mask = None if attention_mask is None else torch.cat((attention_mask, torch.ones_like(chain)), 1)
    return hidden_states(base, torch.cat((input_ids, chain), 1), mask, extra)[:, -1]


@torch.no_grad()
def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    think: bool = True,
    return_thoughts: bool = False,
    greedy_thoughts: bool = False,
    on_token=None,
):
    """Greedy decoding with the thinking model ``model``; each new token after a thought (hidden
    unless ``return_thoughts``). Rows are left-padded; finished rows keep emitting eos. Returns
    the new tokens [B, ≤ max] (and, with ``return_thoughts``, a list per step of the thought
    tokens [B, L]). ``on_token(tokens [B])`` sees each step's tokens as they come (streaming)."""
    was_training = model.training
    model.eval()
    mask = attention_mask
    out, thoughts = [], []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits, thought = next_token_logits(model, input_ids, mask, think, greedy_thoughts)
        token = torch.where(done, torch.full_like(done, eos_token_id, dtype=torch.long), logits.argmax(-1))
        out.append(token)
        thoughts.append(thought)
        if on_token is not None:
            on_token(token)
        done |= token == eos_token_id
        input_ids = torch.cat((input_ids, token[:, None]), 1)
        mask = None if mask is None else torch.cat((mask, torch.ones_like(token[:, None])), 1)
        if done.all():
            break
    model.train(was_training)
    new = torch.stack(out, 1)
    return (new, thoughts) if return_thoughts else new
