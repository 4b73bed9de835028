"""``agentforge bench``: the ternary matmul against torch ``F.linear``, as ratios measured in one run.

What is timed, for every (N, K) weight shape and every M (tokens per call):

* ``F.linear(x, w)`` in fp32 and in bf16 (x and w both in that dtype; the baselines);
* ``agentforge.ops.ternary_matmul(x, w_prepacked, w_scale)`` with fp32 ``x``: weights in the 2bit
  layout once per CPU backend (``int8`` and ``popcount``, forced through ``AGENTFORGE_BACKEND``,
  which the dispatcher reads on every call), and weights in the base3 layout (``base3``: 1.6
  bits, 5 weights per byte, its own kernel). Weights are quantized, packed and prepacked before
  timing; the timed call is the public Python op, so activation quantization, the epilogue and
  the Python/dispatcher overhead are included.

Method: every candidate is warmed up, then the candidates of one row are timed in turns
(rotating order) for ``--reps`` rounds; each sample is the mean of enough back-to-back calls to
last ``--min-sample-ms``; the reported time is the median sample. Ratios compare medians taken in
the same run, so slow drifts (other processes, clock changes) hit all candidates alike.

Throughput ``G weights/s = M * N * K / t / 1e9``: ternary weight-activation products per second;
at M = 1 it is the number of weights streamed per second. By default weights stay in place
between calls ("hot"); ``--cold`` rotates through enough copies of every weight matrix to exceed
8x the last-level cache (COLD_LLC_MULTIPLE), so each call streams its weights from memory. A cold run also
measures the machine's read bandwidth on the same threads, before and after the timings, with a
STREAM-like read kernel (``agentforge.ops.read_bandwidth``), and gives each candidate's effective
bandwidth (the bytes of its weights / its time) as a percentage of the higher measurement.

The per-core figure runs ternary_matmul at M = 1 on one thread (``torch.set_num_threads(1)``)
on a K = 2048 shape whose prepacked weights fill at most half of L2 (N2 rows) and on one with a
quarter of its rows (N1), calling the two back to back in alternating order for thousands of
pairs. It reports the per-call rate ``N2 * K / t2`` and the marginal rate
``(N2 - N1) * K / median(t2 - t1)`` over the pairs, which cancels the fixed per-call cost
(Python, dispatcher, activation quantization): the kernel's own cache-resident throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

HELP = "time ternary_matmul (int8, popcount and base3 kernels) against F.linear fp32/bf16"

DEFAULT_SHAPES = "2560x2560,4096x4096,11008x4096"
DEFAULT_MS = "1,16,64"
BACKENDS = ("int8", "popcount", "base3")  # base3: the base3 layout, whose kernel the dispatcher runs
BASELINES = ("fp32", "bf16")
BACKEND_ENV = "AGENTFORGE_BACKEND"
# Cold weights and the bandwidth reference both cycle through this many times the last-level
# cache. On the dev machine a plain read of a buffer reached 65 GB/s at 16 MiB, 25 at 64 MiB
# (2x L3: still partly cached), 22 at 128 MiB and its 21 GB/s floor from 256 MiB (8x L3) on.
COLD_LLC_MULTIPLE = 8
COLD_MEMORY_SHARE = (
    16  # a cold weight set gets at most 1/16 of the available memory (the run held about 2x its four sets)
)


# --- arguments -------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,11008x4096"`` -> ``[(4096, 4096), (11008, 4096)]`` as (N out, K in)."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.lower().replace("×", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected NxK, e.g. 4096x4096")
        shapes.append((int(parts[0]), int(parts[1])))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_backends(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"backends must be among {', '.join(BACKENDS)}, got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=parse_shapes(DEFAULT_SHAPES),
        metavar="NxK,...",
        help=f"weight shapes, N outputs x K inputs (default {DEFAULT_SHAPES})",
    )
    p.add_argument(
        "--m",
        type=parse_ints,
        default=parse_ints(DEFAULT_MS),
        metavar="M,...",
        help=f"tokens per call (rows of x) (default {DEFAULT_MS})",
    )
    p.add_argument("--reps", type=int, default=7, help="timed rounds per candidate; the median is reported (default 7)")
    p.add_argument(
        "--min-sample-ms",
        type=float,
        default=20.0,
        help="each sample averages back-to-back calls lasting at least this long (default 20)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate first (default 2)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads for the main table (default: torch's default)"
    )
    p.add_argument(
        "--backends",
        type=parse_backends,
        default=list(BACKENDS),
        metavar="B,...",
        help="ternary kernels to time (default int8,popcount,base3)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="rotate through weight copies larger than 8x the last-level cache (weights streamed from "
        "memory), and measure the read bandwidth they are compared with",
    )
    p.add_argument(
        "--no-per-core",
        dest="per_core",
        action="store_false",
        help="skip the single-thread cache-resident kernel throughput",
    )
    p.add_argument(
        "--per-core-seconds",
        type=float,
        default=1.5,
        help="timing budget per backend for the per-core kernel figure (default 1.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights and inputs")
    p.add_argument("--json", metavar="FILE", default=None, help="also write all measurements as JSON to FILE")


# --- machine ---------------------------------------------------------------------------------


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def machine_info() -> dict:
    import torch

    import agentforge
    from agentforge import ops

    info = ops.cpu_info()
    cpu = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cpu_family_model": f"{family}/{model}" if family and model else None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "l2_bytes": ops.cache_bytes(2),
        "l3_bytes": ops.cache_bytes(3),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "agentforge": agentforge.__version__,
        "extension_loaded": ops.extension_loaded(),
        "isa": info.get("isa"),
        "detected_isa": info.get("detected_isa"),
        "python": platform.python_version(),
        "loadavg_at_start": [round(v, 2) for v in load] if load else None,
    }


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def format_machine(m: dict) -> str:
    fam = f" (family/model {m['cpu_family_model']})" if m["cpu_family_model"] else ""
    lines = [
        f"machine : {m['cpu']}{fam}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
        f"L2 {_fmt_bytes(m['l2_bytes'])}/core, L3 {_fmt_bytes(m['l3_bytes'])}",
        f"software: torch {m['torch']} ({m['torch_threads']} threads), agentforge {m['agentforge']}, "
        f"python {m['python']}",
        f"kernels : isa {m['isa']} (detected {m['detected_isa']}), native extension "
        f"{'loaded' if m['extension_loaded'] else 'NOT loaded: timing the pure-PyTorch reference'}",
    ]
    if m["loadavg_at_start"]:
        lines.append(
            f"load    : {m['loadavg_at_start'][0]} (1-min load average at start; "
            f"other processes inflate and scatter timings)"
        )
    return "\n".join(lines)


# --- timing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """Force the backend of ``ternary_matmul`` inside the block (None: the dispatcher chooses).

    The C++ dispatcher reads ``AGENTFORGE_BACKEND`` on every call, and ``os.environ`` writes
    through to the C environment, so this takes effect at once and is undone on exit."""
    old = os.environ.get(BACKEND_ENV)
    if name is None:
        os.environ.pop(BACKEND_ENV, None)
    else:
        os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old


class Candidate:
    """One thing to time: ``fn()`` runs a single call; ``backend`` is forced around each sample;
    ``nbytes`` is what one call reads of its weights."""

    def __init__(self, name: str, fn: Callable[[], object], backend: str | None = None, nbytes: int = 0):
        self.name, self.fn, self.backend, self.nbytes = name, fn, backend, nbytes
        self.inner = 1
        self.samples: list[float] = []

    def run(self, n: int) -> float:
        fn = self.fn
        with forced_backend(self.backend):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def measure(cands: list[Candidate], reps: int, min_sample_s: float, warmup: int) -> None:
    """Warm up and calibrate each candidate, then time them in turns; fills ``samples``."""
    for c in cands:
        c.run(max(1, warmup))
        t = c.run(1)
        c.inner = max(1, min(100_000, math.ceil(min_sample_s / max(t, 1e-7))))
        c.samples = []
    for r in range(reps):
        k = r % len(cands)
        for c in cands[k:] + cands[:k]:  # rotate so no candidate always runs right after the same one
            c.samples.append(c.run(c.inner))


def _cycling(make: Callable[..., Callable[[], object]], copies: list) -> Callable[[], object]:
    """``make(w)`` for each of ``copies``, called in turn (``make`` may bind more by default arguments)."""
    if len(copies) == 1:
        return make(copies[0])
    fns = itertools.cycle([make(w) for w in copies])
    return lambda: next(fns)()


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages; None if neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def cold_set_bytes(llc: int | None) -> tuple[int, bool]:
    """Bytes of each rotated weight set in a cold run, and whether memory capped it: 8x the
    last-level cache, but at most 1/COLD_MEMORY_SHARE of the available memory, since four sets
    (fp32, bf16, 2-bit, base-3) live at once. A guest can report its host's whole L3 (480 MiB was
    seen), and 8x that per set does not fit a small machine's memory."""
    wanted = COLD_LLC_MULTIPLE * (llc or 32 << 20)
    available = _available_memory_bytes()
    if available is None or wanted <= available // COLD_MEMORY_SHARE:
        return wanted, False
    return available // COLD_MEMORY_SHARE, True


