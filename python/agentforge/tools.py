"""Tool use: a calculator and a sandboxed Python runner that a model calls from its own text.

The format (shared by the curriculum and baking phases):

    prompt       37*48=
    model        [calc: 37*48]            generation stops right after the closing ']'
    runtime      [out: 1776]              the call is executed and its result appended
    model        1776<eos>                generation continues

``[calc: EXPRESSION]`` evaluates integer/decimal arithmetic (``+ - * / // % **`` and
parentheses) exactly, with fractions, by walking the parsed syntax tree: never ``eval``.
``[py: CODE]`` runs a Python snippet and returns what it printed. Errors come back as
``[out: error: MESSAGE]``; nothing a model writes can raise out of generation.

The Python sandbox is a child ``python -I`` process with
  * an empty environment, a fresh temporary working directory that is deleted afterwards,
  * CPU-time, address-space and file-size rlimits and a wall-clock timeout (the whole process
    group is killed),
  * no network: a new network namespace (``unshare --net``) when the system allows one, and in
    every case an audit hook that refuses socket connections,
  * an audit hook that refuses opening files outside its working directory (reading the Python
    installation itself is allowed, so imports work), listing or changing other directories,
    spawning processes, and loading native code through ctypes.
Audit hooks are not a security boundary against hostile code (CPython documents this); with
the rlimits, the namespace and the throwaway directory they make a mistaken or curious snippet
from a small model harmless, which is what this sandbox is for.
"""
from __future__ import annotations

import ast
import functools
import math
import operator
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

__all__ = ["TOOL_PROMPT", "TOOLS", "ToolCall", "ToolResult", "parse_tool_call", "run_tool", "format_result",
           "generate_with_tools", "generate_with_tools_batch", "tool_trajectories", "follows_tool_format",
           "trace_segments"]

TOOLS = ("calc", "py")
TOOL_PROMPT = ("Tools: [calc: EXPR] does arithmetic (+ - * / // % ** and parentheses); [py: CODE] runs Python "
               "and returns what it prints; each result comes back as [out: RESULT].")
OUTPUT_LIMIT = 200  # characters of a result fed back to the model
_MAX_BITS = 4096  # calculator numbers beyond ~1200 digits are refused, not computed
_OPENER = re.compile(r"\[([a-z_]{1,16}):[ ]?")


@dataclass(frozen=True)
class ToolCall:
    """One call: ``name`` ("calc" or "py"; other names give an error result) and its argument."""

    name: str
    argument: str


@dataclass(frozen=True)
class ToolResult:
    """What a call returned: ``output`` (the text inside ``[out: ...]``) and whether it succeeded."""

    output: str
    ok: bool


# ---------------------------------------------------------------------------------------------
# parsing


def _closing_bracket(text: str, start: int, name: str) -> int | None:
    """Index of the ']' that closes the call whose argument starts at ``start``, or None if the
    text ends first. Brackets inside Python string literals do not count."""
    depth, quote, i = 0, None, start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif name == "py" and ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return None


def _blocks(text: str) -> tuple[list[tuple[int, int, str]], bool]:
    """Every closed ``[name: ...]`` block as ``(start, end, name)``, left to right, and whether
    the text ends inside an unclosed one."""
    blocks, position = [], 0
    while match := _OPENER.search(text, position):
        close = _closing_bracket(text, match.end(), match.group(1))
        if close is None:
            return blocks, True
        blocks.append((match.start(), close + 1, match.group(1)))
        position = close + 1
    return blocks, False


def _calls(text: str):
    """``(start, end, ToolCall)`` for every closed call in ``text`` (``end`` is one past its ']'),
    left to right; ``[out: ...]`` blocks are skipped over, never read as calls."""
    for start, end, name in _blocks(text)[0]:
        if name != "out":
            yield start, end, ToolCall(name, text[_OPENER.match(text, start).end():end - 1])


def parse_tool_call(text: str) -> ToolCall | None:
    """The call that ``text`` ends with (its closing ']' is the last character), else None.
    A malformed call (no colon, unclosed brackets) is None; an unknown tool name is returned
    as a call, and ``run_tool`` answers it with an error result."""
    if not isinstance(text, str) or not text.endswith("]"):
        return None
    last = None
    for _, end, call in _calls(text):
        last = call if end == len(text) else None
    return last


def trace_segments(text: str) -> list[tuple[str, bool]]:
    """``text`` cut into ``(segment, is_result)`` pieces: the ``[out: ...]`` blocks (written by
    the runtime, so a model trained on a trace takes no loss on them) and the text around them."""
    pieces, position = [], 0
    for start, end, name in _blocks(text)[0]:
        if name != "out":
            continue
        if start > position:
            pieces.append((text[position:start], False))
        pieces.append((text[start:end], True))
        position = end
    if position < len(text):
        pieces.append((text[position:], False))
    return pieces


