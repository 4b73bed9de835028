"""agentforge.tools: the calculator, the Python sandbox, call parsing and generation that runs
the calls a model writes (driven by a scripted model whose next token is read off a script)."""
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from agentforge import tools
from agentforge.tools import (OUTPUT_LIMIT, TOOL_PROMPT, ToolCall, ToolResult, follows_tool_format,
                              generate_with_tools, generate_with_tools_batch, parse_tool_call, run_tool,
                              tool_trajectories)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the calculator


@pytest.mark.parametrize("expression, value", [
    ("37*48", "1776"), ("0.1+0.2", "0.3"), ("7/2", "3.5"), ("1/3", "0.333333333333"), ("-7//2", "-4"),
    ("-7%3", "2"), ("2**-2", "0.25"), ("(1+2)*-3", "-9"), ("-2--5", "3"), ("1.5e3*2", "3000"), ("6/3", "2"),
    (" 12 + 7 ", "19"), ("-(54--89)*35*28+-13", "-140153"),
])
def test_calc_is_exact_arithmetic(expression, value):
    assert run_tool(ToolCall("calc", expression)) == ToolResult(value, True)


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "not allowed"), ("x + 1", "not allowed"), ("abs(-1)", "not allowed"),
    ("'a' * 3", "not allowed"), ("(1).__class__", "not allowed"), ("2**100000", "too large"),
    ("(10**300)**20", "too large"), ("1/0", "division by zero"), ("5 % 0", "division by zero"),
    ("0**-1", "division by zero"), ("2**0.5", "whole-number exponents"), ("", "empty"), ("(1+2", "cannot parse"),
    ("1" * 600, "longer than 500"),
])
def test_calc_refuses_what_is_not_arithmetic(expression, message):
    result = run_tool(ToolCall("calc", expression))
    assert not result.ok and result.output.startswith("error: ") and message in result.output


# ---------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, call", [
    ("37*48=[calc: 37*48]", ToolCall("calc", "37*48")),
    ("[calc:1+1]", ToolCall("calc", "1+1")),
    ("x=[py: print([1, [2]][1])]", ToolCall("py", "print([1, [2]][1])")),
    ("[py: print(']')]", ToolCall("py", "print(']')")),
    ("[calc: 1][out: 1]then [calc: 2*3]", ToolCall("calc", "2*3")),
    ("[search: cats]", ToolCall("search", "cats")),  # unknown tools parse; run_tool answers with an error
])
def test_parse_finds_the_call_the_text_ends_with(text, call):
    assert parse_tool_call(text) == call


@pytest.mark.parametrize("text", [
    "", "17", "[calc: 1+1", "[calc 1+1]", "calc: 1+1]", "[calc: 1+1] ", "[calc: 1+1]5", "[out: 2]",
    "[calc: 1][out: 1]", "[CALC: 1]", "[py: print(']')", "]", "[]", "[: 1]", None, 17,
])
def test_parse_returns_none_for_text_that_does_not_end_with_a_call(text):
    assert parse_tool_call(text) is None


def test_unknown_tool_gets_an_error_result():
    result = run_tool(ToolCall("search", "cats"))
    assert result == ToolResult("error: unknown tool 'search'; tools: calc, py", False)


@pytest.mark.parametrize("text, ok", [
    ("[calc: 37*48][out: 1776]1776", True),
    ("[py: print(2)][out: 2]then [calc: 2*3][out: 6]6", True),
    ("[calc: 1/0][out: error: division by zero]none", True),
    ("1776", False),                      # no call
    ("[calc: 37*48]1776", False),         # no result after the call
    ("[calc: 37*48][out: 1776]", False),  # no answer after the result
    ("[out: 5]5", False),                 # a result nobody asked for
    ("[calc: 1][out: 1][out: 1]1", False),
    ("[search: x][out: y]z", False),      # unknown tool
    ("[calc: 1+1][out: 2", False),        # unclosed
])
def test_follows_tool_format(text, ok):
    assert follows_tool_format(text) is ok


