"""agentforge.merge: each method on hand-computed cases, identities, DFS scale folding against a
forward-hook reference, Cognate and Llama models, layer stacks found on the model, FLOPs per
token counted from the structure, bad input."""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.merge import METHODS, merge, merged_model, merged_tensors
from agentforge.merge import methods as m
from agentforge.merge.compute import flops_per_token, stack_passes
from agentforge.merge.layers import layer_stacks
from agentforge.models import CognateConfig, CognateForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


def sd(**tensors):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def tiny_llama(seed, layers=3):
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=48,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    ).eval()


def tiny_cognate(seed):
    torch.manual_seed(seed)
    return CognateForCausalLM(
        CognateConfig.from_preset("micro", vocab_size=48, num_prelude_layers=2, memory_layers=[1])
    ).eval()


TOKENS = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(5))


# --- SLERP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, expected", [(0.0, [1.0, 0.0]), (1.0, [0.0, 1.0]), (0.5, [math.sqrt(0.5)] * 2)])
def test_slerp_on_orthogonal_unit_vectors(t, expected):
    out = merge("slerp", [sd(w=[1.0, 0.0]), sd(w=[0.0, 1.0])], t=t)["w"]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_slerp_keeps_the_norm_between_equal_norm_vectors():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 3.0])
    assert m.slerp(a, b, 0.3).norm() == pytest.approx(3.0)
    assert torch.lerp(a, b, 0.3).norm() < 3.0  # what linear interpolation would give


@pytest.mark.parametrize("b", [[2.0, 0.0], [-4.0, 0.0], [0.0, 0.0]], ids=["parallel", "antiparallel", "zero"])
def test_slerp_falls_back_to_lerp(b):
    a = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(m.slerp(a, torch.tensor(b), 0.25), torch.lerp(a, torch.tensor(b), 0.25))


# --- linear and task vectors -----------------------------------------------------------------------


def test_linear_weights_and_normalize():
    models = [sd(w=[1.0, 2.0]), sd(w=[3.0, -2.0])]
    torch.testing.assert_close(merge("linear", models, weights=[1, 3])["w"], torch.tensor([2.5, -1.0]))
    torch.testing.assert_close(
        merge("linear", models, weights=[1, 3], normalize=False)["w"], torch.tensor([10.0, -4.0])
    )


def test_task_arithmetic_adds_weighted_task_vectors():
    base = sd(w=[1.0, 1.0])
    models = [sd(w=[2.0, 1.0]), sd(w=[1.0, 3.0])]  # task vectors [1, 0] and [0, 2]
    torch.testing.assert_close(merge("task_arithmetic", models, base, weights=[1, 0.5])["w"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(merge("task_arithmetic", models, base, normalize=True)["w"], torch.tensor([1.5, 2.0]))


TIES_VECTORS = [[3.0, -1.0, 0.5], [-2.0, -2.0, 1.0], [1.0, 4.0, -0.2]]


def test_ties_sign_election_and_disjoint_mean():
    out = merge("ties", [sd(w=v) for v in TIES_VECTORS], sd(w=[0.0, 0.0, 0.0]))["w"]
    # elected signs (of the sums 2, 1, 1.3) are all +; average only the agreeing entries
    torch.testing.assert_close(out, torch.tensor([(3.0 + 1.0) / 2, 4.0, (0.5 + 1.0) / 2]))


def test_ties_trimming_keeps_the_largest_magnitudes():
    trimmed = [m.trim_to_density(torch.tensor(v), 2 / 3) for v in TIES_VECTORS]
    assert [t.tolist() for t in trimmed] == [[3.0, -1.0, 0.0], [-2.0, -2.0, 0.0], [1.0, 4.0, 0.0]]
    out = merge("ties", [sd(w=v) for v in TIES_VECTORS], sd(w=[0.0, 0.0, 0.0]), density=2 / 3)["w"]
    # entry 2 is trimmed everywhere: its elected sign (+, a tie) has no supporters, so it stays 0
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0, 0.0]))


