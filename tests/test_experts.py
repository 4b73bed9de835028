"""agentforge.experts on small hand-checkable cases: SVD reconstruction, gradients reaching z,
composition, ternary re-quantization of adapted BitLinear weights, the router on separable and
on random toy data, clustering, bootstrap intervals, Pareto fronts, CMA-ES, the REINFORCE loss."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge import ops
from agentforge.eval.stats import bootstrap_interval
from agentforge.experts import (
    MixtureSearch,
    Router,
    SearchSettings,
    SVDBasis,
    SVFExpert,
    adapted_forward,
    compose,
    installed,
    paired_gain,
    pareto_front,
    target_weights,
    ternary_weights,
)
from agentforge.experts.discovery import (
    Unit,
    average_linkage,
    cluster_families,
    cosine_similarity,
    learning_zone,
    widened_zone,
    zone_gradients,
)
from agentforge.experts.mixture import Measurement, sanitize
from agentforge.experts.router import prompt_features
from agentforge.experts.svf import adapted_bytes
from agentforge.experts.training import _until_eos_mask, answer_kl, leave_one_out_baseline
from agentforge.models import CognateConfig, CognateForCausalLM
from agentforge.nn import BitLinear, convert_to_bitnet

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_cognate() -> CognateForCausalLM:
    torch.manual_seed(0)
    return CognateForCausalLM(CognateConfig.from_preset("micro", vocab_size=64)).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


class Diagonal(nn.Module):
    """One 2×2 linear layer whose SVD is known by hand: W = diag(3, 2)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 2.0]]))

    def forward(self, x):
        return self.proj(x)


# --- SVF --------------------------------------------------------------------------------------