def test_tool_prompt_describes_both_tools_and_the_result_format():
    for part in ("[calc:", "[py:", "[out:", "+ - * / // % **"):
        assert part in TOOL_PROMPT


# ---------------------------------------------------------------------------------------------
# the sandbox


def py(code, **limits):
    return run_tool(ToolCall("py", code), **limits)


def test_sandbox_captures_printed_output():
    assert py("import math\nprint(sum(range(10)), math.factorial(5))") == ToolResult("45 120", True)
    assert py("x = 1") == ToolResult("", True)


def test_sandbox_reports_the_exception_line():
    assert py("raise ValueError('bad input')") == ToolResult("error: ValueError: bad input", False)
    assert py("def f(:\n pass").output.startswith("error: SyntaxError")


def test_sandbox_output_is_truncated():
    result = py("print('a' * 10000)")
    assert result.ok and len(result.output) == OUTPUT_LIMIT and result.output.endswith("...")
    assert not py("print('x' * 3_000_000)").ok  # the 1 MiB file-size limit on its output


def test_sandbox_wall_clock_timeout_kills_it():
    started = time.perf_counter()
    result = py("import time\ntime.sleep(30)", timeout_s=0.5)
    assert result == ToolResult("error: timed out after 0.5 s", False)
    assert time.perf_counter() - started < 5


def test_sandbox_cpu_limit_stops_a_busy_loop():
    started = time.perf_counter()
    result = py("while True:\n    pass", timeout_s=1.0)
    assert not result.ok and ("timed out" in result.output or "CPU time" in result.output)
    assert time.perf_counter() - started < 6


def test_sandbox_memory_limit():
    assert py("x = bytearray(600 * 2**20)", memory_mb=256) == ToolResult("error: memory limit exceeded", False)
    assert py("x = bytearray(16 * 2**20); print(len(x))", memory_mb=256) == ToolResult(str(16 * 2**20), True)


def test_sandbox_has_no_network():
    result = py("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))")
    assert not result.ok and "socket.connect is not allowed" in result.output
    assert "not allowed" in py("import socket\nsocket.getaddrinfo('localhost', 80)").output


@pytest.mark.skipif(not tools._network_isolation(), reason="no network namespaces on this system")
def test_network_namespace_has_no_interface_but_loopback():
    listing = subprocess.run([*tools._network_isolation(), "cat", "/proc/net/dev"], capture_output=True, text=True)
    interfaces = [line.split(":")[0].strip() for line in listing.stdout.splitlines()[2:]]
    assert interfaces == ["lo"]


def test_sandbox_writes_only_inside_its_own_directory(tmp_path):
    target = tmp_path / "outside.txt"
    assert "no access" in py(f"open({str(target)!r}, 'w').write('x')").output
    assert "no access" in py("open('../escape.txt', 'w')").output
    assert "no access" in py("import os\nos.symlink('/etc', 'etc')\nopen('etc/passwd').read()").output
    assert not target.exists()
    assert py("open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())") == ToolResult("hi", True)


def test_sandbox_directory_is_removed_afterwards():
    where = py("import os\nopen('f', 'w').write('x')\nprint(os.getcwd())")
    assert where.ok and not Path(where.output).exists()


