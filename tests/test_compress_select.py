"""Calibration (layer-output error, importance), per-tensor codec choice with its rollback ladder,
and distillation into the codecs' trainable parts, on hand-checkable models."""

import pytest
import torch
from torch import nn

from agentforge.compress import Raw, RoundToNearest, model_tensors
from agentforge.compress.calibration import Calibration, kl_loss
from agentforge.compress.codec import Encoded
from agentforge.compress.distill import Distillation
from agentforge.compress.select import TensorChoice, Trial, best_within, escalate, plan, solo_damage
from agentforge.compress.ternary import smallest
from agentforge.eval.capture import capture_calls
from agentforge.nn import convert_to_bitnet
from agentforge.quant import layer_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(nn.Module):
    """Embedding -> linear -> tied output head; returns an object with ``.logits`` like an HF model."""

    def __init__(self, vocab=6, width=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.head(self.proj(self.embed(input_ids)))})()


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = Toy()
    batches = [{"input_ids": torch.tensor([[0, 1, 1, 2], [2, 2, 2, 3]])}]
    return model, batches


def slot_of(model, name):
    return next(s for s in model_tensors(model) if name in s.names)


class SharedThrice(nn.Module):
    """One linear layer applied three times per forward to a residual stream updated in place."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.shared = nn.Linear(4, 4)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            h.add_(self.shared(h))  # the input of this call changes after it
        return h


def test_capture_keeps_copies_of_the_first_calls_and_leaves_the_model_as_it_was():
    model = SharedThrice().train()
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    calls = capture_calls(model, ["shared"], [{"input_ids": ids}], max_calls=2, with_kwargs=True)
    (first_args, first_kwargs), (second_args, _) = calls["shared"]
    with torch.no_grad():
        x = model.embed(ids)
        assert torch.equal(first_args[0], x) and first_kwargs == {}
        assert torch.equal(second_args[0], x + model.shared(x))  # copied before the in-place update
    assert model.training and not model.shared._forward_pre_hooks and not first_args[0].requires_grad


def test_both_calibrations_see_the_same_layer_inputs(toy):
    """The ternary calibration (quant.layer_inputs) and the codec calibration capture alike."""
    model, batches = toy
    flat = layer_inputs(model, ["proj", "head"], batches, max_tokens=1000)
    calibration = Calibration(model, model_tensors(model), batches)
    for name in ("proj", "head"):
        [(args, _)] = calibration.calls[name]
        assert torch.equal(flat[name], args[0].reshape(-1, 4))


def test_output_error_is_zero_for_the_tensor_and_one_for_twice_it(toy):
    model, batches = toy
    calibration = Calibration(model, model_tensors(model), batches)
    proj = slot_of(model, "proj.weight")
    assert calibration.output_error(proj, proj.tensor) == 0.0
    assert calibration.output_error(proj, 2 * proj.tensor) == pytest.approx(1.0)  # ||2y - y||² / ||y||²


def test_tied_tensor_is_scored_at_both_of_its_uses(toy):
    model, batches = toy
    calibration = Calibration(model, model_tensors(model), batches)
    embedding = slot_of(model, "embed.weight")
    assert embedding.group == "embedding" and embedding.names == ["embed.weight", "head.weight"]
    assert len(embedding.owners) == 2
    # doubling the table doubles the embedding output (error 1) and the logits (error 1)
    assert calibration.output_error(embedding, 2 * embedding.tensor) == pytest.approx(1.0)


def test_importance_counts_tokens_and_input_energy(toy):
    model, batches = toy
    calibration = Calibration(model, model_tensors(model), batches)
    proj = slot_of(model, "proj.weight")
    x = model.embed(batches[0]["input_ids"]).detach().reshape(-1, 4)
    energy = x.pow(2).sum(0)
    assert torch.allclose(calibration.importance(proj, 0.0), (energy / energy.mean()).expand(4, 4))
    importance = calibration.importance(slot_of(model, "embed.weight"), floor=0.0)
    counts = torch.tensor([1.0, 2, 4, 1, 0, 0])  # token ids 0..5 in the batch
    head_energy = model.proj(model.embed(batches[0]["input_ids"])).detach().reshape(-1, 4).pow(2).sum(0)
    expected = ((counts / counts.mean())[:, None] + (head_energy / head_energy.mean())[None, :]) / 2
    assert torch.allclose(importance, expected)
    assert calibration.importance(proj, floor=1.0).eq(1).all()


def trial(name, bits, error):
    return Trial(name, Encoded("raw", {}, (1,), {}), bits, error, 0.0)


def test_best_within_budget_and_the_ladder():
    trials = {
        t.codec: t
        for t in [
            trial("rtn2", 2.1, 0.3),
            trial("seed3", 3.0, 0.1),
            trial("rtn4", 4.1, 0.05),
            trial("int8", 8.1, 0.001),
            trial("fp16", 16, 1e-6),
            trial("fp32", 32, 0.0),
        ]
    }
    assert best_within(trials, 3.5) == "seed3"
    assert best_within(trials, 1.0) == "rtn2"  # nothing fits: the smallest
    choice = TensorChoice(None, trials, budget=3.5)
    assert choice.choice == "seed3" and choice.lossy
    for expected in ("int8", "fp16", "fp32"):
        assert escalate(choice, [8.25, 16.0, 32.0]) and choice.choice == expected
    assert not escalate(choice, [8.25, 16.0, 32.0]) and not choice.lossy
    assert choice.history == ["seed3", "int8", "fp16"]


@pytest.fixture(scope="module")
def micro_bitnet(cognate_micro):
    from agentforge.artifacts import load_model_dir

    model, tokenizer, _ = load_model_dir(cognate_micro[1].artifacts["trunk"])
    convert_to_bitnet(model)
    ids = torch.tensor(tokenizer(["def f(x):\n    return x + 1\n"] * 2)["input_ids"])
    return model.eval(), [{"input_ids": ids}]


def test_plan_chooses_per_tensor_within_the_budget(micro_bitnet):
    model, batches = micro_bitnet
    slots = model_tensors(model)
    calibration = Calibration(model, [s for s in slots if s.group != "ternary"], batches)
    choices = plan(slots, calibration, ["rtn2", "rtn4", "int8"], budget=5.0, min_numel=1024, importance_floor=0.25)
    by_group = {c.slot.group: c for c in choices}
    assert by_group["ternary"].choice == "ternary" and by_group["ternary"].trial.bits < 2.1
    embedding = by_group["embedding"]
    assert embedding.choice == "rtn4" and set(embedding.trials) == {"rtn2", "rtn4", "int8", "fp16", "fp32"}
    assert embedding.trials["rtn2"].error > embedding.trials["rtn4"].error > embedding.trials["int8"].error
    assert all(c.choice == "fp16" for c in choices if c.small)
    with torch.no_grad():
        reference = [model(**b).logits for b in batches]
    assert solo_damage(model, embedding, batches, reference) > 0
    exact = TensorChoice(embedding.slot, {"fp32": trial("fp32", 32, 0.0)}, 32)
    exact.trials["fp32"].encoded = Raw("float32").encode(embedding.slot.tensor)
    assert solo_damage(model, exact, batches, reference) == pytest.approx(0.0, abs=1e-9)


def encodings_for(model, embedding_codec):
    out = []
    for slot in model_tensors(model):
        if slot.group == "ternary":
            out.append((slot.names, smallest(slot.tensor, slot.per_channel)))
        else:
            codec = embedding_codec if slot.group == "embedding" else Raw("float32")
            out.append((slot.names, codec.encode(slot.tensor)))
    return [n for n, _ in out], [e for _, e in out]


def test_student_with_exact_codecs_matches_the_teacher(micro_bitnet):
    model, batches = micro_bitnet
    kd = Distillation(model, *encodings_for(model, Raw("float32")))
    with torch.no_grad():
        assert float(kd.loss(batches[0])) < 1e-6  # the student computes what the packed kernels compute


def test_distillation_lowers_the_kl_training_only_codec_parts(micro_bitnet):
    model, batches = micro_bitnet
    kd = Distillation(model, *encodings_for(model, RoundToNearest(2)))
    assert {name.split(".")[0] for name, _ in kd.named_parameters()} == {"decoders"}
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    before = float(kd.loss(batches[0]))
    optimizer = torch.optim.Adam(kd.parameters(), lr=0.01)
    for _ in range(15):
        optimizer.zero_grad()
        kd.loss(batches[0]).backward()
        optimizer.step()
    assert float(kd.loss(batches[0])) < 0.8 * before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher.items())  # the teacher never moves
    exported = kd.export()
    assert [e.kind for e in exported] == [e.kind for e in encodings_for(model, RoundToNearest(2))[1]]


def test_kl_loss_is_zero_for_equal_logits_and_masks_padding():
    a = torch.randn(2, 3, 5)
    assert float(kl_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    b = a.clone()
    b[:, -1] += torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert float(kl_loss(a, b, mask)) == pytest.approx(0.0, abs=1e-6) and float(kl_loss(a, b)) > 0