def _copies_needed(nbytes: int, cold_bytes: int | None) -> int:
    if not cold_bytes:
        return 1
    return max(1, math.ceil(cold_bytes / max(nbytes, 1)))


# --- the benchmarks --------------------------------------------------------------------------


def _auto_pick(ops, x, wp, scale) -> str | None:
    """The backend the dispatcher measures and picks for this call's shape class."""
    if not ops.extension_loaded():
        return None
    ops.set_isa(ops.cpu_info()["isa"])  # same ISA; clears the measured table
    with forced_backend(None):
        ops.ternary_matmul(x, wp, scale)
    table = ops.cpu_info()["dispatch"]
    return table[0]["backend"] if len(table) == 1 else None


def _payload_bytes(wp) -> int:
    """Bytes of weights a kernel streams per call: the prepacked payload, header excluded."""
    from agentforge import ops

    info = ops.prepacked_info(wp)
    return info["N"] * -(-info["K"] // {"2bit": 128, "base3": 160}[info["layout"]]) * 32


def bench_matmul(shapes, ms, backends, reps, min_sample_s, warmup, cold_bytes, seed, log) -> list[dict]:
    """``cold_bytes``: the bytes each rotated weight set reaches (None: hot, one copy)."""
    import torch
    import torch.nn.functional as F

    from agentforge import ops

    rows = []
    gen = torch.Generator().manual_seed(seed)
    copies = lambda t: [t] + [t.clone() for _ in range(_copies_needed(t.nbytes, cold_bytes) - 1)]
    for N, K in shapes:
        w = torch.randn(N, K, generator=gen) * 0.02
        codes, scale = ops.quantize_ternary(w)
        packed = ops.pack_ternary(codes)
        wp = {layout: ops.prepack_ternary(packed, K, layout) for layout in ("2bit", "base3")}
        weights = {
            "fp32": copies(w),
            "bf16": copies(w.bfloat16()),
            "2bit": copies(wp["2bit"]),
            "base3": copies(wp["base3"]) if "base3" in backends else [],
        }
        nbytes = {
            "fp32": N * K * 4,
            "bf16": N * K * 2,
            "2bit": _payload_bytes(wp["2bit"]),
            "base3": _payload_bytes(wp["base3"]),
        }
        for M in ms:
            log(f"  {N}x{K} M={M} ...")
            x = torch.randn(M, K, generator=gen)
            xb = x.bfloat16()
            cands = [
                Candidate(
                    "fp32", _cycling(lambda wt, x=x: lambda: F.linear(x, wt), weights["fp32"]), nbytes=nbytes["fp32"]
                ),
                Candidate(
                    "bf16", _cycling(lambda wt, xb=xb: lambda: F.linear(xb, wt), weights["bf16"]), nbytes=nbytes["bf16"]
                ),
            ]
            for b in backends:
                layout = "base3" if b == "base3" else "2bit"
                matmul = _cycling(
                    lambda wt, x=x, scale=scale: lambda: ops.ternary_matmul(x, wt, scale), weights[layout]
                )
                cands.append(Candidate(b, matmul, backend=None if b == "base3" else b, nbytes=nbytes[layout]))
            # Sanity: every kernel computes the same exact integer products, so they must agree.
            outs = {}
            for b in backends:
                with forced_backend(None if b == "base3" else b):
                    outs[b] = ops.ternary_matmul(x, wp["base3" if b == "base3" else "2bit"], scale)
            agree = all(torch.equal(outs[backends[0]], o) for o in outs.values())
            measure(cands, reps, min_sample_s, warmup)
            t = {c.name: c.median for c in cands}
            row = {
                "N": N,
                "K": K,
                "M": M,
                "ms": {k: v * 1e3 for k, v in t.items()},
                "samples_ms": {c.name: [s * 1e3 for s in c.samples] for c in cands},
                "inner_calls": {c.name: c.inner for c in cands},
                "speedup": {b: {base: t[base] / t[b] for base in BASELINES} for b in backends},
                "gweights_per_s": {k: M * N * K / v / 1e9 for k, v in t.items()},
                "weight_bytes": {c.name: c.nbytes for c in cands},
                "gbytes_per_s": {c.name: c.nbytes / t[c.name] / 1e9 for c in cands},
                "backends_agree": agree,
                "auto_pick": _auto_pick(ops, x, wp["2bit"], scale),
            }
            if not agree:
                log(f"  WARNING: kernels disagree at {N}x{K} M={M}")
            rows.append(row)
        del weights, w, wp
    return rows


def paired_times(
    f1: Callable[[], object], f2: Callable[[], object], seconds: float, warmup_s: float, chunks: int = 5
) -> tuple[list[int], list[int]]:
    """Time ``f1`` and ``f2`` back to back, in alternating order, for about ``seconds``; returns
    the per-call times (ns) of each. Adjacent calls see the same machine state, so the per-pair
    difference ``t2 - t1`` is robust to slow drifts and to other processes."""
    pc = time.perf_counter_ns
    deadline = pc() + int(warmup_s * 1e9)
    while pc() < deadline:
        f1()
        f2()
    a: list[int] = []
    b: list[int] = []
    deadline = pc() + int(seconds * 1e9)
    i = 0
    while pc() < deadline or i < 2 * chunks:
        if i & 1:
            t0 = pc(); f1(); t1 = pc(); f2(); t2 = pc()  # noqa: E702  # fmt: skip
            a.append(t1 - t0)
            b.append(t2 - t1)
        else:
            t0 = pc(); f2(); t1 = pc(); f1(); t2 = pc()  # noqa: E702  # fmt: skip
            b.append(t1 - t0)
            a.append(t2 - t1)
        i += 1
    return a, b


def bench_per_core(backends, seconds, l2, seed, log) -> dict:
    import torch

    from agentforge import ops

    K = 2048
    budget = (l2 or 512 << 10) // 2
    N2 = max(256, budget // (K // 4) // 64 * 64)
    N1 = N2 // 4
    gen = torch.Generator().manual_seed(seed + 1)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"K": K, "N1": N1, "N2": N2, "l2_bytes": l2, "threads": 1, "backends": {}}
    try:
        x = torch.randn(1, K, generator=gen)
        fns = {}
        for N in (N1, N2):
            codes, scale = ops.quantize_ternary(torch.randn(N, K, generator=gen))
            for layout in ("2bit", "base3"):
                wp = ops.prepack_ternary(ops.pack_ternary(codes), K, layout)
                out[f"{layout}_bytes"] = _payload_bytes(wp)
                fns[layout, N] = lambda wp=wp, s=scale: ops.ternary_matmul(x, wp, s)
        log(f"  per-core: M=1, K={K}, N={N1} and {N2}, 1 thread ...")
        for b in backends:
            layout = "base3" if b == "base3" else "2bit"
            with forced_backend(None if b == "base3" else b):
                a, c = paired_times(fns[layout, N1], fns[layout, N2], seconds, warmup_s=seconds / 4)
            diffs = [y - z for y, z in zip(c, a)]
            chunks = [statistics.median(diffs[i::5]) for i in range(5)]  # interleaved fifths: a spread
            d = statistics.median(diffs)
            t2 = statistics.median(c)
            out["backends"][b] = {
                "pairs": len(diffs),
                "t_n1_us": statistics.median(a) / 1e3,
                "t_n2_us": t2 / 1e3,
                "per_call_gweights_per_s": N2 * K / t2,
                "marginal_gweights_per_s": (N2 - N1) * K / d if d > 0 else None,
                "marginal_fifths_gweights_per_s": [(N2 - N1) * K / v if v > 0 else None for v in chunks],
            }
    finally:
        torch.set_num_threads(prev_threads)
    return out


# --- output ----------------------------------------------------------------------------------


def _ratio(v: float) -> str:
    return f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def format_table(rows: list[dict], backends: list[str], bandwidth: float | None = None) -> str:
    """The timing table; with ``bandwidth`` (GB/s, cold runs) each candidate's effective GB/s as a
    percentage of it."""
    head = ["N x K", "M", "fp32 ms", "bf16 ms"] + [f"{b} ms" for b in backends]
    for b in backends:
        head += [f"{b} vs fp32", f"{b} vs bf16"]
    head += [f"{b} Gw/s" for b in backends]
    if bandwidth:
        head += [f"{c} GB/s (% BW)" for c in (*BASELINES, *backends)]
    head.append("auto picks")
    body = []
    for r in rows:
        line = [f"{r['N']}x{r['K']}", str(r["M"]), _ms(r["ms"]["fp32"]), _ms(r["ms"]["bf16"])]
        line += [_ms(r["ms"][b]) for b in backends]
        for b in backends:
            line += [_ratio(r["speedup"][b]["fp32"]), _ratio(r["speedup"][b]["bf16"])]
        line += [f"{r['gweights_per_s'][b]:.1f}" for b in backends]
        if bandwidth:
            line += [
                f"{r['gbytes_per_s'][c]:.1f} ({100 * r['gbytes_per_s'][c] / bandwidth:.0f}%)"
                for c in (*BASELINES, *backends)
            ]
        line.append((r["auto_pick"] or "?") + ("" if r["backends_agree"] else " (MISMATCH)"))
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(head), sep] + [fmt(b) for b in body])


