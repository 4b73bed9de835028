"""`agentforge generate` and `agentforge chat` on real micro models (a Cognate trunk, and the
Quiet-STaR phase's model with its thinking head): only the model's text on stdout and nothing from
the libraries on stderr, replies streamed as they are generated, the conversation through the chat
template, --think, and the interactive loop ending at /exit or the end of the input."""

import io
import os
import select
import subprocess
import sys
import time

import pytest
import torch

import agentforge
from agentforge import cli
from agentforge.loading import Agent
from agentforge.phases import quietstar
from phase_helpers import run_micro
from pipeline_helpers import ENV

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trunk(cognate_micro):
    """The Cognate phase directory (its trunk: a tokenizer, no thinking head)."""
    return cognate_micro[0]


@pytest.fixture(scope="module")
def thinker(cognate_micro, tmp_path_factory):
    """A Quiet-STaR phase directory: the trunk with a thinking head."""
    out = tmp_path_factory.mktemp("quietstar")
    run_micro(quietstar.SPEC, {"model": cognate_micro[1].artifacts["trunk"]}, out)
    return out


def main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def agentforge_command(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agentforge", *map(str, args)],
        input=stdin,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_prints_the_completion_and_nothing_else(thinker):
    proc = agentforge_command("generate", thinker, "--prompt", "12+7=", "--max-new-tokens", "6")
    assert proc.returncode == 0 and proc.stderr == ""  # no "Loading weights" bars, no notices
    expected = agentforge.load(thinker).complete(["12+7="], max_new_tokens=6)[0]
    assert expected and proc.stdout == f"{expected}\n"


def test_generate_thinks_reproducibly(thinker, capsys):
    args = ["generate", thinker, "--prompt", "3+4=", "--max-new-tokens", "4", "--think"]
    first, second = main(capsys, *args), main(capsys, *args)
    assert first == second and first[0] == 0
    agent = agentforge.load(thinker)
    torch.manual_seed(0)
    assert first[1] in (f"{agent.complete(['3+4='], max_new_tokens=4, think=True)[0]}\n", "")


def test_think_needs_a_thinking_head(trunk, capsys):
    code, out, err = main(capsys, "generate", trunk, "--prompt", "1+1=", "--think")
    assert (code, out) == (2, "")
    assert err == (
        f"agentforge generate: error: --think: {trunk} has no Quiet-STaR thinking head (models from "
        "the quietstar phase on carry one)\n"
    )


def test_an_empty_completion_is_said_on_stderr(trunk, capsys, monkeypatch):
    monkeypatch.setattr(Agent, "complete", lambda self, prompts, **_: [""] * len(prompts))
    code, out, err = main(capsys, "generate", trunk, "--prompt", "1+1=")
    assert (code, out) == (0, "")
    assert err == "(empty completion: the model's first new token ended the text, or it wrote only whitespace)\n"


def test_a_phase_is_found_by_its_name(trunk, capsys):
    run_dir = trunk.parent / "run"
    run_dir.mkdir(exist_ok=True)
    link = run_dir / "01-cognate"
    if not link.exists():
        link.symlink_to(trunk)
    assert main(capsys, "generate", run_dir / "cognate", "--prompt", "1+1=")[0] == 0
    code, _, err = main(capsys, "generate", run_dir / "bitnet", "--prompt", "1+1=")
    assert code == 2 and err == (
        f"agentforge generate: error: {run_dir / 'bitnet'}: no such file or directory "
        f"(nor a phase bitnet in {run_dir})\n"
    )


def streamed_chat(monkeypatch) -> list[list[str]]:
    """Wraps Agent.chat so that the pieces it streams to the command are recorded, one list per reply."""
    replies, real = [], Agent.chat

    def chat(self, messages, *, stream=None, **kwargs):
        pieces = []
        replies.append(pieces)
        return real(self, messages, stream=lambda piece: (pieces.append(piece), stream and stream(piece)), **kwargs)

    monkeypatch.setattr(Agent, "chat", chat)
    return replies


def test_chat_answers_each_message_streaming_its_tokens(thinker, capsys, monkeypatch):
    replies = streamed_chat(monkeypatch)
    code, out, err = main(capsys, "chat", thinker, "--message", "12+7=", "--message", "3+4=", "--max-new-tokens", "6")
    assert (code, err) == (0, "")
    assert out == "".join("".join(pieces) + "\n" for pieces in replies)
    agent = agentforge.load(thinker)  # no chat template: each message is answered alone
    tokens = [len(agent.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]) for pieces in replies]
    assert len(replies) == 2 and all(len(p) >= min(2, n) for p, n in zip(replies, tokens))  # token by token
    assert [line.strip() for line in out.splitlines()] == [
        agent.chat([{"role": "user", "content": m}], max_new_tokens=6) for m in ("12+7=", "3+4=")
    ]


def test_chat_sends_the_conversation_through_the_template(thinker, capsys, monkeypatch):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    real_load, prompts = agentforge.loading.load, []

    def load_with_template(*args, **kwargs):
        agent = real_load(*args, **kwargs)
        agent.tokenizer.chat_template = template
        return agent

    real_prompt = Agent.chat_prompt
    monkeypatch.setattr(agentforge.loading, "load", load_with_template)
    monkeypatch.setattr(
        Agent, "chat_prompt", lambda self, messages: prompts.append(real_prompt(self, messages)) or prompts[-1]
    )
    code, out, _ = main(capsys, "chat", thinker, "--message", "12+7=", "--message", "3+4=", "--max-new-tokens", "3")
    assert code == 0
    first_reply = out.splitlines()[0].strip() if out.strip() else ""
    assert prompts == ["<user>12+7=\n<assistant>", f"<user>12+7=\n<assistant>{first_reply}\n<user>3+4=\n<assistant>"]


def test_chat_thinks(thinker, trunk, capsys):
    code, _, err = main(capsys, "chat", thinker, "--think", "--message", "1+1=", "--max-new-tokens", "3")
    assert code == 0 and err in ("", "(empty reply: the model ended its turn at once)\n")
    code, _, err = main(capsys, "chat", trunk, "--think", "--message", "1+1=")
    assert code == 2 and "has no Quiet-STaR thinking head" in err


@pytest.mark.parametrize(
    "typed, turns", [("12+7=\n\n/exit\nnever sent\n", 1), ("12+7=\n3+4=", 2)], ids=["exit", "end of input"]
)
def test_chat_reads_standard_input_until_exit_or_its_end(thinker, capsys, monkeypatch, typed, turns):
    replies = streamed_chat(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    code, out, err = main(capsys, "chat", thinker, "--max-new-tokens", "3")
    assert (code, err, len(replies)) == (0, "", turns)
    assert out.count("\n") == turns


def test_chat_at_a_terminal(thinker):
    """At a terminal: a prompt before each message, what is attached on stderr, Ctrl-D ends it."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentforge", "chat", str(thinker), "--max-new-tokens", "3"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=ENV,
    )
    os.close(follower)
    seen, deadline = b"", time.monotonic() + 300

    def read_until(prompts: int) -> None:
        """Read the terminal until it has shown ``prompts`` prompts (or the process has ended)."""
        nonlocal seen
        while seen.count(b"you> ") < prompts and time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:  # the process has exited and the terminal closed
                    return

    try:
        read_until(1)
        os.write(leader, b"12+7=\n")
        read_until(2)  # the reply, then the next prompt
        os.write(leader, b"\x04")  # Ctrl-D: the end of input
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "trained parts attached: thinking; /exit or Ctrl-D to quit" in text
    assert text.count("you> ") == 2 and "Loading" not in text