def follows_tool_format(text: str) -> bool:
    """True when ``text`` uses tools as specified: at least one call, every call names a known
    tool and is followed at once by its ``[out: ...]``, every ``[out: ...]`` follows a call, and a
    non-empty answer comes after the last result."""
    if not isinstance(text, str):
        return False
    blocks, unclosed = _blocks(text)
    if unclosed:
        return False
    if not blocks or blocks[-1][2] != "out" or not text[blocks[-1][1]:].strip():
        return False
    for i, (start, end, name) in enumerate(blocks):
        if name == "out":
            previous = blocks[i - 1] if i else None
            if previous is None or previous[2] == "out" or previous[1] != start:
                return False
        elif name not in TOOLS or i + 1 == len(blocks) or blocks[i + 1][2] != "out":
            return False
    return True


# ---------------------------------------------------------------------------------------------
# the calculator


class CalcError(ValueError):
    """A calculator expression that is not allowed or cannot be evaluated."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _bits(x: Fraction) -> int:
    return max(x.numerator.bit_length(), x.denominator.bit_length())


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalcError("only whole-number exponents are supported")
    if _bits(base) * abs(exponent.numerator) > _MAX_BITS:
        raise CalcError("number too large")
    if base == 0 and exponent < 0:
        raise CalcError("division by zero")
    return base ** exponent.numerator


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            result = _power(left, right)
        elif right == 0 and type(node.op) in (ast.Div, ast.FloorDiv, ast.Mod):
            raise CalcError("division by zero")
        else:
            result = Fraction(_BINARY[type(node.op)](left, right))
        if _bits(result) > _MAX_BITS:
            raise CalcError("number too large")
        return result
    raise CalcError(f"not allowed in a calculation: {ast.unparse(node)}")


def _format_number(value: Fraction) -> str:
    """An integer as itself, a short terminating decimal exactly (0.3, not 0.30000000000000004),
    anything else to 12 significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    places = next((p for p in range(1, 13) if (value * 10 ** p).denominator == 1), None)
    if places is None:
        return f"{float(value):.12g}"
    digits = str(abs(value.numerator) * 10 ** places // value.denominator).rjust(places + 1, "0")
    return f"{'-' if value < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def calculate(expression: str) -> str:
    """The exact value of an arithmetic ``expression``, formatted; raises ``CalcError``."""
    if not expression.strip():
        raise CalcError("empty expression")
    if len(expression) > 500:
        raise CalcError("expression longer than 500 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalcError(f"cannot parse {expression.strip()!r}") from None
    return _format_number(_evaluate(tree))


# ---------------------------------------------------------------------------------------------
# the Python sandbox

# Runs in the child before the snippet: installs the audit hook, then executes the code read
# from stdin. Paths are compared after resolving symlinks, so "../" and links cannot escape.
_CHILD = r"""
import os, sys
code = sys.stdin.read()
HOME = os.path.realpath(os.getcwd())
READABLE = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                 sys.base_exec_prefix)})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED = {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
           "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "socket.connect", "socket.bind",
           "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
           "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "sys.remote_exec"}
LOOK_EVENTS = {"os.listdir", "os.scandir", "os.walk", "glob.glob"}  # reading a directory: imports need these
CHANGE_EVENTS = {"os.chdir", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                 "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}

def inside(path, roots):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return any(real == r or real.startswith(r + os.sep) for r in roots)

def hook(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and not isinstance(args[0], int):
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if not (inside(path, (HOME,)) or (not writes and inside(path, READABLE))):
            raise PermissionError(f"sandbox: no access to {path}")
    elif event in LOOK_EVENTS or event in CHANGE_EVENTS:
        roots = (HOME,) if event in CHANGE_EVENTS else (HOME,) + READABLE
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, roots):
                raise PermissionError(f"sandbox: no access to {path}")

sys.addaudithook(hook)
del hook
exec(compile(code, "<py>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


@functools.cache
def _network_isolation() -> tuple[str, ...]:
    """The ``unshare`` prefix that gives a child its own, empty network namespace here, or ()
    when neither the privileged nor the user-namespace form works (the audit hook remains)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--user", "--map-root-user", "--net")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def _limits(cpu_s: int, memory_mb: int, file_mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= OUTPUT_LIMIT else text[:OUTPUT_LIMIT - 3] + "..."


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed without a message"


def run_python(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256) -> ToolResult:
    """Run ``code`` in the sandbox; its printed stdout is the output (clipped), an exception,
    a timeout or a broken limit is an error result."""
    with tempfile.TemporaryDirectory(prefix="agentforge-sandbox-") as home, \
            tempfile.TemporaryDirectory(prefix="agentforge-sandbox-io-") as io_dir:
        command = [*_network_isolation(), sys.executable, "-I", "-S", "-B", "-c", _CHILD]
        out_path, err_path = Path(io_dir) / "stdout", Path(io_dir) / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # a session of its own: a timeout kills the whole process group
            process = subprocess.Popen(command, cwd=home, env={}, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                       start_new_session=True, preexec_fn=_limits(max(1, math.ceil(timeout_s)), memory_mb, 1))
            try:
                process.communicate(code.encode("utf-8", "replace"), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return ToolResult(f"error: timed out after {timeout_s:g} s", False)
        stdout = out_path.read_bytes()[:4 * OUTPUT_LIMIT].decode("utf-8", "replace")
        stderr = err_path.read_bytes()[-4000:].decode("utf-8", "replace")
    if process.returncode == 0:
        return ToolResult(_balanced(_clip(stdout)), True)
    return ToolResult(_balanced(_clip(f"error: {_child_failure(process.returncode, stderr)}")), False)


def _child_failure(returncode: int, stderr: str) -> str:
    if returncode < 0:
        reason = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGXFSZ: "file size limit exceeded",
                  signal.SIGKILL: "killed"}.get(-returncode, f"signal {-returncode}")
        return reason
    line = _last_error_line(stderr)
    return "memory limit exceeded" if line.startswith("MemoryError") else line


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _balanced(text: str) -> str:
    """``text`` unchanged when its brackets balance, else with them turned into parentheses, so
    that the ``[out: ...]`` block around it always closes where it should."""
    depth = 0
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            break
    return text if depth == 0 else text.replace("[", "(").replace("]", ")")


def run_tool(call: ToolCall, *, timeout_s: float = 2.0, memory_mb: int = 256) -> ToolResult:
    """Execute ``call``; never raises for anything a model can write (unknown tools, bad
    expressions, failing code all give ``ToolResult(output="error: ...", ok=False)``)."""
    if call.name == "calc":
        try:
            return ToolResult(calculate(call.argument), True)
        except CalcError as error:
            return ToolResult(_clip(f"error: {error}"), False)
        except (ArithmeticError, RecursionError, ValueError) as error:  # deep nesting, float overflow
            return ToolResult(_clip(f"error: {type(error).__name__}"), False)
    if call.name == "py":
        return run_python(call.argument, timeout_s=timeout_s, memory_mb=memory_mb)
    return ToolResult(f"error: unknown tool {call.name!r}; tools: {', '.join(TOOLS)}", False)


def format_result(result: ToolResult) -> str:
    """The text the runtime appends after a call: ``[out: OUTPUT]``."""
    return f"[out: {result.output}]"


# ---------------------------------------------------------------------------------------------
# generation


def _first_new_call(text: str, after: int):
    """The first call in ``text`` whose closing ']' is at index ``after`` or later, as
    ``(end, ToolCall)``; None while no such call has closed."""
    for _, end, call in _calls(text):
        if end > after:
            return end, call
    return None


@dataclass
class _Row:
    """One sequence being generated: its token ids, the text fixed so far (prompt excluded) and
    where the model's current, not yet fixed segment of ids starts."""

    ids: list
    segment_start: int
    done_text: str = ""
    calls: list = field(default_factory=list)
    new_tokens: int = 0
    finished: bool = False
    written: list = field(default_factory=list)  # per id after the prompt: True if the model wrote it
    ended_by_eos: bool = False


def _step_rows(model, rows: list[_Row], pad_id: int, temperature: float = 0.0, generator=None) -> list[int]:
    """The next token of each row (one forward pass over the left-padded batch): greedy, or
    sampled at ``temperature`` > 0 with ``generator``."""
    import torch

    from agentforge.eval._common import model_device

    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.ids):] = torch.tensor(row.ids)
        mask[i, width - len(row.ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = model_device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                   position_ids=positions.to(device)).logits[:, -1].float().cpu()
    if temperature <= 0:
        return logits.argmax(-1).tolist()
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0].tolist()