def test_dare_is_unbiased_and_drops_at_the_given_rate():
    delta = torch.linspace(-1, 1, 500)
    draws = torch.stack([m.drop_and_rescale(delta, 0.3, torch.Generator().manual_seed(s)) for s in range(800)])
    assert abs(float((draws != 0).float().mean()) - 0.3) < 0.01
    # each entry's mean of 800 draws has std |δ| sqrt((1/p - 1) / 800); allow 5 of them
    sigma = delta.abs() * math.sqrt((1 / 0.3 - 1) / len(draws))
    assert ((draws.mean(0) - delta).abs() <= 5 * sigma + 1e-6).all()
    assert float((draws.mean(0) - delta).abs().mean()) < 0.03


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_per_seed(method):
    models, base = [tiny_llama(1), tiny_llama(2)], tiny_llama(0)
    a = merge(method, models, base, density=0.4, seed=3)
    b = merge(method, models, base, density=0.4, seed=3)
    c = merge(method, models, base, density=0.4, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --- identities ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_merging_identical_models_returns_that_model(method):
    model, base = tiny_cognate(1), tiny_cognate(0)
    params = {
        "slerp": dict(t=0.4),
        "frankenmerge": dict(layers=[1, 0, 2]),
        "dfs": dict(path=[(0, 0), (2, 1)]),
        "task_arithmetic": dict(normalize=True),
        "dare_linear": dict(normalize=True),
        "dare_ties": dict(density=1.0, normalize=True),
    }.get(method, {})
    n = 2 if method == "slerp" else 3
    out = merge(method, [model] * n, base, **params)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(out[key], tensor, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dfs"])
def test_merged_model_is_written_tensor_by_tensor_from_the_same_merge(method):
    parents, base = [tiny_llama(1), tiny_llama(2)], tiny_llama(0)
    params = {"ties": dict(density=0.5), "dfs": dict(path=[(0, 0), (1, 1), (1, 2)])}[method]
    tensors = merged_tensors(method, parents, base, **params)
    assert not isinstance(tensors, dict)  # made lazily, one at a time
    model = merged_model(method, parents, base, **params)
    expected = merge(method, parents, base, **params)
    assert model.state_dict().keys() == expected.keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    with pytest.raises(ValueError, match="needs base="):
        merged_tensors("ties", parents)  # checked before the first tensor is asked for


def test_frankenmerge_takes_each_layer_whole_from_its_source():
    models = [tiny_llama(s) for s in (1, 2, 3)]
    out = merge("frankenmerge", models, layers=[2, 0, 1])
    for layer, source in enumerate([2, 0, 1]):
        key = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(out[key], models[source].state_dict()[key])
    torch.testing.assert_close(out["model.norm.weight"], sum(mm.model.norm.weight for mm in models) / 3)


# --- DFS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_cognate], ids=["llama", "cognate"])
def test_dfs_identity_path_returns_a_parent(make):
    parents = [make(1), make(2)]
    n = parents[0].config.num_hidden_layers if make is tiny_llama else parents[0].config.num_prelude_layers
    child = merged_model("dfs", parents, path=[(1, i) for i in range(n)], weights=[0, 1])
    torch.testing.assert_close(child(TOKENS).logits, parents[1](TOKENS).logits)


def _scale_branches(layer: torch.nn.Module, scale: float) -> list:
    """Forward hooks that multiply a Llama layer's attention and MLP branch outputs by ``scale``."""
    hook = lambda module, args, output: output * scale
    return [layer.self_attn.o_proj.register_forward_hook(hook), layer.mlp.down_proj.register_forward_hook(hook)]


def test_dfs_scales_fold_into_the_weights_exactly():
    parents = [tiny_llama(1), tiny_llama(2)]
    path, scales = [(0, 0), (1, 2), (0, 2), (1, 1)], [1.0, 0.5, 1.7, 0.9]
    child = merged_model("dfs", parents, path=path, scales=scales, weights=[1, 0])
    assert child.config.num_hidden_layers == 4
    # reference: a model whose layers are the path's layers, with the branch scales applied at run time
    reference = tiny_llama(1, layers=4)
    reference.load_state_dict(parents[0].state_dict(), strict=False)  # embeddings, final norm, head
    for step, (source, layer) in enumerate(path):
        reference.model.layers[step].load_state_dict(parents[source].model.layers[layer].state_dict())
        _scale_branches(reference.model.layers[step], scales[step])
    torch.testing.assert_close(child(TOKENS).logits, reference(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_dfs_on_cognate_follows_the_path_with_memory_layers():
    parents = [tiny_cognate(1), tiny_cognate(2), tiny_cognate(3)]
    child = merged_model("dfs", parents, path=[(2, 1), (0, 0), (1, 1)], scales=[1.0, 0.7, 1.3])
    assert child.config.num_prelude_layers == 3 and child.config.memory_layers == [0, 2]
    assert torch.isfinite(child(TOKENS).logits).all()


# --- layer stacks and compute ----------------------------------------------------------------------


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.extra = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # inside a block: not a stack


class Unusual(nn.Module):
    """A model whose repeated blocks live under a name no merge code knows."""

    def __init__(self, seed):
        torch.manual_seed(seed)
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.trunk = nn.Module()
        self.trunk.stages = nn.ModuleList([Stage() for _ in range(3)])
        self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])  # two kinds of module: not a stack
        self.head = nn.Linear(4, 8)


def test_layer_stacks_are_the_models_module_lists_of_repeated_blocks():
    assert layer_stacks(tiny_llama(0)) == {"model.layers": 3}
    assert layer_stacks(tiny_cognate(0)) == {"model.prelude": 2, "model.core": 1}
    models = [Unusual(s) for s in (1, 2, 3)]
    assert layer_stacks(models[0]) == {"trunk.stages": 3}
    out = merge("frankenmerge", models, layers=[2, 0, 1])
    for stage, source in enumerate([2, 0, 1]):
        for key in (f"trunk.stages.{stage}.mix.weight", f"trunk.stages.{stage}.extra.1.bias"):
            assert torch.equal(out[key], models[source].state_dict()[key])
    torch.testing.assert_close(out["head.weight"], sum(mm.head.weight for mm in models) / 3)


def test_layer_methods_need_the_models_not_state_dicts():
    with pytest.raises(ValueError, match="needs the models themselves"):
        merge("frankenmerge", [tiny_llama(1).state_dict()] * 2, layers=[0, 1, 0])


def test_flops_per_token_count_each_weight_matrix_per_pass():
    llama = tiny_llama(0)
    per_layer = 4 * 32 * 32 + 3 * 32 * 48  # attention projections, SwiGLU
    assert flops_per_token(llama) == 2 * (3 * per_layer + 48 * 32)  # the tied-or-not LM head is a product
    short, deep = (
        CognateForCausalLM(CognateConfig.from_preset("micro", vocab_size=48, max_recursion=r)) for r in (2, 4)
    )
    assert stack_passes(deep) == {"model.prelude": 1, "model.core": 4}
    core = sum(p.numel() for p in short.model.core.parameters() if p.dim() >= 2)
    assert flops_per_token(deep) - flops_per_token(short) == 2 * 2 * core  # two more core passes
    parents = [tiny_llama(1), tiny_llama(2)]
    longer = merged_model("dfs", parents, path=[(0, 0), (1, 1), (0, 1), (1, 2)])
    assert flops_per_token(longer) - flops_per_token(parents[0]) == 2 * per_layer  # one more block on the path


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: merge("mean", [sd(w=[1.0])]), "unknown method 'mean'"),
        (lambda: merge("ties", [sd(w=[1.0])]), "needs base="),
        (lambda: merge("slerp", [sd(w=[1.0])] * 3, t=0.5), "exactly 2 models"),
        (lambda: merge("slerp", [sd(w=[1.0])] * 2, t=1.5), r"t in \[0, 1\]"),
        (lambda: merge("linear", [sd(w=[1.0]), sd(w=[1.0, 2.0])]), r"w is \[2\] in model 1"),
        (lambda: merge("linear", [sd(w=[1.0]), sd(v=[1.0])]), "different tensors"),
        (lambda: merge("ties", [sd(w=[1.0])], sd(w=[0.0]), density=0.0), r"density must be in \(0, 1\]"),
        (lambda: merge("linear", [sd(w=[1.0])] * 2, weights=[1.0]), "1 weights for 2 models"),
        (lambda: merge("frankenmerge", [tiny_llama(1)] * 2, layers=[0, 1]), "one source index"),
        (lambda: merge("dfs", [tiny_llama(1)] * 2, path=[(0, 7)]), r"step \(0, 7\)"),
        (lambda: merge("dfs", [tiny_llama(1)] * 2, path=[(0, 0)], scales=[-1.0]), "positive numbers"),
    ],
)
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
