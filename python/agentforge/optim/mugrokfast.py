"""MuGrokfast: Muon on hidden matrices + torch's AdamW on the rest, a Grokfast gradient
filter in front of both, a warm-up + cosine schedule that drives both, and optional QK-clip.

Order inside one `step()`:

1. Grokfast (Lee et al. 2024, EMA variant) on every gradient: `ema = a*ema + (1-a)*g`, then
   `g = g + lambda*ema`, amplifying the slow component (the paper's sign). The EMA starts at the
   first gradient, as in the reference code. `lambda = 0` skips the filter (no EMA memory), and
   the optimizer is then exactly Muon + AdamW.
2. The inner Muon (`agentforge.optim.muon`: torch's, with Newton–Schulz in fp32 on CPUs
   without native bf16) and `torch.optim.AdamW` step with the filtered gradients.
3. The schedule writes the next update's `lr` into every inner param group.
4. QK-clip, if enabled, rescales the registered attention heads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import nn

from agentforge.optim.grouping import NamedParameters, split_parameters
from agentforge.optim.muon import Muon
from agentforge.optim.presets import resolve_preset
from agentforge.optim.qk_clip import check_attention_module, qk_clip_
from agentforge.optim.schedule import lr_factor

ADJUST_LR_FNS = ("original", "match_rms_adamw")
STATE_DICT_KEYS = ("steps_done", "settings", "inner", "grokfast_ema")


class MuGrokfast(torch.optim.Optimizer):
    """Muon + AdamW + Grokfast + warm-up/cosine schedule + optional QK-clip, for one model.

    Parameters are split by `split_parameters`: 2-D hidden matrices go to Muon,
    embeddings, the LM head and all non-2-D parameters to `torch.optim.AdamW`. The AdamW side has
    two param groups: `adamw` (embeddings, LM head, other >=2-D tensors; decayed) and
    `adamw_no_decay` (1-D norm gains and biases: decaying RMSNorm gains toward 0 fights the
    normalisation). torch's Muon decays as `p *= 1 - lr*weight_decay`, so at the same
    `weight_decay` the Muon side decays `muon_lr / adamw_lr` times faster per step.

    Args:
        model: the model whose trainable parameters to optimise.
        muon_lr, adamw_lr: peak learning rates of the two sides.
        weight_decay: decoupled weight decay, both sides (not on 1-D parameters).
        adamw_betas: AdamW's (beta1, beta2).
        momentum: Muon's momentum (Nesterov, as torch's default).
        grokfast_alpha: EMA decay in [0, 1); 0.98 remembers ~50 steps.
        grokfast_lambda: weight >= 0 of the slow component added to the gradient; 0 turns it off.
        warmup_steps: linear warm-up length; update k <= warmup_steps uses lr * k / warmup_steps.
        total_steps: the cosine reaches `min_lr_ratio * lr` at update `total_steps`, then stays.
        min_lr_ratio: the floor as a fraction of the peak, in [0, 1]; 1 gives a constant lr.
        qk_clip_tau: max attention logit allowed (e.g. 100, Kimi K2); None disables QK-clip.
            Attention modules must be registered with `register_qk_clip`.
        muon_adjust_lr_fn: torch Muon's shape scaling of the lr. "original" (Keller Jordan,
            sqrt(max(1, rows/cols)); pair with muon_lr ~0.02) or "match_rms_adamw" (Moonshot,
            0.2*sqrt(max(rows, cols)); makes Muon's update RMS match AdamW's, so an AdamW lr fits).

    The schedule is built in and owns each group's `lr` (the peak is the group's `base_lr`): do
    not attach a torch LRScheduler; `step()` raises if `lr` was changed behind its back.
    `param_groups` are the inner optimizers' own group dicts, so what you read is what they use.
    Gradient clipping belongs before `step()` (on the raw gradients); after `step()` each
    `p.grad` holds the Grokfast-filtered gradient until `zero_grad()`.

    Example::

        optimizer = MuGrokfast.from_preset(model, "pretrain", total_steps=2000)
        for batch in batches:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        muon_lr: float,
        adamw_lr: float,
        weight_decay: float,
        adamw_betas: tuple[float, float],
        momentum: float,
        grokfast_alpha: float,
        grokfast_lambda: float,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float,
        qk_clip_tau: float | None = None,
        muon_adjust_lr_fn: str = "original",
    ) -> None:
        _check_inner_hyperparameters(muon_lr, adamw_lr, weight_decay, adamw_betas, momentum, muon_adjust_lr_fn)
        settings = {
            "grokfast_alpha": grokfast_alpha,
            "grokfast_lambda": grokfast_lambda,
            "warmup_steps": warmup_steps,
            "total_steps": total_steps,
            "min_lr_ratio": min_lr_ratio,
            "qk_clip_tau": qk_clip_tau,
        }
        _check_settings(settings)
        muon_params, adamw_params = split_parameters(model)
        inner = _build_inner_optimizers(
            muon_params,
            adamw_params,
            muon_lr=muon_lr,
            adamw_lr=adamw_lr,
            weight_decay=weight_decay,
            adamw_betas=cast(tuple[float, float], tuple(adamw_betas)),  # a list from a config file too
            momentum=momentum,
            muon_adjust_lr_fn=muon_adjust_lr_fn,
        )
        # Registers the inner groups' dicts themselves (no copies, no defaults merged into them).
        super().__init__([group for optimizer in inner.values() for group in optimizer.param_groups], {})
        self._inner = inner
        self.defaults = settings  # MuGrokfast's own hyperparameters, saved in the state dict
        self._steps_done = 0
        self._qk_modules: list[nn.Module] = []
        self.last_qk_clipped_heads = 0
        self._apply_schedule()

    @classmethod
    def from_preset(cls, model: nn.Module, name: str, **overrides: Any) -> MuGrokfast:
        """Build from `PRESETS[name]`; `overrides` must include `total_steps` and may replace any
        setting (`warmup_steps` or `warmup_fraction`, lrs, ...). Unknown names/keys raise ValueError."""
        return cls(model, **resolve_preset(name, overrides))

    # --- public read-outs -------------------------------------------------------------------

    @property
    def inner(self) -> Mapping[str, torch.optim.Optimizer]:
        """The inner optimizers by side, `"muon"` and/or `"adamw"` (a side with no parameter is absent)."""
        return MappingProxyType(self._inner)

    @property
    def steps_done(self) -> int:
        """Number of `step()` calls so far (the schedule position)."""
        return self._steps_done

    def current_lr(self) -> dict[str, float]:
        """The lr the next `step()` applies, per param group name (`muon`, `adamw`, `adamw_no_decay`)."""
        return {group["name"]: group["lr"] for group in self.param_groups}

    # --- stepping ---------------------------------------------------------------------------

    @torch.no_grad()
    # torch's stub overloads step as closure -> float; its own optimizers return the closure's tensor too
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """Filter the gradients, step Muon and AdamW, advance the schedule, then QK-clip."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_lr_untouched()
        if self.defaults["grokfast_lambda"] != 0:
            self._grokfast_filter()
        for optimizer in self._inner.values():
            optimizer.step()
        self._steps_done += 1
        self._apply_schedule()
        self._qk_clip()
        return loss

    def _grokfast_filter(self) -> None:
        alpha, lamb = self.defaults["grokfast_alpha"], self.defaults["grokfast_lambda"]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "grokfast_ema" not in state:
                    state["grokfast_ema"] = param.grad.detach().clone()
                else:
                    state["grokfast_ema"].mul_(alpha).add_(param.grad, alpha=1 - alpha)
                param.grad.add_(state["grokfast_ema"], alpha=lamb)

    def _apply_schedule(self) -> None:
        """Write the lr of the next update into every group (and remember what was written)."""
        factor = lr_factor(
            self._steps_done + 1,
            warmup_steps=self.defaults["warmup_steps"],
            total_steps=self.defaults["total_steps"],
            min_lr_ratio=self.defaults["min_lr_ratio"],
        )
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor
        self._lr_written = [group["lr"] for group in self.param_groups]

    def _check_lr_untouched(self) -> None:
        # The original project's schedulers wrote an `lr` nothing read; here a foreign write is an error.
        for group, written in zip(self.param_groups, self._lr_written, strict=True):
            if group["lr"] != written:
                raise RuntimeError(
                    f"param group {group['name']!r} lr was changed to {group['lr']} outside MuGrokfast "
                    f"(an LRScheduler?); MuGrokfast schedules lr itself: set warmup_steps/total_steps/"
                    f"min_lr_ratio, or edit group['base_lr'] to change the peak"
                )

    # --- QK-clip ----------------------------------------------------------------------------

    def register_qk_clip(self, modules: Iterable[nn.Module]) -> None:
        """Clip these attention modules after every step (needs `qk_clip_tau`).

        Each module must follow the contract of `agentforge.optim.qk_clip`: `q_proj.weight`
        `[num_heads*head_dim, d]` and `k_proj.weight` `[num_kv_heads*head_dim, d]` (head-major
        rows), `num_heads`, optional `num_kv_heads` (default `num_heads`), and a tensor
        `max_logit` `[num_heads]` that the module's forward fills with each head's largest
        pre-softmax logit. After a step, every head whose max logit S exceeds tau has its W_q and
        W_k rows scaled by sqrt(tau/S) each, so its logits shrink by tau/S. Registration is not
        part of the state dict: register again after building a resumed optimizer.
        `last_qk_clipped_heads` counts the query heads the latest step clipped (for logging).
        """
        if self.defaults["qk_clip_tau"] is None:
            raise ValueError("QK-clip is off (qk_clip_tau=None); build MuGrokfast with qk_clip_tau=... to use it")
        modules = list(modules)
        for module in modules:
            check_attention_module(module)
            if any(module is registered for registered in self._qk_modules):
                raise ValueError(f"{type(module).__name__} is already registered for QK-clip")
        self._qk_modules.extend(modules)

    def _qk_clip(self) -> None:
        tau = self.defaults["qk_clip_tau"]
        if tau is None:
            return
        self.last_qk_clipped_heads = sum(qk_clip_(module, tau) for module in self._qk_modules)

    # --- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, as plain containers, numbers, strings
        and tensors (loadable with `torch.load(weights_only=True)`):

        - `steps_done`: int, the schedule position;
        - `settings`: MuGrokfast's own hyperparameters (Grokfast, schedule, QK-clip tau);
        - `inner`: `{"muon": ..., "adamw": ...}`, the inner optimizers' own state dicts (their
          param groups carry lr, base_lr, weight decay, betas, param names);
        - `grokfast_ema`: `{index: tensor}`, index into the parameters of `param_groups` in order.
        """
        index = {param: i for i, param in enumerate(self._parameters_in_order())}
        return {
            "steps_done": self._steps_done,
            "settings": dict(self.defaults),
            "inner": {side: optimizer.state_dict() for side, optimizer in self._inner.items()},
            "grokfast_ema": {index[p]: s["grokfast_ema"] for p, s in self.state.items() if "grokfast_ema" in s},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`. As with torch optimizers, hyperparameters (lrs, schedule,
        Grokfast) come from the checkpoint. Raises ValueError if it belongs to another model."""
        missing = [key for key in STATE_DICT_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"not a MuGrokfast state dict: missing {missing}")
        settings = dict(state_dict["settings"])
        _check_settings(settings)
        self._check_matches_parameters(state_dict["inner"], state_dict["grokfast_ema"])
        for side, optimizer in self._inner.items():
            optimizer.load_state_dict(state_dict["inner"][side])
        # Loading replaced the inner group dicts; share the new ones again.
        self.param_groups = [group for optimizer in self._inner.values() for group in optimizer.param_groups]
        params = self._parameters_in_order()
        self.state = defaultdict(dict)
        for i, ema in state_dict["grokfast_ema"].items():
            self.state[params[i]]["grokfast_ema"] = ema.to(device=params[i].device, dtype=params[i].dtype, copy=True)
        self.defaults = settings
        self._steps_done = int(state_dict["steps_done"])
        self._apply_schedule()

    def _check_matches_parameters(self, inner_states: dict[str, Any], emas: dict[int, torch.Tensor]) -> None:
        if set(inner_states) != set(self._inner):
            raise ValueError(
                f"checkpoint has optimizer sides {sorted(inner_states)}, this model has {sorted(self._inner)}"
            )
        for side, optimizer in self._inner.items():
            saved = inner_states[side]
            params = [p for group in optimizer.param_groups for p in group["params"]]
            saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
            sizes = [len(group["params"]) for group in optimizer.param_groups]
            if saved_sizes != sizes:
                raise ValueError(f"checkpoint's {side} groups hold {saved_sizes} parameters, this model's {sizes}")
            for i, entry in saved["state"].items():
                for key, value in entry.items():
                    _check_state_shape(f"{side} state {key!r}", value, params[i])
        params = self._parameters_in_order()
        for i, ema in emas.items():
            if not 0 <= i < len(params):
                raise ValueError(f"checkpoint has a Grokfast EMA for parameter {i}, this model has {len(params)}")
            _check_state_shape("grokfast_ema", ema, params[i])

    def _parameters_in_order(self) -> list[torch.Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Used during construction only: the groups are those of the inner optimizers."""
        if hasattr(self, "_inner"):
            raise RuntimeError("MuGrokfast's param groups are fixed by the model; build a new MuGrokfast instead")
        super().add_param_group(param_group)


def _build_inner_optimizers(
    muon_params: NamedParameters,
    adamw_params: NamedParameters,
    *,
    muon_lr: float,
    adamw_lr: float,
    weight_decay: float,
    adamw_betas: tuple[float, float],
    momentum: float,
    muon_adjust_lr_fn: str,
) -> dict[str, torch.optim.Optimizer]:
    """One Muon and one torch AdamW (a side without parameters is left out)."""
    inner: dict[str, torch.optim.Optimizer] = {}
    if muon_params:
        inner["muon"] = Muon(
            [{"params": muon_params, "name": "muon", "base_lr": muon_lr}],
            lr=muon_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            adjust_lr_fn=muon_adjust_lr_fn,
        )
    decayed = [(name, p) for name, p in adamw_params if p.ndim >= 2]
    not_decayed = [(name, p) for name, p in adamw_params if p.ndim < 2]
    adamw_groups = [
        group
        for group in (
            {"params": decayed, "name": "adamw", "base_lr": adamw_lr},
            {"params": not_decayed, "name": "adamw_no_decay", "base_lr": adamw_lr, "weight_decay": 0.0},
        )
        if group["params"]
    ]
    if adamw_groups:
        inner["adamw"] = torch.optim.AdamW(adamw_groups, lr=adamw_lr, betas=adamw_betas, weight_decay=weight_decay)
    return inner


def _check_state_shape(what: str, value: Any, param: torch.Tensor) -> None:
    # Per-parameter buffers (momentum, Adam moments, EMA) have the parameter's shape; counters are scalars.
    if torch.is_tensor(value) and value.ndim > 0 and value.shape != param.shape:
        raise ValueError(f"checkpoint's {what} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_inner_hyperparameters(
    muon_lr: Any, adamw_lr: Any, weight_decay: Any, adamw_betas: Any, momentum: Any, muon_adjust_lr_fn: Any
) -> None:
    for name, value in (("muon_lr", muon_lr), ("adamw_lr", adamw_lr)):
        if not _is_real(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not _is_real(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if (
        not isinstance(adamw_betas, (tuple, list))
        or len(adamw_betas) != 2
        or not all(_is_real(b) and 0 <= b < 1 for b in adamw_betas)
    ):
        raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {adamw_betas!r}")
    if not _is_real(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if muon_adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"muon_adjust_lr_fn must be one of {list(ADJUST_LR_FNS)}, got {muon_adjust_lr_fn!r}")


def _check_settings(settings: dict[str, Any]) -> None:
    """Validate MuGrokfast's own hyperparameters (constructor arguments or a loaded checkpoint)."""
    expected = {"grokfast_alpha", "grokfast_lambda", "warmup_steps", "total_steps", "min_lr_ratio", "qk_clip_tau"}
    if set(settings) != expected:
        raise ValueError(f"MuGrokfast settings must be exactly {sorted(expected)}, got {sorted(settings)}")
    alpha, lamb = settings["grokfast_alpha"], settings["grokfast_lambda"]
    if not _is_real(alpha) or not 0 <= alpha < 1:
        raise ValueError(f"grokfast_alpha must be in [0, 1), got {alpha!r}")
    if not _is_real(lamb) or lamb < 0:
        raise ValueError(f"grokfast_lambda must be >= 0, got {lamb!r}")
    warmup, total = settings["warmup_steps"], settings["total_steps"]
    if not _is_count(warmup) or not _is_count(total) or not 0 <= warmup < total:
        raise ValueError(
            f"need integers 0 <= warmup_steps < total_steps, got warmup_steps={warmup!r}, total_steps={total!r}"
        )
    min_ratio = settings["min_lr_ratio"]
    if not _is_real(min_ratio) or not 0 <= min_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_ratio!r}")
    tau = settings["qk_clip_tau"]
    if tau is not None and (not _is_real(tau) or tau <= 0):
        raise ValueError(f"qk_clip_tau must be None or a positive number, got {tau!r}")
