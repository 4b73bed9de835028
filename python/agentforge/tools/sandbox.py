"""The ``[py: CODE]`` tool: model-written Python, run in a process the kernel confines.

``run_python(code, isolation="os")`` (the default) starts the snippet under bubblewrap
(``bwrap``, Debian's ``bubblewrap`` package) with

  * user, mount, PID, network, IPC, UTS and cgroup namespaces of its own; inside them it is uid
    65534 with no capabilities, no_new_privs set, and no way to make new user namespaces;
  * a filesystem of its own: read-only binds of the interpreter, the standard library (its
    ``site-packages`` covered by an empty read-only directory) and the shared libraries they
    load, a read-only ``/`` and ``/dev`` (null, zero, random ...), no ``/proc`` or ``/sys``, and a
    16 MiB tmpfs ``/tmp`` as its working directory (gone with the sandbox);
  * a seccomp filter (``_seccomp_program``) that refuses ptrace and process_vm_*, mount and the
    new mount API, chroot/pivot_root, setns/unshare and namespace flags to clone, fork/vfork and
    any clone that is not a thread, sockets other than AF_UNIX, io_uring, bpf, perf_event_open,
    userfaultfd, keyrings, module and kexec loading, and foreign syscall ABIs (x32, i386);
  * rlimits on CPU time, address space, processes, file size and open files;
  * a wall-clock timeout that kills the PID namespace's init, which makes the kernel kill every
    process left in it before the call returns.

Where this cannot be set up (no bwrap, no user namespaces, another CPU architecture) the tool
refuses with ``SandboxUnavailable`` and one line saying what is missing; it never falls back on
its own. ``isolation="unsafe-inprocess"`` is the explicit opt-out: the snippet runs inside the
calling process with nothing but a timeout, and can do anything that process can.
``describe_isolation`` says what a setting gives, for the run record.

Run as root, the sandbox's uid 65534 maps to host uid 0 (bwrap maps the caller's uid), still with
no capabilities in any namespace: the read-only ``/``, the absent ``/proc`` and the seccomp
filter are what keep that uid from the host's root-owned interfaces, and the fork ban stands in
for RLIMIT_NPROC, which the kernel does not enforce on uid 0.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import io
import json
import math
import os
import platform
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

from agentforge.settings import Checked, setting

from .format import OUTPUT_LIMIT, ToolResult, balanced, clip

__all__ = ["ISOLATIONS", "SandboxUnavailable", "ToolSettings", "describe_isolation", "isolation", "run_python"]

ISOLATIONS = ("os", "unsafe-inprocess")
# The isolation a call gets when it names none: "os", or what the running phase was configured with.
_DEFAULT_ISOLATION: contextvars.ContextVar[str] = contextvars.ContextVar("agentforge_tool_isolation", default="os")


@dataclass
class ToolSettings(Checked):
    """The run's tool settings (``tools:`` in the run config)."""

    python: str = setting(
        "os",
        choices=ISOLATIONS,
        doc="the Python tool's isolation: os (the kernel-confined "
        "sandbox) or unsafe-inprocess (none; logged in the run record)",
    )


@contextlib.contextmanager
def isolation(name: str):
    """Calls that name no isolation get ``name`` inside this block (a phase runs in one)."""
    if name not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {name!r}")
    token = _DEFAULT_ISOLATION.set(name)
    try:
        yield name
    finally:
        _DEFAULT_ISOLATION.reset(token)


def current_isolation(name: str | None) -> str:
    """``name``, or the isolation of the enclosing ``isolation`` block ("os" outside one)."""
    return _DEFAULT_ISOLATION.get() if name is None else name


SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace
SCRATCH_MB = 16  # the tmpfs /tmp, the only writable place
FILE_MB = 1  # RLIMIT_FSIZE: the largest file, its stdout included
OPEN_FILES = 64  # RLIMIT_NOFILE
TASKS = 16  # RLIMIT_NPROC: threads, as the seccomp filter allows no other processes


