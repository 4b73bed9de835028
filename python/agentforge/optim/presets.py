"""Phase presets for MuGrokfast: plain config dicts, resolved into constructor arguments.

A preset holds every setting except the run length: `total_steps` always comes from the caller,
and the warm-up is stored as a fraction of it (`warmup_fraction`) so one preset fits any run.
Grokfast lambda only tilts the update direction (Muon orthogonalises the step, Adam normalises
it per element), and the evidence for it comes from algorithmic tasks, not LMs; so it stays small,
and is off where stale gradients would mislead. QK-clip needs the model's cooperation
(`MuGrokfast.register_qk_clip`), so no preset turns it on; Kimi K2 used `qk_clip_tau=100`.
"""

from __future__ import annotations

from typing import Any

# The MuGrokfast constructor's keyword arguments (a test keeps this in step with its signature).
OPTIMIZER_KEYS = (
    "muon_lr",
    "adamw_lr",
    "weight_decay",
    "adamw_betas",
    "momentum",
    "grokfast_alpha",
    "grokfast_lambda",
    "warmup_steps",
    "total_steps",
    "min_lr_ratio",
    "qk_clip_tau",
    "muon_adjust_lr_fn",
)
ALLOWED_KEYS = OPTIMIZER_KEYS + ("warmup_fraction",)

_COMMON = {
    "adamw_betas": (0.9, 0.95),
    "momentum": 0.95,
    "grokfast_alpha": 0.98,
    "qk_clip_tau": None,
    "muon_adjust_lr_fn": "original",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Cognate from scratch: Muon 0.02 with Keller's "original" shape scaling is the pair tuned
    # together in the NanoGPT speedrun; AdamW 3e-3 is what a ~1M-param Llama learned well with.
    "pretrain": {
        **_COMMON,
        "muon_lr": 0.02,
        "adamw_lr": 3e-3,
        "weight_decay": 0.05,
        "grokfast_lambda": 0.2,
        "warmup_fraction": 0.05,
        "min_lr_ratio": 0.1,
    },
    # Continued supervised training of a trained model (curriculum, baking, experts): ~5x lower
    # rates and light decay so learned features move, not reset.
    "finetune": {
        **_COMMON,
        "muon_lr": 4e-3,
        "adamw_lr": 5e-4,
        "weight_decay": 0.01,
        "grokfast_lambda": 0.1,
        "warmup_fraction": 0.03,
        "min_lr_ratio": 0.1,
    },
    # Policy-gradient updates (Quiet-STaR REINFORCE): small constant rates after a short warm-up,
    # no decay, Grokfast off because a 50-step gradient EMA mixes in stale-policy gradients.
    "rl": {
        **_COMMON,
        "muon_lr": 1e-3,
        "adamw_lr": 1e-4,
        "weight_decay": 0.0,
        "grokfast_lambda": 0.0,
        "warmup_fraction": 0.02,
        "min_lr_ratio": 1.0,
    },
    # BitNet STE fine-tuning: latent weights are ordinary parameters; rates near pretraining so
    # they travel far enough to flip ternary codes, no decay (BitNet b1.58's final stage uses none).
    "qat": {
        **_COMMON,
        "muon_lr": 0.01,
        "adamw_lr": 1e-3,
        "weight_decay": 0.0,
        "grokfast_lambda": 0.0,
        "warmup_fraction": 0.02,
        "min_lr_ratio": 0.1,
    },
}


def resolve_preset(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor keyword arguments for preset `name` with `overrides` applied.

    `overrides` must include `total_steps`; it may set `warmup_steps` or `warmup_fraction`
    (not both) and any other constructor keyword. Raises ValueError for an unknown preset or key.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown MuGrokfast preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(ALLOWED_KEYS))
    if unknown:
        raise ValueError(f"unknown MuGrokfast setting(s) {unknown}; allowed: {sorted(ALLOWED_KEYS)}")
    if "warmup_steps" in overrides and "warmup_fraction" in overrides:
        raise ValueError("give warmup_steps or warmup_fraction, not both")
    total_steps = overrides.get("total_steps")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            f"from_preset needs total_steps=<positive int> (the run length sets the schedule), got {total_steps!r}"
        )
    settings = {**PRESETS[name], **overrides}
    warmup_fraction = settings.pop("warmup_fraction")
    if "warmup_steps" not in overrides:
        if not isinstance(warmup_fraction, (int, float)) or not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        settings["warmup_steps"] = round(warmup_fraction * total_steps)
    return settings
