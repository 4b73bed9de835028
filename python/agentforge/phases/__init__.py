"""The eight pipeline phases, one module each (Quiet-STaR's library lives in ``agentforge.quietstar``).

Each module holds its ``Settings`` and ``PRESETS``, its ``run(p: PhaseRun)`` written as named
steps on ``agentforge.runtime``, and ``SPEC``: what it needs, what it provides, the contract
each artifact keeps. Phases meet only through the artifacts they write; ``agentforge.pipeline``
runs them in order, and ``python -m agentforge.phases.<name>`` runs one alone.
"""