def test_sandbox_cannot_read_the_callers_files_but_can_import(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    result = py(f"print(open({str(secret)!r}).read())")
    assert not result.ok and "no access" in result.output
    assert "no access" in py("import os\nprint(os.listdir('/'))").output
    assert py("import json, fractions\nprint(json.dumps([str(fractions.Fraction(1, 3))]))").ok


def test_sandbox_spawns_no_processes_and_sees_no_environment(monkeypatch):
    monkeypatch.setenv("AGENTFORGE_SECRET", "x")
    for code in ("import os\nos.system('true')", "import subprocess\nsubprocess.run(['true'])",
                 "import os\nos.fork()", "import ctypes\nctypes.CDLL(None)"):
        result = py(code)
        assert not result.ok and "not allowed" in result.output, code
    shown = py("import os\nprint(sorted(os.environ))")
    assert shown.ok and "AGENTFORGE_SECRET" not in shown.output and "PATH" not in shown.output


# ---------------------------------------------------------------------------------------------
# generation with tools


class ScriptedModel(nn.Module):
    """Writes ``script[prompt]`` token by token: at each step it emits the next token of the
    script after the text already in its context, or eos once the context leaves the script
    (e.g. after a tool result that differs from it). It records every context it reads."""

    def __init__(self, tokenizer, script: dict[str, str]):
        super().__init__()
        self.tokenizer, self.script, self.contexts = tokenizer, script, []

    def forward(self, input_ids, attention_mask, position_ids=None):
        vocab = len(self.tokenizer)
        logits = torch.zeros(*input_ids.shape, vocab)
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            ids = [i for i, m in zip(ids, mask) if m]
            self.contexts.append(ids)
            text = self.tokenizer.decode(ids)
            prompt = next(p for p in self.script if text.startswith(p))
            target, done = self.script[prompt], text[len(prompt):]
            rest = target[len(done):] if target.startswith(done) else ""
            token = self.tokenizer(rest, add_special_tokens=False)["input_ids"][0] if rest else \
                self.tokenizer.eos_token_id
            logits[row, -1, token] = 1.0
        return type("Output", (), {"logits": logits})()


@pytest.fixture(scope="module")
def tokenizer():
    from agentforge.data import load_text, train_tokenizer

    return train_tokenizer(load_text("stdlib", max_docs=10), 320)


def test_a_calc_call_is_run_and_generation_continues(tokenizer):
    model = ScriptedModel(tokenizer, {"37*48=": "[calc: 37*48][out: 1776]1776"})
    text, calls = generate_with_tools(model, tokenizer, "37*48=", max_new_tokens=40)
    assert text == "[calc: 37*48][out: 1776]1776" and follows_tool_format(text)
    assert calls == [(ToolCall("calc", "37*48"), ToolResult("1776", True))]


def test_generation_sees_the_real_result_not_its_own_guess(tokenizer):
    model = ScriptedModel(tokenizer, {"q=": "[calc: 2+2][out: 5]5"})
    text, calls = generate_with_tools(model, tokenizer, "q=", max_new_tokens=40)
    assert text == "[calc: 2+2][out: 4]" and calls[0][1] == ToolResult("4", True)


def test_python_call_and_call_limit(tokenizer):
    script = "[py: print(6*7)][out: 42][calc: 1+1][out: error: at most 1 tool calls]42"
    model = ScriptedModel(tokenizer, {"a=": script})
    text, calls = generate_with_tools(model, tokenizer, "a=", max_new_tokens=80, max_calls=1)
    assert text == script and [c.name for c, _ in calls] == ["py", "calc"] and not calls[1][1].ok


def test_malformed_and_unknown_calls_never_raise(tokenizer):
    script = {"a=": "[calc 1+1] [calc: 1+] [search: x][out: error: unknown tool 'search'; tools: calc, py]0",
              "b=": "[py: print(1"}
    model = ScriptedModel(tokenizer, script)
    (a, a_calls), (b, b_calls) = generate_with_tools_batch(model, tokenizer, ["a=", "b="], max_new_tokens=120)
    assert a.startswith("[calc 1+1] [calc: 1+][out: error: cannot parse '1+']")
    assert [c.name for c, _ in a_calls] == ["calc"] and b == "[py: print(1" and b_calls == []


def test_a_token_running_past_the_bracket_is_cut():
    from agentforge.data import load_text, train_tokenizer

    tok = train_tokenizer(load_text("stdlib", max_docs=10), 320)
    tok.add_tokens(["]+7"])  # one token holding the ']' and text after it
    model = ScriptedModel(tok, {"q=": "[calc: 2+3]+7"})
    text, calls = generate_with_tools(model, tok, "q=", max_new_tokens=40)
    overhang = tok.convert_tokens_to_ids("]+7")
    assert text == "[calc: 2+3][out: 5]" and calls == [(ToolCall("calc", "2+3"), ToolResult("5", True))]
    assert all(overhang not in ctx for ctx in model.contexts)  # the model never read the overhang


def test_batch_matches_one_at_a_time(tokenizer):
    script = {"1+2=": "[calc: 1+2][out: 3]3", "10*10=": "[calc: 10*10][out: 100]100", "x=": "7"}
    batch = generate_with_tools_batch(ScriptedModel(tokenizer, script), tokenizer, list(script), max_new_tokens=30,
                                      batch_size=2)
    single = [generate_with_tools(ScriptedModel(tokenizer, script), tokenizer, p, max_new_tokens=30) for p in script]
    assert batch == single and [t for t, _ in batch] == list(script.values())


def test_max_new_tokens_counts_model_tokens_only(tokenizer):
    model = ScriptedModel(tokenizer, {"q=": "[calc: 9*9][out: 81]81"})
    text, _ = generate_with_tools(model, tokenizer, "q=", max_new_tokens=len(
        tokenizer("[calc: 9*9]", add_special_tokens=False)["input_ids"]))
    assert text == "[calc: 9*9][out: 81]"


def test_tool_trajectories_mark_what_the_runtime_wrote(tokenizer):
    script = {"37*48=": "[calc: 37*48][out: 1776]1776", "x=": "7"}
    model = ScriptedModel(tokenizer, script)
    contexts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in script]
    for context, (ids, written) in zip(contexts, tool_trajectories(model, tokenizer, contexts, max_new_tokens=30,
                                                                   temperature=0.0)):
        assert len(ids) == len(written) and ids[-1] == tokenizer.eos_token_id and written[-1]
        by_runtime = tokenizer.decode([i for i, w in zip(ids, written) if not w])
        by_model = tokenizer.decode([i for i, w in zip(ids, written) if w], skip_special_tokens=True)
        prompt = tokenizer.decode(context)
        assert by_runtime == ("[out: 1776]" if prompt == "37*48=" else "")
        assert by_model == script[prompt].replace(by_runtime, "")


