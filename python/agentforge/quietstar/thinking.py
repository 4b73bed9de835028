"""Quiet-STaR (Zelikman et al. 2024): the model thinks before each token, for any causal LM.

Training forward, the paper's parallel ("diagonal") sampling without a KV cache. A sequence x of
T tokens gets, for each of P chosen positions t, a chain of S extra tokens appended as columns
T + s·P + p (step s, position index p):

    s = 0              <|startthought|>
    s = 1 .. L         L sampled thought tokens
    s = L + 1          <|endthought|>
    s = L + 2 .. L + k x[t+1] .. x[t+k-1], the true next tokens, teacher-forced

The extra token (s, p) has position id t + 1 + s and may attend to x[0..t] and to the extra
tokens of its own position at steps ≤ s, nothing else: every thought sees its prefix and its own
past, and one forward pass computes step s for all P positions. The real tokens never see the
extras, so the same pass gives the base (no-thought) predictions too. Sampling step s needs the
logits of step s − 1, so the L thought tokens take L passes without gradients; one pass with
gradients then scores everything.

The end token (step L+1) predicts x[t+1] after the thought, and step L+1+m (fed x[t+m]) predicts
x[t+1+m]. For each of these k targets, the mixing head (an MLP over the base hidden state at
column t+m and the post-thought hidden state) gives a weight w in (0, 1) and the prediction is
softmax(w · post-thought logits + (1 − w) · base logits).

Loss = mean NLL of the mixed predictions + base_loss_weight · the plain next-token NLL
     + reinforce_weight · REINFORCE: each thought's reward is the log-likelihood of its k true
       tokens minus the mean over the n thoughts sampled for the same position (the baseline),
       times the log-probability of the thought's tokens.
"""
from __future__ import annotations

import math

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

START, END = "<|startthought|>", "<|endthought|>"
MIXING_HEAD_FILE = "mixing_head.safetensors"
SETTINGS_FILE = "quietstar.json"
IGNORE_INDEX = -100


