"""Worst-case magnitudes for the kernels' narrow accumulators.

The AVX2 kernels sum vpmaddubsw results in int16 lanes for several blocks before widening;
all-maximal codes and activations over many blocks is the input that would overflow them.
The largest 2bit field a payload can hold is 3 (w = 2, never written by prepack but read the
same way by every kernel), so the bounds are checked with it too.
"""

import pytest
import torch

from agentforge import ops
from agentforge.ops import reference

SUPPORTED_ISAS = {"scalar": ["scalar"], "avx2": ["scalar", "avx2"], "avx512": ["scalar", "avx2", "avx512"]}


@pytest.fixture(params=SUPPORTED_ISAS.get(ops.cpu_info()["detected_isa"], []))
def isa(request):
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa(ops.cpu_info()["detected_isa"])


KERNELS = [("2bit", "int8"), ("2bit", "popcount"), ("base3", "auto")]


@pytest.mark.skipif(not ops.extension_loaded(), reason="native extension not built")
@pytest.mark.parametrize("layout, backend", KERNELS, ids=[f"{a}-{b}" for a, b in KERNELS])
@pytest.mark.parametrize("w_sign,x_sign", [(1, 1), (1, -1), (-1, 1), (-1, -1)])
@pytest.mark.parametrize("M", [1, 2, 5, 64])
@pytest.mark.parametrize("bits", [8, 2])
def test_extreme_inputs_do_not_overflow(isa, layout, backend, w_sign, x_sign, M, bits, monkeypatch):
    monkeypatch.setenv("AGENTFORGE_BACKEND", backend)
    K, N = 160 * 40 + 3, 9  # 40 full blocks in either layout: past every int16 widening window
    w = torch.full((N, K), float(w_sign))
    x = torch.full((M, K), float(x_sign))
    codes, scale = ops.quantize_ternary(w)
    w_prepacked = ops.prepack_ternary(ops.pack_ternary(codes), K, layout)
    y = ops.ternary_matmul(x, w_prepacked, scale, act_bits=bits)
    assert torch.equal(y, reference.ternary_matmul(x, w_prepacked, scale, act_bits=bits))
    assert (y.sign() == w_sign * x_sign).all()


@pytest.mark.skipif(not ops.extension_loaded(), reason="native extension not built")
@pytest.mark.parametrize("backend", ["int8", "popcount"])
@pytest.mark.parametrize("x_sign", [1, -1])
@pytest.mark.parametrize("M", [1, 2, 5, 64])
def test_code_3_everywhere_does_not_overflow(isa, backend, x_sign, M, monkeypatch):
    # Every 2bit field 3 (w = 2) against all-maximal activations: twice the largest sum a
    # prepacked tensor can legitimately hold, read alike by every kernel.
    monkeypatch.setenv("AGENTFORGE_BACKEND", backend)
    K, N = 128 * 40, 9
    w_prepacked = ops.prepack_ternary(ops.pack_ternary(torch.zeros(N, K, dtype=torch.int8)), K)
    w_prepacked[:-1] = 0xFF  # every payload byte; the last row is the header
    x = torch.full((M, K), float(x_sign))
    y = ops.ternary_matmul(x, w_prepacked, torch.ones(1))
    assert torch.equal(y, torch.full((M, N), 2.0 * K * x_sign))
