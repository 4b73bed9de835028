"""One Muon step over a Cognate model's Muon-owned matrices: torch.optim.Muon against ours.

``torch.optim.Muon`` orthogonalises every update in bfloat16; ``agentforge.optim.Muon`` does it in
fp32 unless the device multiplies bf16 natively (CUDA, AVX512-BF16 or AMX CPUs), where it steps
exactly as torch's. Both of its dtypes are measured, so the ratio shows what the choice is worth on
the machine that runs this. The parameters are the hidden
matrices (``split_parameters``) of a freshly initialised ``tiny`` or ``small`` Cognate model, each
with a random gradient; a step is what the Cognate phase's optimizer does to them once per batch.

Run: ``python -m pytest benchmarks/test_bench_muon.py -q --benchmark-only``.
"""

import pytest
import torch

from agentforge.models import CognateConfig, CognateForCausalLM
from agentforge.optim import Muon
from agentforge.optim.grouping import split_parameters
from agentforge.optim.muon import default_ns_dtype

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=1, min_rounds=3)


def _muon_matrices(preset: str) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig.from_preset(preset))
    matrices = [p for _, p in split_parameters(model)[0]]
    for p in matrices:
        p.grad = torch.randn_like(p)
    return matrices


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("impl", ["torch.optim.Muon", "agentforge Muon fp32", "agentforge Muon bf16"])
def test_muon_step(benchmark, preset, impl):
    matrices = _muon_matrices(preset)
    if impl == "torch.optim.Muon":
        optimizer = torch.optim.Muon(matrices, lr=0.02)
    else:
        optimizer = Muon(matrices, lr=0.02, ns_dtype=torch.float32 if impl.endswith("fp32") else torch.bfloat16)
    before = matrices[0].detach().clone()
    benchmark.group = (
        f"Muon step, {preset} Cognate ({len(matrices)} matrices, {sum(p.numel() for p in matrices):,} weights)"
    )
    benchmark.extra_info.update(
        impl=impl,
        baseline=impl == "torch.optim.Muon",
        threads=torch.get_num_threads(),
        default_ns_dtype=str(default_ns_dtype(torch.device("cpu"))),
    )
    benchmark(optimizer.step)
    assert not torch.equal(before, matrices[0])
