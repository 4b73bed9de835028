"""Prompt baking: make a model behave, without a prompt, as it does with one.

    from agentforge.baking import BakeSettings, bake
    result = bake(model, tokenizer, prompt, train_inputs, held_out_inputs, BakeSettings(), out_dir=d,
                  strength=0.5)                 # half-baked: half of the held-out KL removed
    result.model, result.kl_before, result.kl_after

* :mod:`~agentforge.baking.kl`: the objective, token-level KL(P_θ(·|u, x) ‖ P_θ′(·|x)) over the
  full vocabulary on the prompted model's own sampled trajectories, and its measurement.
* :mod:`~agentforge.baking.baker`: :func:`bake` (full weights or LoRA, half-baking by measured KL
  reduction), :func:`prompt_pursuit` (re-baking) and :func:`bake_stack` (several prompts).
* :mod:`~agentforge.baking.lora`: peft adapters, with BitLinear layers kept quantization-aware.
* :mod:`~agentforge.baking.cycles`: the Baking phase's two alternating cycles of prompts
  (:func:`run_cycles`), with their plateau detector and candidate prompts.
* :mod:`~agentforge.baking.behaviour`: what the cycles score and the phase reports, tool use and
  task answers, with a prompt in context or without.
"""

from agentforge.baking.baker import BakeResult, BakeSettings, Kept, bake, bake_stack, prompt_pursuit
from agentforge.baking.behaviour import answer_probability, behaviour, in_context
from agentforge.baking.cycles import (
    CYCLES,
    CycleData,
    CycleRun,
    CycleState,
    cycle_bake_settings,
    plateaued,
    prompt_edits,
    propose_prompts,
    relative_gain,
    run_cycles,
)
from agentforge.baking.kl import (
    BakingData,
    kl_loss,
    logits_kl,
    measured_kl,
    prompted_trajectories,
    row_kl,
    token_kl,
)
from agentforge.baking.lora import BitLinearLora, add_lora, merge_lora

__all__ = [
    "BakeSettings",
    "BakeResult",
    "Kept",
    "bake",
    "bake_stack",
    "prompt_pursuit",
    "answer_probability",
    "behaviour",
    "in_context",
    "CYCLES",
    "CycleData",
    "CycleRun",
    "CycleState",
    "cycle_bake_settings",
    "run_cycles",
    "plateaued",
    "relative_gain",
    "prompt_edits",
    "propose_prompts",
    "BakingData",
    "kl_loss",
    "measured_kl",
    "row_kl",
    "prompted_trajectories",
    "token_kl",
    "logits_kl",
    "BitLinearLora",
    "add_lora",
    "merge_lora",
]