def format_per_core(pc: dict) -> str:
    lines = [
        f"kernel, cache-resident, one core (torch.set_num_threads(1)): M=1, K={pc['K']}, N={pc['N1']} and "
        f"{pc['N2']} ({pc['2bit_bytes'] >> 10} KiB prepacked 2bit, {pc['base3_bytes'] >> 10} KiB base3, "
        f"L2 {_fmt_bytes(pc['l2_bytes'])}/core)"
    ]
    for b, v in pc["backends"].items():
        marg = v["marginal_gweights_per_s"]
        marg_s = f"{marg:.1f}" if marg is not None else "n/a"
        lines.append(
            f"  {b:>8}: {marg_s} G ternary weights/s per core, marginal "
            f"((N2-N1)*K / median paired time difference, fixed per-call cost removed); "
            f"{v['per_call_gweights_per_s']:.1f} per whole call ({v['t_n2_us']:.1f} us incl. Python)"
        )
    return "\n".join(lines)


LEGEND = """\
fp32/bf16 ms: torch F.linear(x, w) with x, w in that dtype. int8/popcount ms: agentforge.ops.ternary_matmul on
fp32 x with 2bit weights prepacked beforehand, backend forced by AGENTFORGE_BACKEND; base3 ms: the same op on
base3 weights (1.6 bits); all include activation quantization and the Python call. Times are medians of {reps}
interleaved samples. "vs": speedup of the ternary op over F.linear (t_F.linear / t_ternary, > 1 = faster).
Gw/s: M*N*K / t / 1e9 weight-activation products per second (at M=1: weights streamed per second).
auto picks: the 2bit backend the dispatcher measures and chooses when none is forced. Weights: {mode}."""