class SandboxUnavailable(RuntimeError):
    """The Python tool's isolation cannot be set up on this machine (the message says what is missing)."""


# ---------------------------------------------------------------------------------------------
# the seccomp filter: a classic BPF program, checked by the kernel on every syscall

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_SYSCALLS = {  # x86_64 numbers (asm/unistd_64.h)
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "pidfd_getfd": 438,
    "kcmp": 312,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "setns": 308,
    "unshare": 272,
    "fork": 57,
    "vfork": 58,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "reboot": 169,
    "swapon": 167,
    "swapoff": 168,
    "acct": 163,
    "quotactl": 179,
    "syslog": 103,
    "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "iopl": 172,
    "ioperm": 173,
}
_CLONE, _CLONE3, _SOCKET, _SOCKETPAIR = 56, 435, 41, 53
_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = 0x7E020080  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_AF_UNIX = 1
_EPERM, _ENOSYS = 1, 38
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (args[0]'s low half on little-endian)


def _assemble(program: list[tuple | str]) -> bytes:
    """``struct sock_filter`` bytes of ``program``: ``(code, k)`` statements, ``(code, k, jt, jf)``
    jumps whose targets are label names, and ``"label"`` strings marking positions."""
    labels: dict[str, int] = {}
    position = 0
    for item in program:
        if isinstance(item, str):
            labels[item] = position
        else:
            position += 1
    out, position = [], 0
    for item in program:
        if isinstance(item, str):
            continue
        code, k, *targets = item
        jumps = [labels[t] - position - 1 if isinstance(t, str) else t for t in targets] or [0, 0]
        if not all(0 <= j <= 255 for j in jumps):
            raise AssertionError(f"seccomp program: jump out of range at instruction {position}")
        out.append(struct.pack("=HBBI", code, jumps[0], jumps[1], k))
        position += 1
    return b"".join(out)


@functools.cache
def _seccomp_program() -> bytes:
    """The filter bwrap installs before it runs the interpreter (denied calls fail with EPERM;
    clone3 with ENOSYS, so that threads fall back on clone, whose flags the filter can read)."""
    program: list[tuple | str] = [
        (_LD_W_ABS, _ARCH),
        (_JEQ, _AUDIT_ARCH_X86_64, 0, "kill"),
        (_LD_W_ABS, _NR),
        (_JGE, _X32_BIT, "deny", 0),
    ]
    program += [(_JEQ, number, "deny", 0) for number in _SYSCALLS.values()]
    program += [
        (_JEQ, _CLONE3, "enosys", 0),
        (_JEQ, _CLONE, "clone", 0),
        (_JEQ, _SOCKET, "family", 0),
        (_JEQ, _SOCKETPAIR, "family", 0),
        (_RET, _RET_ALLOW),
        "clone",
        (_LD_W_ABS, _ARG0),
        (_JSET, _CLONE_NAMESPACES, "deny", 0),
        (_JSET, _CLONE_THREAD, "allow", "deny"),
        "family",
        (_LD_W_ABS, _ARG0),
        (_JEQ, _AF_UNIX, "allow", "deny"),
        "allow",
        (_RET, _RET_ALLOW),
        "deny",
        (_RET, _RET_ERRNO | _EPERM),
        "enosys",
        (_RET, _RET_ERRNO | _ENOSYS),
        "kill",
        (_RET, _RET_KILL_PROCESS),
    ]
    return _assemble(program)


# ---------------------------------------------------------------------------------------------
# the filesystem view and the bwrap command

# Runs first inside the sandbox: the rlimits (the snippet can lower them, never raise them: no
# CAP_SYS_RESOURCE), then the snippet read from stdin, in fresh globals.
_BOOT = r"""
import resource, sys
cpu, memory, size, files, tasks = map(int, sys.argv[1:6])
for which, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
                          (resource.RLIMIT_FSIZE, size, size), (resource.RLIMIT_NOFILE, files, files),
                          (resource.RLIMIT_NPROC, tasks, tasks), (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(which, (soft, hard))
del cpu, memory, size, files, tasks, which, soft, hard, resource
exec(compile(sys.stdin.read(), "<py>", "exec"), {"__name__": "__main__"})
"""


def _shared_libraries(files: list[str]) -> list[str]:
    """The shared libraries (and the dynamic loader) that ``files`` load, as ``ldd`` resolves them."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise SandboxUnavailable(
            "the Python tool's sandbox needs ldd (Debian package libc-bin) to find the interpreter's shared libraries"
        )
    listing = subprocess.run([ldd, *files], capture_output=True, text=True, env={}, check=False).stdout
    found = set()
    for line in listing.splitlines():
        path = line.split("=>")[-1].strip().split(" (")[0]
        if path.startswith("/") and not line.endswith(":"):  # "FILE:" heads each file's list
            found.add(path)
    return sorted(found)


@functools.cache
def _view() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(read_only, covered)``: the host paths bound read-only at the same place in the
    sandbox, and the directories inside them hidden under an empty one (installed packages)."""
    interpreter = os.path.realpath(sys.executable)
    stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
    dynload = os.path.realpath(sysconfig.get_config_var("DESTSHARED") or os.path.join(stdlib, "lib-dynload"))
    roots = [stdlib] + ([] if dynload.startswith(stdlib + os.sep) else [dynload])
    libraries = _shared_libraries([interpreter, *sorted(glob.glob(os.path.join(dynload, "*.so")))])
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    covered = sorted({os.path.realpath(sysconfig.get_path(key, vars=base)) for key in ("purelib", "platlib")})
    covered = [path for path in covered if os.path.isdir(path) and any(path.startswith(r + os.sep) for r in roots)]
    return (interpreter, *roots, *libraries), tuple(covered)


def _bwrap_arguments(seccomp_fd: int, info_fd: int) -> list[str]:
    read_only, covered = _view()
    args = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--hostname",
        "sandbox",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--clearenv",
    ]
    for path in read_only:
        args += ["--ro-bind", path, path]
    for path in covered:
        args += ["--tmpfs", path, "--remount-ro", path]
    args += [
        "--dev",
        "/dev",
        "--remount-ro",
        "/dev",
        "--size",
        str(SCRATCH_MB << 20),
        "--tmpfs",
        "/tmp",
        "--remount-ro",
        "/",
        "--chdir",
        "/tmp",
        "--seccomp",
        str(seccomp_fd),
        "--info-fd",
        str(info_fd),
    ]
    return args


