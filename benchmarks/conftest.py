"""Shared settings for the pytest-benchmark suites, and a speedup summary printed at the end.

Run with ``python -m pytest benchmarks -q --benchmark-only`` (or ``make bench``). Each test sets
``benchmark.group`` (one group per shape) and ``benchmark.extra_info["impl"]``; tests whose
``extra_info["baseline"]`` is true are the references the others are compared with.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median(bench):
    stats = getattr(bench, "stats", None)
    return getattr(stats, "median", None) if stats is not None else None


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)  # pytest-benchmark's state
    benches = [b for b in getattr(session, "benchmarks", []) or [] if _median(b)]
    if not benches:
        return
    groups = {}
    for b in benches:
        groups.setdefault(b.group or "", []).append(b)
    tr = terminalreporter
    tr.section("speedup summary (median time of baseline / median time; > 1 = faster)")
    for group, items in groups.items():
        bases = [b for b in items if b.extra_info.get("baseline")]
        others = [b for b in items if not b.extra_info.get("baseline")]
        if not bases or not others:
            continue
        tr.write_line(group)
        for o in others:
            name = o.extra_info.get("impl", o.name)
            ratios = ", ".join(f"{_median(b) / _median(o):6.2f}x vs {b.extra_info.get('impl', b.name)}" for b in bases)
            tr.write_line(f"  {name:<22} {_median(o) * 1e3:10.3f} ms   {ratios}{_bandwidth(o)}")
        for b in bases:
            if _bandwidth(b):
                tr.write_line(f"  {b.extra_info.get('impl', b.name):<22} {_median(b) * 1e3:10.3f} ms{_bandwidth(b)}")


def _bandwidth(bench) -> str:
    """ ", 16.2 GB/s = 84 % of 19.3 GB/s read bandwidth" for cold benchmarks, else ""."""
    info = bench.extra_info
    if "weight_bytes" not in info:
        return ""
    gbs = info["weight_bytes"] / _median(bench) / 1e9
    bw = info["read_bandwidth_gbs"]
    return f", {gbs:.1f} GB/s = {100 * gbs / bw:.0f} % of {bw:.1f} GB/s read bandwidth"
