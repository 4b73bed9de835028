"""ternary_matmul (int8 and popcount backends) against F.linear fp32 and bf16.

One benchmark group per (N x K, M), so pytest-benchmark prints comparable rows; the conftest
prints the speedups at the end. Weights are quantized, packed and prepacked outside the timed
call; the timed call is the public op (activation quantization and Python call included).
The interleaved, single-run comparison is ``agentforge bench``.
"""
import pytest
import torch
import torch.nn.functional as F

from agentforge import ops

SHAPES = [(2560, 2560), (4096, 4096), (11008, 4096)]  # (N out, K in)
MS = [1, 16, 64]
IMPLS = ["F.linear fp32", "F.linear bf16", "ternary int8", "ternary popcount"]

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=2, min_rounds=5)


@pytest.fixture(scope="module", params=SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def layer(request):
    N, K = request.param
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * 0.02
    codes, scale = ops.quantize_ternary(w)
    return {"N": N, "K": K, "w": w, "w_bf16": w.bfloat16(), "scale": scale,
            "prepacked": ops.prepack_ternary(ops.pack_ternary(codes))}


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("impl", IMPLS)
def test_matmul(benchmark, monkeypatch, layer, M, impl):
    N, K = layer["N"], layer["K"]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    if impl == "F.linear fp32":
        w = layer["w"]
        fn = lambda: F.linear(x, w)  # noqa: E731
    elif impl == "F.linear bf16":
        xb, w = x.bfloat16(), layer["w_bf16"]
        fn = lambda: F.linear(xb, w)  # noqa: E731
    else:
        if not ops.extension_loaded():
            pytest.skip("native extension not built: ternary_matmul would time the reference")
        monkeypatch.setenv("AGENTFORGE_BACKEND", impl.split()[1])  # read by the dispatcher on every call
        wp, scale = layer["prepacked"], layer["scale"]
        fn = lambda: ops.ternary_matmul(x, wp, scale)  # noqa: E731
    benchmark.group = f"matmul {N}x{K} M={M}"
    benchmark.extra_info.update(impl=impl, baseline=impl.startswith("F.linear"), N=N, K=K, M=M,
                                threads=torch.get_num_threads())
    with torch.no_grad():
        benchmark(fn)