@functools.cache
def _bwrap() -> tuple[str, str]:
    """``(path, version)`` of bwrap after a probe run in the full sandbox; raises
    ``SandboxUnavailable`` with the reason when the isolation cannot be set up here."""
    if platform.machine() != "x86_64":
        raise SandboxUnavailable(
            f"the Python tool's seccomp filter covers x86_64 only, not {platform.machine()}; "
            "pass isolation='unsafe-inprocess' to run without OS isolation"
        )
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "the Python tool needs bubblewrap for its OS isolation (apt-get install bubblewrap); "
            "pass isolation='unsafe-inprocess' to run without it"
        )
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, env={}, check=False).stdout.strip()
    probe = _run_isolated(bwrap, "print(6 * 7)", timeout_s=30.0, memory_mb=256)
    if probe.stdout != "42\n":
        reason = next((line for line in probe.stderr.splitlines() if line.strip()), f"exit status {probe.returncode}")
        raise SandboxUnavailable(
            f"the Python tool's OS isolation cannot be set up here ({reason.strip()}); "
            "pass isolation='unsafe-inprocess' to run without it"
        )
    return bwrap, version


# ---------------------------------------------------------------------------------------------
# running a snippet


class _Finished:
    """What a sandboxed run left: exit status (None: timed out), stdout head, stderr tail."""

    def __init__(self, returncode: int | None, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run_isolated(bwrap: str, code: str, *, timeout_s: float, memory_mb: int) -> _Finished:
    limits = [max(1, math.ceil(timeout_s)), memory_mb << 20, FILE_MB << 20, OPEN_FILES, TASKS]
    seccomp_read, seccomp_write = os.pipe()
    info_read, info_write = os.pipe()
    os.write(seccomp_write, _seccomp_program())  # a few hundred bytes: fits the pipe buffer
    os.close(seccomp_write)
    # The snippet comes in from a file and stdout/stderr go to files (RLIMIT_FSIZE caps them), all
    # in a directory of the caller's that the sandbox cannot see: no pipe to keep serviced.
    with tempfile.TemporaryDirectory(prefix="agentforge-sandbox-io-") as io_dir:
        Path(io_dir, "code").write_bytes(code.encode("utf-8", "replace"))
        with (
            open(Path(io_dir, "code"), "rb") as stdin,
            open(Path(io_dir, "stdout"), "wb") as out,
            open(Path(io_dir, "stderr"), "wb") as err,
        ):
            command = [
                bwrap,
                *_bwrap_arguments(seccomp_read, info_write),
                "--",
                _view()[0][0],
                "-I",
                "-S",
                "-B",
                "-X",
                "utf8",
                "-c",
                _BOOT,
                *map(str, limits),
            ]
            try:
                process = subprocess.Popen(
                    command,
                    env={},
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    pass_fds=(seccomp_read, info_write),
                    start_new_session=True,
                )
            finally:
                os.close(seccomp_read)
                os.close(info_write)
            init = _sandbox_init(info_read)
            try:
                returncode = _wait(process, timeout_s)
            finally:
                if process.poll() is None:
                    _kill(process, init)
                if init is not None:
                    os.close(init)
        with open(Path(io_dir, "stdout"), "rb") as out, open(Path(io_dir, "stderr"), "rb") as err:
            stdout = out.read(4 * OUTPUT_LIMIT).decode("utf-8", "replace")
            err.seek(max(0, os.fstat(err.fileno()).st_size - 4000))
            stderr = err.read().decode("utf-8", "replace")
    return _Finished(returncode, stdout, stderr)


def _wait(process: subprocess.Popen, timeout_s: float) -> int | None:
    """``process``'s exit status, or None once ``timeout_s`` has passed. Waits on a pidfd:
    ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, most of a call's cost."""
    watcher = os.pidfd_open(process.pid)
    try:
        exited = select.select([watcher], [], [], timeout_s)[0]
    finally:
        os.close(watcher)
    return process.wait() if exited else None


def _sandbox_init(info_read: int) -> int | None:
    """A pidfd for the sandbox's PID-namespace init, read from bwrap's ``--info-fd`` (None when
    bwrap failed before starting it). bwrap reaps init only when it exits itself, and it is still
    running here, so the pid cannot yet belong to another process."""
    with os.fdopen(info_read, "rb") as info:
        text = info.read().decode("utf-8", "replace")
    try:
        return os.pidfd_open(int(json.loads(text)["child-pid"]))
    except (ValueError, KeyError, OSError):  # no info: bwrap failed before it started init
        return None


def _kill(process: subprocess.Popen, init: int | None) -> None:
    """Kill the sandbox's PID-namespace init: the kernel then kills every process in the
    namespace and reaps them before init is gone, and bwrap exits once init has."""
    if init is not None:
        signal.pidfd_send_signal(init, signal.SIGKILL)
    else:
        process.kill()
    process.wait()


_SIGNALS: dict[int, str] = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGKILL: "killed",
    signal.SIGSYS: "killed by the seccomp filter",
}


