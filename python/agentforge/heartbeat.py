"""No long silences: while a phase runs, a line at least every ``HEARTBEAT_SECONDS`` saying what it
is doing (a training stage: step n of N, its loss and the time left; anything else: the step and
how long it has run), unless a progress bar is on screen already."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

HEARTBEAT_SECONDS = 10.0  # the longest a running phase stays silent


class StageProgress:
    """A training stage's progress (the training loop's ``on_step``): step n of N, the loss, and
    the time left at the pace of the steps run so far in this process."""

    def __init__(self, stage: str):
        self.stage, self.began, self.line = stage, time.monotonic(), ""
        self.first: int | None = None
        self.step = self.steps = 0
        self.stepped = self.began  # when the last step finished

    def __call__(self, step: int, steps: int, loss: float) -> None:
        if self.first is None:
            self.first = step - 1  # a resumed stage starts past 0
        self.step, self.steps, self.stepped = step, steps, time.monotonic()
        left = (self.stepped - self.began) / (step - self.first) * (steps - step)
        self.line = f"{self.stage}: step {step}/{steps}, loss {loss:.3f}, about {left:.0f} s left"

    def running(self) -> str:
        """The line for a beat with no step finished since the last one: the step under way and
        how long it has run, so a slow step does not read like a hung one."""
        return f"{self.stage}: step {self.step + 1}/{self.steps} running for {time.monotonic() - self.stepped:.0f} s"


def bar_drawing() -> bool:
    """Whether a tqdm progress bar is on screen (it already shows that the work moves)."""
    from tqdm import tqdm

    return any(not bar.disable for bar in list(getattr(tqdm, "_instances", ())))


class Heartbeat:
    """Use as ``with Heartbeat(say):`` around the work; tell it every line said (``heard``) and
    the training stage running (``stage``). ``say`` receives the heartbeat lines."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.said = self.doing_since = time.monotonic()
        self.doing = "starting"
        self.stage: StageProgress | None = None
        self._last_stage_line = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="agentforge-heartbeat", daemon=True)

    def heard(self, line: str, *, beat: bool = False) -> None:
        self.said = time.monotonic()
        if not beat:
            self.working_on(line)

    def working_on(self, what: str) -> None:
        """What the next heartbeat line names (a line said, or item i of N of a loop)."""
        self.doing, self.doing_since = what, time.monotonic()

    def line(self) -> str:
        stage = self.stage
        if stage is not None and stage.line:
            repeat, self._last_stage_line = stage.line == self._last_stage_line, stage.line
            return stage.running() if repeat else stage.line
        return f"{self.doing.removesuffix(' ...')}: still working ({time.monotonic() - self.doing_since:.0f} s)"

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, HEARTBEAT_SECONDS / 4)):
            if time.monotonic() - self.said >= HEARTBEAT_SECONDS and not bar_drawing():
                self.say(self.line())

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
