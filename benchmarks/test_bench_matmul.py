"""ternary_matmul (int8 and popcount backends on 2bit weights, and base3 weights) against
F.linear fp32 and bf16, hot and cold.

One benchmark group per (N x K, M), so pytest-benchmark prints comparable rows; the conftest
prints the speedups at the end. Weights are quantized, packed and prepacked outside the timed
call; the timed call is the public op (activation quantization and Python call included).

Hot: the same weights every call (a ternary 11008x4096 matrix stays in L3). Cold (M = 1): each
call takes the next of enough weight copies to exceed 8x the last-level cache (where a plain read
reaches its DRAM floor on the dev machine; see agentforge.commands.bench), so its weights
stream from memory; extra_info then holds the effective GB/s and its share of the read bandwidth
measured in the same session (agentforge.ops.read_bandwidth), which the summary prints.
The interleaved, single-run comparison is ``agentforge bench`` (``--cold`` for the second).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from agentforge import ops

SHAPES = [(2560, 2560), (4096, 4096), (11008, 4096)]  # (N out, K in)
MS = [1, 16, 64]
IMPLS = ["F.linear fp32", "F.linear bf16", "ternary int8", "ternary popcount", "ternary base3"]
COLD_IMPLS = ["F.linear bf16", "ternary int8", "ternary base3"]

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=2, min_rounds=5)


@pytest.fixture(scope="module", params=SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def layer(request):
    N, K = request.param
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * 0.02
    codes, scale = ops.quantize_ternary(w)
    packed = ops.pack_ternary(codes)
    return {
        "N": N,
        "K": K,
        "w": w,
        "w_bf16": w.bfloat16(),
        "scale": scale,
        "2bit": ops.prepack_ternary(packed, K, "2bit"),
        "base3": ops.prepack_ternary(packed, K, "base3"),
    }


def _weights(layer, impl):
    """The weights an implementation reads, and how many bytes of them one call streams."""
    N, K = layer["N"], layer["K"]
    if impl == "F.linear fp32":
        return layer["w"], N * K * 4
    if impl == "F.linear bf16":
        return layer["w_bf16"], N * K * 2
    layout = "base3" if impl == "ternary base3" else "2bit"
    return layer[layout], N * math.ceil(K / ops.reference.BLOCK_K[layout]) * 32


def _call(impl, x, w, scale, monkeypatch):
    if impl == "F.linear fp32":
        return lambda: F.linear(x, w)
    if impl == "F.linear bf16":
        xb = x.bfloat16()
        return lambda: F.linear(xb, w)
    if not ops.extension_loaded():
        pytest.skip("native extension not built: ternary_matmul would time the reference")
    # read by the dispatcher on every call; base3 weights have their own kernel
    monkeypatch.setenv("AGENTFORGE_BACKEND", "auto" if impl == "ternary base3" else impl.split()[1])
    return lambda: ops.ternary_matmul(x, w, scale)


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("impl", IMPLS)
def test_matmul(benchmark, monkeypatch, layer, M, impl):
    N, K = layer["N"], layer["K"]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    w, _ = _weights(layer, impl)
    fn = _call(impl, x, w, layer["scale"], monkeypatch)
    benchmark.group = f"matmul {N}x{K} M={M}"
    benchmark.extra_info.update(
        impl=impl, baseline=impl.startswith("F.linear"), N=N, K=K, M=M, threads=torch.get_num_threads()
    )
    with torch.no_grad():
        benchmark(fn)


@pytest.fixture(scope="session")
def read_bandwidth():
    """The machine's read bandwidth (GB/s) on the benchmark's threads, measured once per session."""
    if not ops.extension_loaded():
        pytest.skip("native extension not built: no bandwidth kernel")
    return ops.read_bandwidth()


@pytest.mark.parametrize("impl", COLD_IMPLS)
def test_matmul_cold(benchmark, monkeypatch, layer, impl, read_bandwidth):
    N, K = layer["N"], layer["K"]
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(1))
    w, nbytes = _weights(layer, impl)
    copies = [w] + [w.clone() for _ in range(math.ceil(8 * ops.last_level_cache_bytes() / w.nbytes))]
    calls = itertools.cycle([_call(impl, x, c, layer["scale"], monkeypatch) for c in copies])
    benchmark.group = f"matmul cold {N}x{K} M=1"
    benchmark.extra_info.update(
        impl=impl,
        baseline=impl.startswith("F.linear"),
        N=N,
        K=K,
        M=1,
        threads=torch.get_num_threads(),
        weight_bytes=nbytes,
        read_bandwidth_gbs=read_bandwidth,
    )
    with torch.no_grad():
        benchmark(lambda: next(calls)())
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        gbytes_per_s=nbytes / seconds / 1e9, percent_of_read_bandwidth=100 * nbytes / seconds / 1e9 / read_bandwidth
    )
