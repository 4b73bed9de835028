"""agentforge.tools.sandbox: what a Python tool call returns and the limits it runs under, in
the kernel-confined sandbox (isolation="os") and in the explicit opt-out
(isolation="unsafe-inprocess"); refusal where the isolation cannot be set up. The attacks are in
tests/test_sandbox_escapes.py."""

import os
import threading
import time

import pytest

from agentforge.tools import (
    ISOLATIONS,
    OUTPUT_LIMIT,
    SandboxUnavailable,
    ToolCall,
    ToolResult,
    describe_isolation,
    run_python,
    run_tool,
    sandbox,
)


@pytest.fixture(scope="module")
def os_isolation():
    """The "os" isolation's record; the test is skipped, with the reason, where it is refused."""
    try:
        return describe_isolation("os")
    except SandboxUnavailable as refusal:
        pytest.skip(f"OS isolation refused on this machine: {refusal}")


def py(code, **limits):
    return run_tool(ToolCall("py", code), **limits)


@pytest.fixture(params=ISOLATIONS)
def isolation(request):
    if request.param == "os":
        request.getfixturevalue("os_isolation")
    return request.param


def test_captures_printed_output(isolation):
    result = py("import math\nprint(sum(range(10)), math.factorial(5))", isolation=isolation)
    assert result == ToolResult("45 120", True)
    assert py("x = 1", isolation=isolation) == ToolResult("", True)
    assert py(
        "import json, fractions\nprint(json.dumps([str(fractions.Fraction(1, 3))]))", isolation=isolation
    ) == ToolResult('["1/3"]', True)


def test_reports_the_exception_line(isolation):
    assert py("raise ValueError('bad input')", isolation=isolation) == ToolResult("error: ValueError: bad input", False)
    assert py("def f(:\n pass", isolation=isolation).output.startswith("error: SyntaxError")
    assert py("import sys\nsys.exit(3)", isolation=isolation) == ToolResult("error: exit status 3", False)
    assert py("import sys\nprint(1)\nsys.exit(0)", isolation=isolation) == ToolResult("1", True)


def test_output_is_clipped_and_brackets_kept_balanced(isolation):
    result = py("print('a' * 10000)", isolation=isolation)
    assert result.ok and len(result.output) == OUTPUT_LIMIT and result.output.endswith("...")
    assert py("print('x]')", isolation=isolation) == ToolResult("x)", True)  # would close [out: ...] early


def test_wall_clock_timeout(isolation):
    started = time.perf_counter()
    result = py("import time\ntime.sleep(30)", timeout_s=0.5, isolation=isolation)
    assert result == ToolResult("error: timed out after 0.5 s", False)
    assert time.perf_counter() - started < 5


def test_a_busy_loop_is_stopped(isolation):
    started = time.perf_counter()
    result = py("while True:\n    pass", timeout_s=1.0, isolation=isolation)
    assert not result.ok and ("timed out" in result.output or "CPU time" in result.output)
    assert time.perf_counter() - started < 6


def test_memory_and_file_size_limits(os_isolation):
    assert py("x = bytearray(600 * 2**20)", memory_mb=256) == ToolResult("error: memory limit exceeded", False)
    assert py("x = bytearray(16 * 2**20); print(len(x))", memory_mb=256) == ToolResult(str(16 * 2**20), True)
    assert "File too large" in py("print('x' * 3_000_000)").output  # RLIMIT_FSIZE (1 MiB) on its stdout
    assert "File too large" in py("open('f', 'wb').write(bytes(2 * 2**20))").output


def test_scratch_directory_is_writable_small_and_fresh(os_isolation):
    assert py("open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())") == ToolResult("hi", True)
    # the last call's file is gone
    assert py("import os\nprint(os.getcwd(), os.listdir('.'))") == ToolResult("/tmp []", True)
    filled = py("for i in range(40):\n    open(f'f{i}', 'wb').write(bytes(2**20 - 1))")
    assert not filled.ok and "No space left on device" in filled.output  # a 16 MiB tmpfs


def test_runs_as_an_unprivileged_user_in_namespaces_of_its_own(os_isolation):
    code = (
        "import os, socket\nprint(os.getuid(), os.getgid(), os.getpid(), os.getppid(), socket.gethostname(), "
        "sorted(os.listdir('/')), sorted(os.listdir('/dev')))"
    )
    result = py(code)
    assert result.ok, result
    assert result.output.startswith(
        "65534 65534 2 1 sandbox ['dev', 'lib', 'lib64', 'root', 'tmp']"
    ) or result.output.startswith("65534 65534 2 1 sandbox ['dev', 'lib', 'lib64', 'tmp', 'usr']"), result.output
    assert "null" in result.output and "urandom" in result.output


def test_threads_run_but_no_process_can_be_started(os_isolation):
    threads = (
        "import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\nprint(sorted(out))"
    )
    assert py(threads) == ToolResult("[0, 1, 2, 3]", True)
    for code in (
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['/bin/true'])",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    ):
        result = py(code)
        assert not result.ok, code
        assert result.output.startswith("error: PermissionError: [Errno 1] Operation not permitted"), code
    # glibc's system() reports a spawn it could not make as exit status 127 (127 << 8)
    assert py("import os\nprint(os.system('true'))") == ToolResult("32512", True)


def test_the_environment_is_empty(os_isolation, monkeypatch):
    monkeypatch.setenv("AGENTFORGE_SECRET", "x")
    assert py("import os\nprint(dict(os.environ))") == ToolResult("{'PWD': '/tmp'}", True)  # set by bwrap's --chdir


def test_describe_isolation_says_what_each_setting_gives(os_isolation):
    assert os_isolation["isolation"] == "os" and "bubblewrap" in os_isolation["launcher"]
    assert set(os_isolation["namespaces"]) >= {"user", "mount", "pid", "net"}
    assert {"ptrace", "mount", "setns", "unshare"} <= set(os_isolation["seccomp"]["denied"])
    assert os_isolation["filesystem"]["read_only"][0] == os.path.realpath(os.sys.executable)
    unsafe = describe_isolation("unsafe-inprocess")
    assert unsafe["isolation"] == "unsafe-inprocess" and unsafe["confinement"].startswith("none")
    with pytest.raises(ValueError, match="isolation must be one of"):
        describe_isolation("docker")


def test_refuses_in_one_line_where_bubblewrap_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no bwrap on it
    sandbox._bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"needs bubblewrap .*isolation='unsafe-inprocess'") as refused:
            run_python("print(1)")
        assert "\n" not in str(refused.value)
        assert run_python("print(1)", isolation="unsafe-inprocess") == ToolResult("1", True)  # the explicit opt-out
    finally:
        sandbox._bwrap.cache_clear()


def test_unsafe_inprocess_runs_in_this_process_and_only_on_the_main_thread():
    marker = f"{os.getpid()}"
    assert run_python("import os\nprint(os.getpid())", isolation="unsafe-inprocess") == ToolResult(marker, True)
    errors = []

    def worker():
        try:
            run_python("print(1)", isolation="unsafe-inprocess")
        except ValueError as error:
            errors.append(str(error))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]
    with pytest.raises(ValueError, match="isolation must be one of"):
        run_python("print(1)", isolation="bwrap")
