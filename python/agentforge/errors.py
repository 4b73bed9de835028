"""The errors a command reports in one line, by when they happen.

``ConfigError``: a bad configuration, command line or input, found before anything is written
(exit code 2). ``PipelineError``: a run failed after it started (exit code 1); ``HandoffError``:
an artifact does not keep the guarantee its phase declares.
"""


class ConfigError(ValueError):
    """A bad configuration or command line, found before anything is written (exit code 2)."""


class PipelineError(RuntimeError):
    """A run failed after it started (exit code 1)."""


class HandoffError(PipelineError):
    """An artifact does not keep the guarantee its phase declares."""