@dataclass
class ThoughtSettings:
    n_thoughts: int = 2  # thoughts sampled per position (the REINFORCE baseline is their mean)
    thought_length: int = 4  # L sampled tokens between the start and end tokens
    lookahead: int = 3  # k true tokens scored after each thought
    temperature: float = 1.0
    reinforce_weight: float = 1.0
    base_loss_weight: float = 0.5
    clamp_negative_rewards: bool = False  # the paper keeps only better-than-mean thoughts
    positions: str = "answers"  # "all" positions, or those whose next token carries a label
    mixing_hidden: int = 64
    mixing_init: float = 0.12  # the mixing head's initial weight on the post-thought prediction
    start_id: int = -1
    end_id: int = -1

    def __post_init__(self):
        for name in ("n_thoughts", "thought_length", "lookahead", "mixing_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"quietstar: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.positions not in ("all", "answers"):
            raise ValueError(f"quietstar: positions must be 'all' or 'answers', got {self.positions!r}")
        if not self.temperature > 0:
            raise ValueError(f"quietstar: temperature must be > 0, got {self.temperature}")
        if not 0 < self.mixing_init < 1:
            raise ValueError(f"quietstar: mixing_init must be in (0, 1), got {self.mixing_init}")

    @property
    def steps(self) -> int:
        """Extra tokens per position: start, thought, end, then k − 1 teacher-forced tokens."""
        return self.thought_length + 1 + self.lookahead


def add_thought_tokens(model, tokenizer, like: str = "---") -> tuple[int, int]:
    """Add the start/end-of-thought tokens to ``tokenizer`` and ``model``'s (tied or untied)
    embeddings; both start as the mean embedding of ``like``'s tokens (the paper's choice)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [START, END]})
    start_id, end_id = tokenizer.convert_tokens_to_ids([START, END])
    old = model.get_input_embeddings().weight.shape[0]
    if max(start_id, end_id) >= old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set just below
    seed_ids = tokenizer(like, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for embedding in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            embedding.weight[[start_id, end_id]] = embedding.weight[seed_ids].mean(0)
    return start_id, end_id


# ---------------------------------------------------------------------------------------------
# the extended layout


@dataclass
class Layout:
    """Columns, positions and visibility of the extra tokens for a batch (P positions per row)."""

    parents: torch.Tensor  # [B, P] real column each chain extends (0 for padding entries)
    valid: torch.Tensor  # [B, P] whether entry p is a real chosen position
    steps: int

    def columns(self, n_real: int, step: int) -> torch.Tensor:
        """Columns of step ``step``'s extra tokens: [P]."""
        P = self.parents.shape[1]
        return n_real + step * P + torch.arange(P, device=self.parents.device)

    def for_steps(self, n_steps: int, real_positions: torch.Tensor):
        """``(extra_parents [B, E], extra_mask [B, E, T + E], position_ids [B, T + E])`` for the
        first ``n_steps`` steps; ``real_positions`` [B, T] are the real tokens' positions."""
        B, P = self.parents.shape
        T = real_positions.shape[1]
        device = self.parents.device
        step = torch.arange(n_steps, device=device).repeat_interleave(P)  # [E]
        index = torch.arange(P, device=device).repeat(n_steps)  # [E]
        parents = self.parents[:, index]  # [B, E]
        # extra -> real: columns up to the parent
        sees_real = torch.arange(T, device=device)[None, None, :] <= parents[..., None]
        # extra -> extra: same position, earlier or same step
        sees_extra = (index[:, None] == index[None, :]) & (step[None, :] <= step[:, None])
        mask = torch.cat((sees_real, sees_extra[None].expand(B, -1, -1)), dim=2)
        positions = torch.cat((real_positions, real_positions.gather(1, parents) + 1 + step[None]), dim=1)
        return parents, mask, positions


def choose_positions(labels: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the real columns t to think at: every column but the last ("all"), or those whose
    next token has a label ("answers"). Returns ``(parents [B, P], valid [B, P])``, padded."""
    B, T = labels.shape
    if mode == "all":
        chosen = torch.ones(B, T - 1, dtype=torch.bool, device=labels.device)
    else:
        chosen = labels[:, 1:] != IGNORE_INDEX
    counts = chosen.sum(1)
    P = max(int(counts.max()), 1)
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :P]  # chosen columns first, in order
    valid = torch.arange(P, device=labels.device)[None] < counts[:, None]
    return torch.where(valid, order, 0), valid


# ---------------------------------------------------------------------------------------------
# the backbone: hidden states of any causal LM with extra tokens


def hidden_states(base, input_ids, attention_mask, extra=None):
    """Final hidden states [B, Q, d] of ``base`` for ``input_ids`` (real tokens, then the extra
    tokens described by ``extra`` = (parents, mask, positions) from ``Layout.for_steps``)."""
    from agentforge.models.modeling_cognate import CognateForCausalLM

    if isinstance(base, CognateForCausalLM):
        parents, mask, positions = extra if extra is not None else (None, None, None)
        return base.model(input_ids, attention_mask, positions, parents, mask)[0]
    if extra is None:
        return base.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    parents, mask, positions = extra
    full = _full_mask(attention_mask, mask, input_ids.shape[1])
    return base.base_model(input_ids=input_ids, attention_mask=_hf_mask(base, full),
                           position_ids=positions).last_hidden_state


def _full_mask(attention_mask, extra_mask, Q):
    """[B, 1, Q, Q] bool: causal (and left padding) among real tokens, ``extra_mask`` for extras."""
    B, E, _ = extra_mask.shape
    T = Q - E
    device = extra_mask.device
    real_valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask[:, :T].bool()
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))[None] & real_valid[:, None, :]
    causal = causal | torch.eye(T, dtype=torch.bool, device=device)[None]
    real_rows = torch.cat((causal, torch.zeros(B, T, E, dtype=torch.bool, device=device)), dim=2)
    extra_rows = extra_mask.bool() & torch.cat((real_valid, torch.ones(B, E, dtype=torch.bool, device=device)), 1)[:, None]
    return torch.cat((real_rows, extra_rows), dim=1)[:, None]


def _hf_mask(base, mask: torch.Tensor) -> torch.Tensor:
    """A custom 4D mask in the form the model's attention implementation expects."""
    if getattr(base.config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=base.dtype, device=mask.device).masked_fill(~mask, torch.finfo(base.dtype).min)
    return mask


def reinforce_loss(reward, logprob, scored, n: int, clamp_negative: bool = False):
    """REINFORCE with the paper's baseline: rows are n thought replicas of B/n sequences
    (replica i of sequence r in row r + i·B/n); each thought's advantage is its reward minus the
    mean reward of the n thoughts at the same position. Returns ``(loss, advantage)``; the loss's
    gradient raises the log-probability of better-than-average thoughts."""
    B, P = reward.shape
    rows = reward.view(n, B // n, P)
    advantage = (rows - rows.mean(0, keepdim=True)).view(B, P).detach()
    if clamp_negative:
        advantage = advantage.clamp(min=0)
    loss = -(advantage * logprob * scored).sum() / scored.sum().clamp(min=1)
    return loss, advantage


# ---------------------------------------------------------------------------------------------
# the thinking model


class MixingHead(nn.Module):
    """w = σ(MLP([h_base; h_thought])) in (0, 1): how much of the post-thought prediction to use.
    The output bias starts at logit(``init_weight``) (0.12 by default), so training starts close
    to the base model."""

    def __init__(self, d: int, hidden: int, init_weight: float = 0.12):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.net[2].bias.fill_(math.log(init_weight / (1 - init_weight)))

    def forward(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(torch.cat((h_base, h_thought), dim=-1))).squeeze(-1)


@dataclass
class ThinkingOutput:
    loss: torch.Tensor
    metrics: dict


class ThinkingModel(nn.Module):
    """A causal LM (``base``) plus a mixing head, trained with the Quiet-STaR loss (``forward``)
    and generating with hidden thoughts (``generate``); ``think=False`` anywhere gives the base."""

    def __init__(self, base: nn.Module, settings: ThoughtSettings):
        super().__init__()
        if settings.start_id < 0 or settings.end_id < 0:
            raise ValueError("quietstar: settings need the start/end token ids (see add_thought_tokens)")
        self.base = base
        self.settings = settings
        self.mixing_head = MixingHead(base.config.hidden_size, settings.mixing_hidden, settings.mixing_init)

    # --- training ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_) -> ThinkingOutput:
        s = self.settings
        n = s.n_thoughts
        ids, labels = input_ids.repeat(n, 1), labels.repeat(n, 1)  # row r + i·B is thought i of row r
        parents, valid = choose_positions(labels, s.positions)
        layout = Layout(parents, valid, s.steps)
        T = ids.shape[1]
        real_positions = torch.arange(T, device=ids.device).expand_as(ids)
        thoughts = self._sample_thoughts(ids, layout, real_positions)
        extra_ids = self._extra_tokens(ids, layout, thoughts)
        extra = layout.for_steps(s.steps, real_positions)
        hidden = hidden_states(self.base, torch.cat((ids, extra_ids), 1), None, extra)
        logits = self.base.get_output_embeddings()(hidden)
        return self._loss(ids, labels, layout, hidden, logits, thoughts, n)

    @torch.no_grad()
    def _sample_thoughts(self, ids, layout: Layout, real_positions) -> torch.Tensor:
        """The L thought tokens [B, L, P], one forward pass per step (a step needs the previous one)."""
        s = self.settings
        B, P = layout.parents.shape
        chain = torch.full((B, 1, P), s.start_id, dtype=torch.long, device=ids.device)
        for step in range(1, s.thought_length + 1):
            extra = layout.for_steps(step, real_positions)
            hidden = hidden_states(self.base, torch.cat((ids, chain.flatten(1)), 1), None, extra)
            last = hidden[:, -P:]  # the newest step's extra tokens
            logits = self.base.get_output_embeddings()(last).float()
            logits[..., [s.start_id, s.end_id]] = float("-inf")  # a thought never nests or ends early
            token = torch.multinomial(F.softmax(logits / s.temperature, -1).flatten(0, 1), 1).view(B, 1, P)
            chain = torch.cat((chain, token), dim=1)
        return chain[:, 1:]

    def _extra_tokens(self, ids, layout: Layout, thoughts) -> torch.Tensor:
        """All S steps' tokens, step-major: start, thought, end, then x[t+1..t+k-1] (clamped at the end)."""
        s = self.settings
        B, P = layout.parents.shape
        T = ids.shape[1]
        start = torch.full((B, 1, P), s.start_id, dtype=torch.long, device=ids.device)
        end = torch.full((B, 1, P), s.end_id, dtype=torch.long, device=ids.device)
        forced = [ids.gather(1, (layout.parents + 1 + m).clamp(max=T - 1))[:, None] for m in range(s.lookahead - 1)]
        return torch.cat([start, thoughts, end, *forced], dim=1).flatten(1)

    def _loss(self, ids, labels, layout: Layout, hidden, logits, thoughts, n) -> ThinkingOutput:
        s = self.settings
        B, P = layout.parents.shape
        T = ids.shape[1]
        logp_mixed, weights, target_ok = [], [], []
        for m in range(s.lookahead):
            base_col = (layout.parents + m).clamp(max=T - 1)  # predicts x[t + 1 + m]
            thought_col = layout.columns(T, s.thought_length + 1 + m)
            target_col = layout.parents + 1 + m
            ok = layout.valid & (target_col < T)
            target = labels.gather(1, target_col.clamp(max=T - 1))
            ok = ok & (target != IGNORE_INDEX)
            h_base = hidden.gather(1, base_col[..., None].expand(-1, -1, hidden.shape[-1]))
            h_thought = hidden[:, thought_col]
            w = self.mixing_head(h_base, h_thought)
            mixed = w[..., None] * logits[:, thought_col] + (1 - w[..., None]) * logits.gather(
                1, base_col[..., None].expand(-1, -1, logits.shape[-1]))
            logp = F.log_softmax(mixed.float(), -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
            logp_mixed.append(logp)
            weights.append(w)
            target_ok.append(ok)
        logp_mixed, ok = torch.stack(logp_mixed, -1), torch.stack(target_ok, -1)  # [B, P, k]
        mixed_nll = -(logp_mixed * ok).sum() / ok.sum().clamp(min=1)

        base_logits = logits[:, :T - 1].float()
        base_nll = F.cross_entropy(base_logits.reshape(-1, base_logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX)

        scored = ok.any(-1)
        reward = (logp_mixed.detach() * ok).sum(-1)  # log-likelihood of the k true tokens [n·B, P]
        policy, advantage = reinforce_loss(reward, self._thought_logprob(logits, layout, thoughts, T), scored, n,
                                           s.clamp_negative_rewards)
        loss = mixed_nll + s.base_loss_weight * base_nll + s.reinforce_weight * policy
        mix = torch.stack(weights, -1)
        metrics = {"mixed_nll": mixed_nll.item(), "base_nll": base_nll.item(), "policy_loss": policy.item(),
                   "mixing_weight": ((mix * ok).sum() / ok.sum().clamp(min=1)).item(),
                   "reward_spread": (advantage.abs().sum() / scored.sum().clamp(min=1)).item()}
        return ThinkingOutput(loss=loss, metrics=metrics)

    def _thought_logprob(self, logits, layout: Layout, thoughts, T) -> torch.Tensor:
        """log π(thought) [B, P]: the L sampled tokens under the logits that sampled them."""
        total = 0.0
        for step in range(1, self.settings.thought_length + 1):
            prev = logits[:, layout.columns(T, step - 1)].float()  # [B, P, V]
            prev[..., [self.settings.start_id, self.settings.end_id]] = float("-inf")
            logp = F.log_softmax(prev / self.settings.temperature, -1)
            total = total + logp.gather(-1, thoughts[:, step - 1][..., None]).squeeze(-1)
        return total

    # --- inference ----------------------------------------------------------------------------

    @torch.no_grad()
    def answer_logprobs(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T] of the labelled tokens (0 elsewhere), each predicted after one
        sampled thought at the position before it and mixed with the base prediction."""
        s = self.settings
        T = input_ids.shape[1]
        parents, valid = choose_positions(labels, "answers")
        layout = Layout(parents, valid, s.thought_length + 2)  # start, thought, end
        real_positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
        thoughts = self._sample_thoughts(input_ids, layout, real_positions)
        B, P = parents.shape
        ends = torch.full((B, 1, P), s.end_id, dtype=torch.long, device=input_ids.device)
        extra_ids = torch.cat((torch.full_like(ends, s.start_id), thoughts, ends), dim=1).flatten(1)
        extra = layout.for_steps(s.thought_length + 2, real_positions)
        hidden = hidden_states(self.base, torch.cat((input_ids, extra_ids), 1), None, extra)
        head = self.base.get_output_embeddings()
        h_base = hidden.gather(1, parents[..., None].expand(-1, -1, hidden.shape[-1]))
        h_thought = hidden[:, layout.columns(T, s.thought_length + 1)]
        w = self.mixing_head(h_base, h_thought)[..., None]
        mixed = (w * head(h_thought) + (1 - w) * head(h_base)).float()
        mixed[..., [s.start_id, s.end_id]] = float("-inf")
        target_col = (parents + 1).clamp(max=T - 1)
        target = labels.gather(1, target_col)
        ok = valid & (target != IGNORE_INDEX) & (parents + 1 < T)
        logp = torch.log_softmax(mixed, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        return torch.zeros(B, T, device=input_ids.device).scatter_add(1, target_col, logp * ok)

    @torch.no_grad()
    def next_token_logits(self, input_ids, attention_mask=None, think: bool = True, greedy_thoughts: bool = False):
        """Logits of each row's next token [B, V] and the thought behind it [B, L] (None without
        thinking): a thought at the last column, then its prediction mixed with the base one."""
        s = self.settings
        hidden = hidden_states(self.base, input_ids, attention_mask)
        base_logits = self.base.get_output_embeddings()(hidden[:, -1]).float()
        if not think:
            base_logits[:, [s.start_id, s.end_id]] = float("-inf")
            return base_logits, None
        chain = torch.full((input_ids.shape[0], 1), s.start_id, dtype=torch.long, device=input_ids.device)
        for _ in range(s.thought_length):
            logits = self.base.get_output_embeddings()(self._chain_state(input_ids, attention_mask, chain)).float()
            logits[:, [s.start_id, s.end_id]] = float("-inf")
            token = (logits.argmax(-1, keepdim=True) if greedy_thoughts
                     else torch.multinomial(F.softmax(logits / s.temperature, -1), 1))
            chain = torch.cat((chain, token), dim=1)
        chain = torch.cat((chain, torch.full_like(chain[:, :1], s.end_id)), dim=1)
        end_state = self._chain_state(input_ids, attention_mask, chain)
        w = self.mixing_head(hidden[:, -1], end_state)[:, None]
        mixed = w * self.base.get_output_embeddings()(end_state).float() + (1 - w) * base_logits
        mixed[:, [s.start_id, s.end_id]] = float("-inf")
        return mixed, chain[:, 1:-1]

    def _chain_state(self, input_ids, attention_mask, chain) -> torch.Tensor:
        """Hidden state [B, d] of the last token of ``chain``, a thought extending the last column."""
        B, T = input_ids.shape
        real_valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = (real_valid.long().cumsum(-1) - 1).clamp(min=0)
        layout = Layout(torch.full((B, 1), T - 1, device=input_ids.device),
                        torch.ones(B, 1, dtype=torch.bool, device=input_ids.device), chain.shape[1])
        extra = layout.for_steps(chain.shape[1], positions)
        mask = None if attention_mask is None else torch.cat((attention_mask, torch.ones_like(chain)), 1)
        return hidden_states(self.base, torch.cat((input_ids, chain), 1), mask, extra)[:, -1]

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int, eos_token_id: int,
                 think: bool = True, return_thoughts: bool = False, greedy_thoughts: bool = False):
        """Greedy decoding; each new token after a thought (hidden unless ``return_thoughts``).
        Rows are left-padded; finished rows keep emitting eos. Returns the new tokens [B, ≤ max]
        (and, with ``return_thoughts``, a list per step of the thought tokens [B, L])."""
        was_training = self.training
        self.eval()
        mask = attention_mask
        out, thoughts = [], []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits, thought = self.next_token_logits(input_ids, mask, think, greedy_thoughts)
            token = torch.where(done, torch.full_like(done, eos_token_id, dtype=torch.long), logits.argmax(-1))
            out.append(token)
            thoughts.append(thought)
            done |= token == eos_token_id
            input_ids = torch.cat((input_ids, token[:, None]), 1)
            mask = None if mask is None else torch.cat((mask, torch.ones_like(token[:, None])), 1)
            if done.all():
                break
        self.train(was_training)
        new = torch.stack(out, 1)
        return (new, thoughts) if return_thoughts else new

    # --- saving -------------------------------------------------------------------------------

    def save_extras(self, directory: Path) -> None:
        """The mixing head and the thought settings, next to the base model's files."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.mixing_head.state_dict().items()},
                  str(Path(directory) / MIXING_HEAD_FILE))
        (Path(directory) / SETTINGS_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    @classmethod
    def load(cls, directory, **model_kwargs) -> tuple["ThinkingModel", object]:
        """``(thinking model, tokenizer)`` from a directory written by the Quiet-STaR phase."""
        from safetensors.torch import load_file

        from agentforge.artifacts import load_model_dir

        directory = Path(directory)
        if not (directory / SETTINGS_FILE).is_file():
            raise FileNotFoundError(f"{directory} has no {SETTINGS_FILE}: it is not a Quiet-STaR model directory")
        base, tokenizer, _ = load_model_dir(directory, **model_kwargs)
        model = cls(base, ThoughtSettings(**json.loads((directory / SETTINGS_FILE).read_text())))
        model.mixing_head.load_state_dict(load_file(str(directory / MIXING_HEAD_FILE)))
        return model.eval(), tokenizer
