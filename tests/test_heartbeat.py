"""The heartbeat: a running phase is never silent for long, and says what it is doing."""

import time

import pytest
from tqdm import tqdm

from agentforge import heartbeat
from agentforge.heartbeat import Heartbeat, StageProgress


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(heartbeat, "HEARTBEAT_SECONDS", 0.2)


def test_a_silent_step_is_named_with_its_time(quick):
    lines = []
    with Heartbeat(lines.append) as beat:
        beat.heard("evaluate ...")
        time.sleep(0.7)
    assert lines and all(line.startswith("evaluate: still working (") for line in lines)


def test_a_training_stage_says_its_step_loss_and_time_left(quick):
    lines = []
    with Heartbeat(lines.append) as beat:
        beat.stage = StageProgress("trunk")
        beat.stage(4, 10, 2.5)  # a resumed stage: its first step here is step 4
        time.sleep(0.1)
        beat.stage(5, 10, 2.25)
        time.sleep(0.6)
    assert lines and lines[0].startswith("trunk: step 5/10, loss 2.250, about ")


def test_a_slow_step_is_named_with_how_long_it_has_run(quick):
    lines = []
    with Heartbeat(lines.append) as beat:
        beat.stage = StageProgress("trunk")
        beat.stage(1, 10, 2.5)
        time.sleep(0.8)  # several beats, no step
    assert lines[0].startswith("trunk: step 1/10, loss 2.500")
    assert len(lines) > 1 and all(line.startswith("trunk: step 2/10 running for ") for line in lines[1:])


def test_nothing_is_said_while_the_phase_speaks_or_a_bar_draws(quick):
    lines = []
    with Heartbeat(lines.append) as beat:
        for i in range(6):
            beat.heard(f"line {i}")
            time.sleep(0.1)
        with tqdm(total=3, disable=False, file=open("/dev/null", "w")):
            time.sleep(0.6)
    assert lines == []
