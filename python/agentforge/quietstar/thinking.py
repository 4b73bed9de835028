"""The thinking model: a causal LM (``base``) plus a mixing head, trained with the Quiet-STaR loss
(``ThinkingModel.forward``; the algorithm is described in ``agentforge.quietstar``), scoring
answers after a thought (``answer_logprobs``) and generating with hidden thoughts
(``generate``, in ``generation.py``); ``save_extras`` / ``load`` keep it next to the base
model's files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from agentforge.quietstar import generation
from agentforge.quietstar.backbone import hidden_states
from agentforge.quietstar.layout import IGNORE_INDEX, Layout, choose_positions
from agentforge.settings import Checked, from_dict, setting, to_dict

START, END = "<|startthought|>", "<|endthought|>"
MIXING_HEAD_FILE = "mixing_head.safetensors"
SETTINGS_FILE = "quietstar.json"
HEAD_FILES = (SETTINGS_FILE, MIXING_HEAD_FILE)


def head_files(directory) -> tuple[Path, ...]:
    """The thinking head's files in a model directory (none when it has no head): what every later
    phase carries into its own model, so the shipped artifact can still think."""
    present = [Path(directory) / name for name in HEAD_FILES if (Path(directory) / name).is_file()]
    return tuple(present) if len(present) == len(HEAD_FILES) else ()


@dataclass
class ThoughtSettings(Checked):
    """How the model thinks and what its loss weighs."""

    n_thoughts: int = setting(2, "[1, 64]", doc="thoughts sampled per position (the REINFORCE baseline is their mean)")
    thought_length: int = setting(4, "[1, 256]", doc="sampled tokens between the start and end tokens")
    lookahead: int = setting(3, "[1, 64]", doc="true tokens scored after each thought")
    temperature: float = setting(1.0, "(0, 100]", doc="sampling temperature of the thought tokens")
    reinforce_weight: float = setting(1.0, "[0, 100]")
    base_loss_weight: float = setting(0.5, "[0, 100]", doc="weight of the plain next-token NLL")
    clamp_negative_rewards: bool = setting(False, doc="keep only better-than-mean thoughts (the paper's option)")
    positions: str = setting(
        "answers", choices=("all", "answers"), doc="think at every position, or where the next token carries a label"
    )
    mixing_hidden: int = setting(64, "[1, 65536]", doc="hidden width of the mixing head")
    mixing_init: float = setting(0.12, "(0, 1)", doc="the mixing head's initial weight on the post-thought prediction")

    @property
    def steps(self) -> int:
        """Extra tokens per position: start, thought, end, then k − 1 teacher-forced tokens."""
        return self.thought_length + 1 + self.lookahead


class ThoughtTokens(NamedTuple):
    """The ids of the start- and end-of-thought tokens in the model's vocabulary."""

    start_id: int
    end_id: int


def add_thought_tokens(model, tokenizer, like: str = "---") -> ThoughtTokens:
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
    return ThoughtTokens(start_id, end_id)


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
            cast(nn.Linear, self.net[2]).bias.fill_(math.log(init_weight / (1 - init_weight)))

    def forward(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(torch.cat((h_base, h_thought), dim=-1))).squeeze(-1)


@dataclass
class ThinkingOutput:
    loss: torch.Tensor
    metrics: dict


