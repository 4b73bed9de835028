"""Report figures, one module per phase: ``figures(phase_dir) -> [(title, matplotlib Figure,
[the files its numbers come from])]``, drawn from what the phase wrote (summary.json,
metrics.jsonl). A phase's ``SPEC.figures`` names its module; ``agentforge.report`` imports it."""