BANDWIDTH_LEGEND = """\
GB/s (% BW): bytes of weights read per call (fp32 4 N K, bf16 2 N K, 2bit N ceil(K/128) 32, base3
N ceil(K/160) 32) / time, and that as a percentage of the machine's read bandwidth, {bw:.1f} GB/s on {threads}
thread(s) (STREAM-like read of {mib} MiB, best of 7; {before:.1f} before the timings, {after:.1f} after; the
higher is used)."""


def run(args: argparse.Namespace) -> int:
    import torch

    from agentforge import ops

    if args.reps < 1:
        print("agentforge bench: --reps must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("agentforge bench: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    machine = machine_info()
    print(format_machine(machine), flush=True)
    if not ops.extension_loaded():
        log("agentforge bench: the native extension is not loaded; the ternary numbers are the slow reference")
    mode = "hot (the same weights every call; small ternary weights stay in cache)"
    t0 = time.perf_counter()
    bandwidth, cold_bytes = None, None
    if args.cold:
        cold_bytes, capped = cold_set_bytes(machine["l3_bytes"])
        l3 = _fmt_bytes(machine["l3_bytes"])
        mode = f"cold (each set of weight copies rotates through {_fmt_bytes(cold_bytes)}; L3 {l3})"
        if capped:
            log(
                f"cold: each weight set rotates through {_fmt_bytes(cold_bytes)}, "
                f"{cold_bytes / max(machine['l3_bytes'] or 1, 1):.1f}x the L3, capped at 1/{COLD_MEMORY_SHARE} "
                "of the available memory; below 2x the L3 some weights may stay cached"
            )
    if cold_bytes is not None and ops.extension_loaded():
        log("measuring the read bandwidth ...")
        nbytes = cold_bytes
        bandwidth = {"before": ops.read_bandwidth(nbytes), "threads": torch.get_num_threads(), "mib": nbytes >> 20}
    log(f"timing {len(args.shapes)} shapes x {len(args.m)} M values, {args.reps} reps ...")
    rows = bench_matmul(
        args.shapes,
        args.m,
        args.backends,
        args.reps,
        args.min_sample_ms / 1e3,
        args.warmup,
        cold_bytes,
        args.seed,
        log,
    )
    if bandwidth:
        bandwidth["after"] = ops.read_bandwidth(nbytes)
        bandwidth["gbs"] = max(bandwidth["before"], bandwidth["after"])
    per_core = None
    if args.per_core and ops.extension_loaded():
        per_core = bench_per_core(args.backends, args.per_core_seconds, machine["l2_bytes"], args.seed, log)
    elapsed = time.perf_counter() - t0

    print()
    print(f"ternary_matmul vs F.linear, {torch.get_num_threads()} threads, weights {'cold' if args.cold else 'hot'}:")
    print(format_table(rows, args.backends, bandwidth["gbs"] if bandwidth else None))
    print(LEGEND.format(reps=args.reps, mode=mode))
    if bandwidth:
        print(BANDWIDTH_LEGEND.format(bw=bandwidth["gbs"], **bandwidth))
    if per_core:
        print()
        print(format_per_core(per_core))
    dispatch = ops.cpu_info().get("dispatch", [])
    print(f"\nbench took {elapsed:.0f} s")

    if args.json:
        doc = {
            "machine": machine,
            "threads": torch.get_num_threads(),
            "cold": args.cold,
            "reps": args.reps,
            "min_sample_ms": args.min_sample_ms,
            "elapsed_s": elapsed,
            "matmul": rows,
            "per_core": per_core,
            "read_bandwidth": bandwidth,
            "dispatch_last_row": dispatch,
            "argv": sys.argv[1:],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {args.json}")
    return 0