class ThinkingModel(nn.Module):
    """A causal LM (``base``) plus a mixing head, trained with the Quiet-STaR loss (``forward``)
    and generating with hidden thoughts (``generate``); ``think=False`` anywhere gives the base.
    ``tokens``: the thought tokens' ids in ``base``'s vocabulary (``add_thought_tokens``)."""

    base: Any  # a transformers causal LM (its config and output embeddings)

    def __init__(self, base: nn.Module, settings: ThoughtSettings, tokens: ThoughtTokens):
        super().__init__()
        self.base = base
        self.settings = settings
        self.tokens = ThoughtTokens(*tokens)
        self.mixing_head = MixingHead(self.base.config.hidden_size, settings.mixing_hidden, settings.mixing_init)

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
        chain = torch.full((B, 1, P), self.tokens.start_id, dtype=torch.long, device=ids.device)
        for step in range(1, s.thought_length + 1):
            extra = layout.for_steps(step, real_positions)
            hidden = hidden_states(self.base, torch.cat((ids, chain.flatten(1)), 1), None, extra)
            last = hidden[:, -P:]  # the newest step's extra tokens
            logits = self.base.get_output_embeddings()(last).float()
            logits[..., list(self.tokens)] = float("-inf")  # a thought never nests or ends early
            token = torch.multinomial(F.softmax(logits / s.temperature, -1).flatten(0, 1), 1).view(B, 1, P)
            chain = torch.cat((chain, token), dim=1)
        return chain[:, 1:]

    def _extra_tokens(self, ids, layout: Layout, thoughts) -> torch.Tensor:
        """All S steps' tokens, step-major: start, thought, end, then x[t+1..t+k-1] (clamped at the end)."""
        s = self.settings
        B, P = layout.parents.shape
        T = ids.shape[1]
        start = torch.full((B, 1, P), self.tokens.start_id, dtype=torch.long, device=ids.device)
        end = torch.full((B, 1, P), self.tokens.end_id, dtype=torch.long, device=ids.device)
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
                1, base_col[..., None].expand(-1, -1, logits.shape[-1])
            )
            logp = F.log_softmax(mixed.float(), -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
            logp_mixed.append(logp)
            weights.append(w)
            target_ok.append(ok)
        mixed_logp, ok = torch.stack(logp_mixed, -1), torch.stack(target_ok, -1)  # [B, P, k]
        mixed_nll = -(mixed_logp * ok).sum() / ok.sum().clamp(min=1)

        base_logits = logits[:, : T - 1].float()
        base_nll = F.cross_entropy(
            base_logits.reshape(-1, base_logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )

        scored = ok.any(-1)
        reward = (mixed_logp.detach() * ok).sum(-1)  # log-likelihood of the k true tokens [n·B, P]
        policy, advantage = reinforce_loss(
            reward, self._thought_logprob(logits, layout, thoughts, T), scored, n, s.clamp_negative_rewards
        )
        loss = mixed_nll + s.base_loss_weight * base_nll + s.reinforce_weight * policy
        mix = torch.stack(weights, -1)
        metrics = {
            "mixed_nll": mixed_nll.item(),
            "base_nll": base_nll.item(),
            "policy_loss": policy.item(),
            "mixing_weight": ((mix * ok).sum() / ok.sum().clamp(min=1)).item(),
            "reward_spread": (advantage.abs().sum() / scored.sum().clamp(min=1)).item(),
        }
        return ThinkingOutput(loss=loss, metrics=metrics)

    def _thought_logprob(self, logits, layout: Layout, thoughts, T) -> torch.Tensor:
        """log π(thought) [B, P]: the L sampled tokens under the logits that sampled them."""
        total: torch.Tensor | float = 0.0
        for step in range(1, self.settings.thought_length + 1):
            prev = logits[:, layout.columns(T, step - 1)].float()  # [B, P, V]
            prev[..., list(self.tokens)] = float("-inf")
            logp = F.log_softmax(prev / self.settings.temperature, -1)
            total = total + logp.gather(-1, thoughts[:, step - 1][..., None]).squeeze(-1)
        return cast(torch.Tensor, total)  # thought_length >= 1

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
        ends = torch.full((B, 1, P), self.tokens.end_id, dtype=torch.long, device=input_ids.device)
        extra_ids = torch.cat((torch.full_like(ends, self.tokens.start_id), thoughts, ends), dim=1).flatten(1)
        extra = layout.for_steps(s.thought_length + 2, real_positions)
        hidden = hidden_states(self.base, torch.cat((input_ids, extra_ids), 1), None, extra)
        head = self.base.get_output_embeddings()
        h_base = hidden.gather(1, parents[..., None].expand(-1, -1, hidden.shape[-1]))
        h_thought = hidden[:, layout.columns(T, s.thought_length + 1)]
        w = self.mixing_head(h_base, h_thought)[..., None]
        mixed = (w * head(h_thought) + (1 - w) * head(h_base)).float()
        mixed[..., list(self.tokens)] = float("-inf")
        target_col = (parents + 1).clamp(max=T - 1)
        target = labels.gather(1, target_col)
        ok = valid & (target != IGNORE_INDEX) & (parents + 1 < T)
        logp = torch.log_softmax(mixed, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        return torch.zeros(B, T, device=input_ids.device).scatter_add(1, target_col, logp * ok)

    def next_token_logits(self, input_ids, attention_mask=None, think: bool = True, greedy_thoughts: bool = False):
        """Logits of each row's next token and the thought behind it (``generation.next_token_logits``)."""
        return generation.next_token_logits(self, input_ids, attention_mask, think, greedy_thoughts)

    def generate(
        self,
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
        """Greedy decoding, each token after a thought (``generation.generate``)."""
        return generation.generate(
            self,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            think=think,
            return_thoughts=return_thoughts,
            greedy_thoughts=greedy_thoughts,
            on_token=on_token,
        )

    @classmethod
    def attach(cls, base, directory) -> ThinkingModel:
        """The thinking model of ``base`` (already loaded) from the head files in ``directory``."""
        from safetensors.torch import load_file

        directory = Path(directory)
        record = json.loads((directory / SETTINGS_FILE).read_text())
        tokens = ThoughtTokens(record.pop("start_id"), record.pop("end_id"))
        model = cls(base, from_dict(ThoughtSettings, record, str(directory / SETTINGS_FILE)), tokens)
        model.mixing_head.load_state_dict(load_file(str(directory / MIXING_HEAD_FILE)))
        return model.eval()

    # --- saving -------------------------------------------------------------------------------

    def save_extras(self, directory: Path) -> None:
        """The mixing head, and the thought settings with the token ids, next to the base model's files."""
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in self.mixing_head.state_dict().items()},
            str(Path(directory) / MIXING_HEAD_FILE),
        )
        record = {**to_dict(self.settings), **self.tokens._asdict()}
        (Path(directory) / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, directory, **model_kwargs) -> tuple[ThinkingModel, Any]:
        """``(thinking model, tokenizer)`` from a directory written by the Quiet-STaR phase."""
        from agentforge.artifacts import load_model_dir

        directory = Path(directory)
        if not (directory / SETTINGS_FILE).is_file():
            raise FileNotFoundError(f"{directory} has no {SETTINGS_FILE}: it is not a Quiet-STaR model directory")
        base, tokenizer, _ = load_model_dir(directory, **model_kwargs)
        return cls.attach(base, directory), tokenizer