def _advance(row: _Row, token: int, tokenizer, max_calls: int) -> None:
    """Append ``token``; if it closes a call, cut the text after the ']', run the call and append
    its ``[out: ...]`` (as ids the model reads next)."""
    row.ids.append(token)
    row.written.append(True)
    row.new_tokens += 1
    text = row.done_text + tokenizer.decode(row.ids[row.segment_start:], skip_special_tokens=True)
    found = _first_new_call(text, len(row.done_text))
    if found is None:
        return
    end, call = found
    result = run_tool(call) if len(row.calls) < max_calls else ToolResult(f"error: at most {max_calls} tool calls", False)
    row.calls.append((call, result))
    # a token that ran past the ']' is re-encoded without its overhang
    prompt_length = len(row.ids) - len(row.written)
    segment = tokenizer(text[len(row.done_text):end], add_special_tokens=False)["input_ids"]
    output = tokenizer(format_result(result), add_special_tokens=False)["input_ids"]
    row.ids[row.segment_start:] = segment + output
    row.written[row.segment_start - prompt_length:] = [True] * len(segment) + [False] * len(output)
    row.done_text = text[:end] + format_result(result)
    row.segment_start = len(row.ids)


def _check_generation_arguments(max_new_tokens, max_calls, batch_size, temperature) -> None:
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"generate_with_tools: {name} must be a positive int, got {value!r}")
    if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 0:
        raise ValueError(f"generate_with_tools: max_calls must be an int >= 0, got {max_calls!r}")
    if not temperature >= 0:
        raise ValueError(f"generate_with_tools: temperature must be >= 0 (0: greedy), got {temperature!r}")