def _failure(finished: _Finished) -> str:
    assert finished.returncode is not None  # a run that timed out is reported before
    if finished.returncode > 128:  # bwrap reports a signal n as 128 + n
        return _SIGNALS.get(finished.returncode - 128, f"signal {finished.returncode - 128}")
    lines = [line.strip() for line in finished.stderr.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else f"exit status {finished.returncode}"
    return "memory limit exceeded" if line.startswith("MemoryError") else line


def run_python(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256, isolation: str | None = None) -> ToolResult:
    """Run ``code``: its printed stdout is the output (clipped); an exception, a timeout or a
    broken limit is an error result. ``isolation`` is "os" (the kernel-confined sandbox; raises
    ``SandboxUnavailable`` where it cannot be set up) or "unsafe-inprocess" (no confinement);
    None takes the enclosing ``isolation`` block's."""
    isolation = current_isolation(isolation)
    if isolation == "unsafe-inprocess":
        return _run_in_process(code, timeout_s)
    if isolation != "os":
        raise ValueError(f"run_python: isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    finished = _run_isolated(_bwrap()[0], code, timeout_s=timeout_s, memory_mb=memory_mb)
    if finished.returncode is None:
        return ToolResult(f"error: timed out after {timeout_s:g} s", False)
    if finished.returncode == 0:
        return ToolResult(balanced(clip(finished.stdout)), True)
    return ToolResult(balanced(clip(f"error: {_failure(finished)}")), False)


# ---------------------------------------------------------------------------------------------
# the opt-out


class _Timeout(BaseException):
    """Raised into an in-process snippet by SIGALRM (a BaseException, so ``except Exception``
    in the snippet does not swallow it)."""


class _HeadOnly(io.StringIO):
    """A stdout that keeps the first characters only: a snippet printing forever fills no memory."""

    def write(self, text: str) -> int:
        room = 4 * OUTPUT_LIMIT - self.tell()
        if room > 0:
            super().write(text[:room])
        return len(text)


def _run_in_process(code: str, timeout_s: float) -> ToolResult:
    """``code`` executed in this process, stdout captured, stopped by SIGALRM after ``timeout_s``."""
    if threading.current_thread() is not threading.main_thread():
        raise ValueError(
            "run_python: isolation='unsafe-inprocess' times snippets out with SIGALRM, "
            "so it runs on the main thread only"
        )

    running = [True]

    def alarm(signum, frame):
        if running[0]:  # an alarm after the snippet has ended must not raise into the caller
            raise _Timeout

    stdout, previous = _HeadOnly(), signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(code, "<py>", "exec"), {"__name__": "__main__"})
        finally:
            running[0] = False
    except _Timeout:
        return ToolResult(f"error: timed out after {timeout_s:g} s", False)
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            return ToolResult(balanced(clip(f"error: exit status {exit_.code}")), False)
    except Exception as error:  # the snippet's own failure is its result
        return ToolResult(balanced(clip(f"error: {traceback.format_exception_only(error)[-1]}")), False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return ToolResult(balanced(clip(stdout.getvalue())), True)


def describe_isolation(isolation: str = "os") -> dict:
    """What ``isolation`` gives a Python tool call, for the run record; for "os" this checks
    that the sandbox works here (one probe run per process) and raises ``SandboxUnavailable``
    if it does not."""
    if isolation == "unsafe-inprocess":
        return {
            "isolation": isolation,
            "confinement": "none: snippets run inside the calling process",
            "limits": {"wall_clock": "SIGALRM timeout"},
        }
    if isolation != "os":
        raise ValueError(f"describe_isolation: isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    bwrap, version = _bwrap()
    read_only, covered = _view()
    return {
        "isolation": "os",
        "launcher": f"{bwrap} ({version})",
        "host_uid": os.getuid(),
        "namespaces": ["user", "mount", "pid", "net", "ipc", "uts", "cgroup"],
        "capabilities": "none (uid 65534 in its user namespace, no_new_privs, no new user namespaces)",
        "filesystem": {
            "read_only": list(read_only),
            "covered": list(covered),
            "writable": f"/tmp ({SCRATCH_MB} MiB tmpfs)",
        },
        "seccomp": {
            "denied": sorted(_SYSCALLS),
            "processes": "threads only",
            "sockets": "AF_UNIX only",
            "architectures": "x86_64 only",
        },
        "rlimits": {
            "cpu_s": "ceil(timeout_s)",
            "address_space": "memory_mb",
            "file_size_mb": FILE_MB,
            "open_files": OPEN_FILES,
            "tasks": TASKS,
        },
        "timeout": "kills the PID namespace's init (the kernel kills the rest)",
    }
