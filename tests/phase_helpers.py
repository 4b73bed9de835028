"""Running one phase alone in a test: the micro preset, quiet, W&B off, recorded like a pipeline run."""

from agentforge.runtime import run_alone
from agentforge.settings import replace


def micro_settings(spec, **changes):
    """The phase's micro settings with ``changes`` (nested mappings for nested settings)."""
    return replace(spec.presets["micro"], changes, spec.name) if changes else spec.presets["micro"]


def run_micro(spec, inputs, out, *, seed=0, data=None, **changes):
    """``run_alone`` on the micro preset (``changes`` applied) in ``out``: the PhaseResult."""
    return run_alone(
        spec,
        inputs,
        out,
        settings=micro_settings(spec, **changes),
        preset="micro",
        data=data,
        seed=seed,
        wandb_mode="disabled",
        progress=False,
        say=lambda _: None,
    )