def _eos_and_pad(tokenizer) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("generate_with_tools: the tokenizer has no eos token")
    return eos, eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _generate_rows(model, tokenizer, rows: list[_Row], *, max_new_tokens: int, max_calls: int, batch_size: int,
                   temperature: float, seed: int) -> None:
    """Advance every row until eos or ``max_new_tokens`` model tokens, running its calls."""
    import torch

    from agentforge.eval._common import evaluation_mode

    eos, pad = _eos_and_pad(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with evaluation_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            while active := [row for row in batch if not row.finished]:
                for row, token in zip(active, _step_rows(model, active, pad, temperature, generator)):
                    if token == eos:
                        row.finished = row.ended_by_eos = True
                        continue
                    _advance(row, token, tokenizer, max_calls)
                    row.finished = row.new_tokens >= max_new_tokens


def generate_with_tools_batch(model, tokenizer, prompts, *, max_new_tokens: int, max_calls: int = 2,
                              batch_size: int = 32, temperature: float = 0.0, seed: int = 0) -> list[tuple[str, list]]:
    """``generate_with_tools`` for many prompts at once (left-padded batches; every row runs its
    own calls), greedy or sampled at ``temperature`` (seeded by ``seed``). Returns one
    ``(completion_text, calls)`` per prompt, in order."""
    if isinstance(prompts, str):
        raise TypeError("generate_with_tools_batch: prompts must be a sequence of strings, not one string")
    _check_generation_arguments(max_new_tokens, max_calls, batch_size, temperature)
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"generate_with_tools: prompt {prompt!r} encodes to no tokens")
        rows.append(_Row(ids=list(ids), segment_start=len(ids)))
    _generate_rows(model, tokenizer, rows, max_new_tokens=max_new_tokens, max_calls=max_calls, batch_size=batch_size,
                   temperature=temperature, seed=seed)
    return [(row.done_text + tokenizer.decode(row.ids[row.segment_start:], skip_special_tokens=True), row.calls)
            for row in rows]


def tool_trajectories(model, tokenizer, contexts: list[list[int]], *, max_new_tokens: int, max_calls: int = 2,
                      batch_size: int = 32, temperature: float = 1.0, seed: int = 0) -> list[tuple[list, list]]:
    """Continuations of token-id ``contexts`` with the tool calls executed, as training data:
    per context ``(ids, written)``, the new ids (the model's tokens, each call's ``[out: ...]``
    and the eos that ended it, if one did) and for each whether the model wrote it (False for
    the tool results, which a model trained on the trajectory must not be taught to guess)."""
    _check_generation_arguments(max_new_tokens, max_calls, batch_size, temperature)
    if not contexts or any(not context for context in contexts):
        raise ValueError("tool_trajectories: contexts must be a non-empty list of non-empty token id lists")
    eos, _ = _eos_and_pad(tokenizer)
    rows = [_Row(ids=list(context), segment_start=len(context)) for context in contexts]
    _generate_rows(model, tokenizer, rows, max_new_tokens=max_new_tokens, max_calls=max_calls, batch_size=batch_size,
                   temperature=temperature, seed=seed)
    trajectories = []
    for row, context in zip(rows, contexts):
        ending = [eos] if row.ended_by_eos else []
        trajectories.append((row.ids[len(context):] + ending, row.written + [True] * len(ending)))
    return trajectories


def generate_with_tools(model, tokenizer, prompt: str, *, max_new_tokens: int, max_calls: int = 2):
    """Greedy generation from ``prompt`` that executes the tool calls the model writes.

    After each token the new text is checked for a call that has just closed; the text is cut
    right after its ']' (a token that ran past it is re-encoded), the call is run and
    ``[out: RESULT]`` appended, and generation continues until eos or ``max_new_tokens`` model
    tokens (tool results do not count). Calls beyond ``max_calls`` get an error result.
    Returns ``(completion_text, [(ToolCall, ToolResult), ...])``."""
    if not isinstance(prompt, str):
        raise TypeError(f"generate_with_tools: prompt must be a string, got {type(prompt).__name__}")
    return generate_with_tools_batch(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                     max_calls=max_calls)[0]