def test_sampled_tool_generation_is_seeded(tokenizer):
    model = ScriptedModel(tokenizer, {"q=": "[calc: 9*9][out: 81]81"})  # near-uniform next-token distribution
    sample = lambda seed: generate_with_tools_batch(model, tokenizer, ["q="] * 3, max_new_tokens=8,  # noqa: E731
                                                    temperature=1.0, seed=seed)
    first = sample(5)
    assert first == sample(5) and first != sample(6)
    assert len({text for text, _ in first}) > 1  # the rows of one batch draw different tokens


def test_bad_arguments_are_one_line_errors(tokenizer):
    model = ScriptedModel(tokenizer, {"q=": "1"})
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate_with_tools(model, tokenizer, "q=", max_new_tokens=0)
    with pytest.raises(TypeError, match="prompt must be a string"):
        generate_with_tools(model, tokenizer, ["q="], max_new_tokens=3)
    with pytest.raises(TypeError, match="not one string"):
        generate_with_tools_batch(model, tokenizer, "q=", max_new_tokens=3)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate_with_tools(model, tokenizer, "", max_new_tokens=3)


def test_runs_on_a_real_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config).train()
    outputs = generate_with_tools_batch(model, tokenizer, [TOOL_PROMPT + " 12+7=", "3*4="], max_new_tokens=12)
    assert all(isinstance(text, str) and all(isinstance(r, ToolResult) for _, r in calls) for text, calls in outputs)
    assert model.training  # generation ran in eval mode and restored the training flag
