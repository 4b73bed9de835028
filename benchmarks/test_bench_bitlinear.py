"""A BitLinear training step (forward + backward, STE) against nn.Linear.

Input ``x`` is ``[8, 512, in]`` (8 sequences of 512 tokens) with ``requires_grad`` as inside a
network, and the step is ``y = layer(x); y.backward(g)`` with fresh gradients each time. Design
target: BitLinear at most 1.3x the time of nn.Linear (a "speedup" of at least 0.77x).
"""

import pytest
import torch

import agentforge  # noqa: F401  (registers the ops)

SHAPES = [(2560, 2560), (4096, 4096), (4096, 11008)]  # (in_features, out_features): 2560², 4096², 11008x4096
BATCH, TOKENS = 8, 512

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=1, min_rounds=3)


def _bitlinear_cls():
    try:
        from agentforge.nn import BitLinear
    except ImportError as exc:
        pytest.skip(f"agentforge.nn.BitLinear not available: {exc}")
    return BitLinear


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for i, o in SHAPES])
@pytest.mark.parametrize("impl", ["nn.Linear", "BitLinear"])
def test_train_step(benchmark, shape, impl):
    in_f, out_f = shape
    torch.manual_seed(0)
    cls = torch.nn.Linear if impl == "nn.Linear" else _bitlinear_cls()
    layer = cls(in_f, out_f, bias=True)
    layer.train()
    x = torch.randn(BATCH, TOKENS, in_f, requires_grad=True)
    g = torch.randn(BATCH, TOKENS, out_f)

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(g)

    benchmark.group = f"train step {out_f}x{in_f}, x[{BATCH},{TOKENS},{in_f}]"
    benchmark.extra_info.update(
        impl=impl,
        baseline=impl == "nn.Linear",
        in_features=in_f,
        out_features=out_f,
        tokens=BATCH * TOKENS,
        threads=torch.get_num_threads(),
    )
    benchmark(step)
    assert layer.weight.grad is not None and x.grad is not None