def test_z_scales_singular_values_by_hand():
    basis = SVDBasis.of(Diagonal(), skip=())
    assert basis.names == ["proj"] and basis.total == 2
    torch.testing.assert_close(basis.singular_values()["proj"], torch.tensor([3.0, 2.0]))
    adapted = basis.adapted(torch.tensor([2.0, 0.5]))["proj"]
    torch.testing.assert_close(adapted.abs(), torch.tensor([[6.0, 0.0], [0.0, 1.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("build", [micro_cognate, tiny_llama])
def test_z_of_ones_gives_every_weight_back(build):
    model = build()
    basis = SVDBasis.of(model)
    assert "lm_head" not in basis.names and all("embed" not in n for n in basis.names)
    for name, weight in basis.adapted(basis.ones()).items():
        torch.testing.assert_close(weight, model.get_submodule(name).weight, atol=2e-6, rtol=1e-5)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            adapted_forward(model, basis, basis.ones(), input_ids=ids).logits,
            model(input_ids=ids).logits,
            atol=2e-5,
            rtol=1e-4,
        )


def test_z_counts_against_lora():
    basis = SVDBasis.of(tiny_llama())
    counts = basis.parameter_counts()
    # per layer: q, o 32x32 (r = 32); k, v 16x32 (r = 16); gate, up 64x32 and down 32x64 (r = 32)
    assert counts["matrices"] == 14 and counts["svf_z"] == 2 * (32 + 16 + 16 + 32 + 32 + 32 + 32)
    assert counts["lora_rank1"] == 2 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
    assert counts["svf_z"] < counts["lora_rank1"] < counts["lora_rank16"]


def test_gradients_reach_every_z_and_no_base_weight():
    from agentforge.experts.training import frozen

    model = micro_cognate()
    basis = SVDBasis.of(model)
    expert = SVFExpert(model, basis)
    assert list(dict(expert.named_parameters())) == ["z"]
    ids = torch.randint(0, 64, (2, 12))
    with frozen(model):
        expert(input_ids=ids, labels=ids).loss.backward()
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())
    for name, grad in basis.split(expert.z.grad).items():
        assert grad.abs().sum() > 0, name


def test_composition_is_affine_around_the_base():
    z1, z2 = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.0, 1.5, 3.0])
    torch.testing.assert_close(compose([z1, z2], [0.5, 0.5]), (z1 + z2) / 2)  # Σ α z when Σ α = 1
    torch.testing.assert_close(compose([z1, z2], [0.0, 0.0]), torch.ones(3))  # α = 0 is the base
    torch.testing.assert_close(compose([z1, z2], [1.0, 0.0]), z1)
    torch.testing.assert_close(compose([z1], [0.25]), torch.tensor([1.25, 0.875, 1.0]))
    basis = SVDBasis.of(Diagonal(), skip=())
    mixed = basis.adapted(compose([torch.tensor([2.0, 0.5]), torch.tensor([1.0, 3.0])], [0.5, 0.5]))["proj"]
    torch.testing.assert_close(mixed.abs(), torch.tensor([[4.5, 0.0], [0.0, 3.5]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 experts but 1"):
        compose([z1, z2], [1.0])


def test_installed_swaps_weights_and_restores_them():
    model = Diagonal()
    basis = SVDBasis.of(model, skip=())
    x = torch.tensor([[1.0, 1.0]])
    with installed(model, basis.adapted(torch.tensor([2.0, 0.5]))):
        torch.testing.assert_close(model(x).abs(), torch.tensor([[6.0, 1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), torch.tensor([[3.0, 2.0]]))
    with pytest.raises(ValueError, match="shape"):
        with installed(model, {"proj": torch.zeros(3, 2)}):
            pass


def test_adapted_bitlinear_weights_requantize_to_ternary_and_match_the_packed_kernel():
    model = convert_to_bitnet(micro_cognate())
    basis = SVDBasis.of(model)
    name = basis.names[0]
    z = basis.ones() + 0.3 * torch.randn(basis.total)
    packed, scale = ternary_weights(basis, z)[name]
    layer = model.get_submodule(name)
    codes = ops.unpack_ternary(packed, layer.in_features)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    base_codes, _ = ops.quantize_ternary(layer.weight.detach(), False)
    assert (codes != base_codes).any()  # the expert moved the ternary weights, not just the latent ones
    kernel = BitLinear.from_packed(packed, scale, layer.in_features)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad(), installed(model, basis.adapted(z)):
        torch.testing.assert_close(kernel(x), layer(x), atol=1e-4, rtol=1e-4)  # STE forward == kernel
    assert adapted_bytes(model, [name]) == layer.out_features * -(-layer.in_features // 4) + 4


def test_gradient_reaches_z_through_bitlinear_ste():
    model = convert_to_bitnet(micro_cognate())
    expert = SVFExpert(model, SVDBasis.of(model))
    ids = torch.randint(0, 64, (2, 10))
    loss = expert(input_ids=ids, labels=ids).loss
    loss.backward()
    assert expert.z.grad.abs().sum() > 0


def test_packed_bitlinear_is_refused():
    from agentforge.nn import pack_bitnet

    model = pack_bitnet(convert_to_bitnet(micro_cognate()))
    with pytest.raises(ValueError, match="packed"):
        target_weights(model)


# --- router -----------------------------------------------------------------------------------


def blobs(n_per_class: int, centers: torch.Tensor, generator: torch.Generator):
    features = torch.cat([c + 0.3 * torch.randn(n_per_class, centers.shape[1], generator=generator) for c in centers])
    labels = [name for name in ("a", "b", "c")[: len(centers)] for _ in range(n_per_class)]
    return features, labels


def test_router_separates_a_separable_toy_set():
    g = torch.Generator().manual_seed(0)
    centers = 2.0 * torch.eye(3, 8)
    train_x, train_y = blobs(40, centers, g)
    test_x, test_y = blobs(40, centers, g)
    router = Router(8, ["a", "b", "c"]).fit(train_x, train_y)
    assert router.accuracy(test_x, test_y) >= 0.97


def test_router_cannot_learn_random_labels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(240, 8, generator=g)
    labels = [("a", "b", "c")[i] for i in torch.randint(0, 3, (240,), generator=g).tolist()]
    router = Router(8, ["a", "b", "c"]).fit(x[:120], labels[:120])
    assert router.accuracy(x[120:], labels[120:]) < 0.55  # chance is 1/3


def test_router_rejects_bad_labels():
    with pytest.raises(ValueError, match="not among the classes"):
        Router(4, ["a", "b"]).fit(torch.randn(3, 4), ["a", "b", "z"])
    with pytest.raises(ValueError, match="two distinct classes"):
        Router(4, ["a"])


@pytest.mark.parametrize("build", [micro_cognate, tiny_llama])
def test_prompt_features_read_the_hidden_state_of_each_real_token(build):
    model = build()
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    features = prompt_features(model, ids, mask)
    alone = prompt_features(model, ids[:1, 2:], mask[:1, 2:])
    assert features.shape == (2, 2 * model.config.hidden_size)
    torch.testing.assert_close(features[:1], alone, atol=1e-4, rtol=1e-4)  # padding changes nothing
    assert not torch.allclose(features[0], features[1])


# --- discovery --------------------------------------------------------------------------------


def test_average_linkage_finds_the_obvious_groups():
    points = np.array([0.0, 0.1, 0.2, 5.0, 5.1, 9.0])
    distance = np.abs(points[:, None] - points[None, :])
    assert average_linkage(distance, 3) == [[0, 1, 2], [3, 4], [5]]
    assert average_linkage(distance, 6) == [[i] for i in range(6)]
    with pytest.raises(ValueError, match="cannot make 7 clusters"):
        average_linkage(distance, 7)


def test_families_with_aligned_gradients_share_an_expert():
    g = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 1.0]])
    families = ["a", "b", "c", "d", "e"]
    similarity = cosine_similarity(g)
    assert similarity[0, 1] > 0.99 and abs(similarity[0, 2]) < 1e-9
    accuracy = dict.fromkeys(families, 0.5)
    assert cluster_families(families, similarity, accuracy, 3, 0.5) == [["a", "b"], ["c"], ["d", "e"]]
    with pytest.raises(ValueError, match="n_experts must be in"):
        cluster_families(families, similarity, accuracy, 2, 0.5)
    with pytest.raises(ValueError, match="only 5 task families"):
        cluster_families(families, similarity, {**accuracy}, 6, 0.5)


def test_zone_widens_just_enough_for_n_families():
    accuracy = {Unit("a", 0): 0.5, Unit("b", 0): 0.05, Unit("c", 0): 0.95, Unit("c", 1): 0.85, Unit("d", 0): 0.0}
    assert widened_zone(accuracy, 0.2, 0.8, 1) == (0.2, 0.8)
    low, high = widened_zone(accuracy, 0.2, 0.8, 2)  # c@1 is 0.05 above the zone
    assert learning_zone(accuracy, low, high) == [Unit("a", 0), Unit("c", 1)]
    low, high = widened_zone(accuracy, 0.2, 0.8, 3)  # then b@0 and c@0, 0.15 outside
    assert learning_zone(accuracy, low, high) == [Unit("a", 0), Unit("b", 0), Unit("c", 0), Unit("c", 1)]
    with pytest.raises(ValueError, match="only 4 task families"):
        widened_zone(accuracy, 0.2, 0.8, 5)


def test_learning_zone_and_units():
    accuracy = {Unit("a", 0): 0.05, Unit("a", 1): 0.5, Unit("b", 0): 0.95, Unit("b", 1): 0.1}
    assert learning_zone(accuracy, 0.1, 0.9) == [Unit("a", 1), Unit("b", 1)]
    assert Unit.parse("kv_recall@2") == Unit("kv_recall", 2) and Unit("kv_recall", 2).name == "kv_recall@2"
    with pytest.raises(ValueError, match="FAMILY@LEVEL"):
        Unit.parse("kv_recall")
    with pytest.raises(ValueError, match="low <= high"):
        learning_zone(accuracy, 0.9, 0.1)


# --- statistics and search ----------------------------------------------------------------------


def test_bootstrap_intervals():
    constant = bootstrap_interval(np.full(50, 0.4))
    assert constant["mean"] == constant["low"] == constant["high"] == pytest.approx(0.4)
    coin = bootstrap_interval(np.array([0.0, 1.0] * 100))
    assert coin["low"] < 0.5 < coin["high"] and coin["high"] - coin["low"] < 0.2
    better = paired_gain(np.ones(60), np.r_[np.ones(40), np.zeros(20)])
    assert better["significant"] and better["mean"] == pytest.approx(1 / 3)
    assert not paired_gain(np.r_[np.ones(30), np.zeros(30)], np.r_[np.zeros(30), np.ones(30)])["significant"]
    with pytest.raises(ValueError, match="same items"):
        paired_gain(np.ones(3), np.ones(4))


def test_pareto_front_by_hand():
    m = [
        Measurement((0.0,), 0.5, 1.0, 0),
        Measurement((1.0,), 0.7, 1.1, 10),
        Measurement((0.5,), 0.6, 1.2, 10),
        Measurement((0.2,), 0.5, 1.0, 5),
    ]
    assert pareto_front(m) == [0, 1]  # 2 loses to 1 everywhere; 3 loses to 0 on memory


def test_cma_search_finds_the_measured_optimum():
    target = np.array([0.8, 0.0, 0.3])
    calls = []

    def evaluate(alphas):  # a real (deterministic) response surface standing in for a model
        calls.append(alphas)
        return Measurement(
            tuple(alphas), 1.0 - float(np.sum((np.array(alphas) - target) ** 2)), 0.01, 100 if any(alphas) else 0
        )

    settings = SearchSettings(generations=8, population=6, sigma=0.3, w_compute=0.0, w_memory=0.0)
    search = MixtureSearch(evaluate, 3, settings)
    best = search.run([1.0, 0.0, 0.0], adapted_bytes=100)
    assert calls[0] == (0.0, 0.0, 0.0) and calls[1] == (1.0, 0.0, 0.0)  # the base first, then the start
    assert best.accuracy > evaluate((1.0, 0.0, 0.0)).accuracy
    assert np.abs(np.array(best.alphas) - target).max() < 0.2
    assert len(search.history()) == len(set(calls[:-1])) and any(r["pareto"] for r in search.history())


def test_search_falls_back_to_the_base_when_adapting_does_not_pay():
    def evaluate(alphas):
        return Measurement(tuple(alphas), 0.5, 0.01, 100 if any(alphas) else 0)  # every mixture ties the base

    best = MixtureSearch(evaluate, 2, SearchSettings(generations=2, population=4)).run([1.0, 0.0], 100)
    assert best.alphas == (0.0, 0.0)


def test_fitness_charges_counted_compute_relative_to_the_base_and_ignores_latency():
    def evaluate(alphas):  # equal accuracy; the mixture costs 1.5x the base's FLOPs and is "faster"
        adapted = any(alphas)
        return Measurement(
            tuple(alphas), 0.5, 150.0 if adapted else 100.0, 100 if adapted else 0, latency_s=0.001 if adapted else 9.0
        )

    search = MixtureSearch(evaluate, 2, SearchSettings(generations=0, w_nll=0.0, w_compute=0.1, w_memory=0.0))
    assert search.run([1.0, 0.0], adapted_bytes=100).alphas == (0.0, 0.0)
    assert search.fitness(search.measure([1.0, 0.0])) == pytest.approx(0.5 - 0.1 * 1.5)
    assert search.fitness(search.reference) == pytest.approx(0.5 - 0.1)


def test_search_settings_are_checked():
    from agentforge.errors import ConfigError

    with pytest.raises(ConfigError, match="population: expected an int in"):
        SearchSettings(population=1)
    with pytest.raises(ConfigError, match="floor: must be below alpha_max"):
        SearchSettings(alpha_max=0.5, floor=0.5)


def test_build_flops_count_the_mixture_and_the_reconstruction():
    basis = SVDBasis.of(Diagonal(), skip=())  # one 2x2 matrix, r = 2
    assert basis.build_flops(0) == 0
    assert basis.build_flops(1) == 3 * 2 + (2 + 2 * 2 + 2 * 2 * 2 * 2)
    assert basis.build_flops(2) - basis.build_flops(1) == 3 * 2


def test_sanitize_clips_floors_and_rounds():
    settings = SearchSettings(alpha_max=1.5, floor=0.05)
    assert sanitize([-0.2, 0.04, 0.12345, 2.0], settings) == (0.0, 0.0, 0.123, 1.5)


# --- training losses ------------------------------------------------------------------------------


def test_leave_one_out_baseline_and_eos_mask_by_hand():
    torch.testing.assert_close(
        leave_one_out_baseline(torch.tensor([1.0, 0.0, 0.0, 1.0])), torch.tensor([1 / 3, 2 / 3, 2 / 3, 1 / 3])
    )
    mask = _until_eos_mask(torch.tensor([[5, 2, 7, 2], [2, 3, 3, 3], [4, 4, 4, 4]]), eos=2)
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False], [True] * 4]


def test_answer_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert answer_kl(logits, logits, mask) == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[0, 1] += 5.0  # a masked-out position: no effect
    assert answer_kl(logits, other, mask) == pytest.approx(0.0, abs=1e-6)
    other[0, 0, 0] += 5.0
    assert answer_kl(logits, other, mask) > 0.01


def test_answer_kl_is_the_masked_mean_of_the_per_position_kl_and_zero_without_positions():
    torch.manual_seed(0)
    logits, base = torch.randn(3, 4, 7, requires_grad=True), torch.randn(3, 4, 7)
    mask = torch.tensor([[True, False, True, True], [False] * 4, [False, True, False, False]])
    log_p, log_q = logits.log_softmax(-1), base.log_softmax(-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    expected = per_position[mask].sum() / mask.sum()
    got = answer_kl(logits, base, mask)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert torch.allclose(got_grad, expected_grad, atol=1e-7)
    assert float(answer_kl(logits, base, torch.zeros(3, 4, dtype=torch.bool))) == 0.0


def test_reinforce_gradient_vanishes_with_equal_rewards_and_not_otherwise(cognate_micro):
    from agentforge.artifacts import load_model_dir
    from agentforge.data import make_split
    from agentforge.experts.training import frozen, prompt_rows, reinforce_loss

    _, result = cognate_micro
    model, tokenizer, _ = load_model_dir(result.artifacts["trunk"])
    items = make_split("add_small", "train", 6, seed=0, level=0)
    rows = prompt_rows(tokenizer, items)
    batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "item")}
    basis = SVDBasis.of(model)

    def gradient(score):
        expert = SVFExpert(model, basis)
        torch.manual_seed(0)
        with frozen(model):
            loss, extras = reinforce_loss(model, tokenizer, items, 0.1, 1.0, 3, score)(expert, batch)
            loss.backward()
        return expert.z.grad, extras

    flat, extras = gradient(lambda item, answer: 1.0)
    assert extras["reward"] == 1.0
    alternating = iter([1.0, 0.0] * 3)
    varied, extras = gradient(lambda item, answer: next(alternating))
    assert extras["reward"] == 0.5
    # advantage 0 and KL's gradient 0 at z = 1: what is left is float32 rounding (up to 1e-9 was
    # seen), far below the gradient of unequal rewards
    assert varied.abs().max() > 1e-4 and flat.abs().max() < 1e-5 * varied.abs().max()


def test_expert_training_resumes_its_finished_stages_without_training(cognate_micro, tmp_path, monkeypatch):
    from agentforge.artifacts import load_model_dir
    from agentforge.data import make_split
    from agentforge.experts import TrainSettings, in_directory, train_expert
    from agentforge.train import loop

    _, result = cognate_micro
    model, tokenizer, _ = load_model_dir(result.artifacts["trunk"])
    basis = SVDBasis.of(model)
    items = make_split("add_small", "train", 8, seed=0, level=0)
    settings = TrainSettings(ce_steps=2, rl_steps=1, batch_size=4)
    z, results = train_expert(model, basis, tokenizer, items, settings, in_directory(tmp_path))
    assert set(results) == {"ce", "rl"} and not torch.equal(z, basis.ones())

    def no_step(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(loop, "_step", no_step)
    again, _ = train_expert(model, basis, tokenizer, items, settings, in_directory(tmp_path))
    assert torch.equal(again, z)


def test_expert_copy_does_not_share_z_with_the_basis():
    model = micro_cognate()
    basis = SVDBasis.of(model)
    expert = SVFExpert(model, basis, z=basis.ones() * 2)
    clone = copy.deepcopy(expert.z.detach())
    assert torch.equal(clone, torch.full((basis.total,), 2.0)) and expert.z.data_ptr() != basis.ones().data_ptr()


def test_zone_gradients_are_the_same_whole_or_in_batches(cognate_micro):
    from agentforge.artifacts import load_model_dir
    from agentforge.data import make_split

    model, tokenizer = load_model_dir(cognate_micro[1].artifacts["trunk"])[:2]
    model.eval()
    basis = SVDBasis.of(model)
    items = {f: make_split(f, "train", 12, seed=0, level=0) for f in ("add_small", "kv_recall")}
    whole = zone_gradients(model, basis, tokenizer, items, seq_len=64, batch_rows=1000)
    batched = zone_gradients(model, basis, tokenizer, items, seq_len=64, batch_rows=1)
    assert whole.shape == (2, basis.total) and whole.abs().sum(1).min() > 0
    torch.testing.assert_close(batched, whole, rtol=1e-4, atol=1e-6)
