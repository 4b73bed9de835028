"""convert_to_bitnet / pack_bitnet on plain torch models, state dicts, and torch.compile."""

import pytest
import torch
from torch import nn

from agentforge.nn import BitLinear, convert_to_bitnet, pack_bitnet


class Tiny(nn.Module):
    """Embedding -> two blocks -> head, with names that exercise the skip patterns."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_proj = nn.Linear(d, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(2)
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_proj(self.embed_tokens(ids))
        for block in self.blocks:
            h = h + block(h)
        return self.lm_head(h)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def test_convert_swaps_linears_outside_skip_and_keeps_parameters():
    torch.manual_seed(0)
    model = Tiny()
    old = model.blocks[0][0]
    assert convert_to_bitnet(model) is model
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {
        "embed_proj": "Linear",
        "blocks.0.0": "BitLinear",
        "blocks.0.2": "BitLinear",
        "blocks.1.0": "BitLinear",
        "blocks.1.2": "BitLinear",
        "lm_head": "Linear",
    }
    new = model.blocks[0][0]
    assert new.weight is old.weight and new.bias is old.bias and new.state == "training"


def test_convert_per_channel_and_custom_skip():
    model = convert_to_bitnet(Tiny(), skip=("blocks.1",), per_channel=True)
    assert isinstance(model.embed_proj, BitLinear) and isinstance(model.lm_head, BitLinear)
    assert type(model.blocks[1][0]) is nn.Linear
    assert all(m.per_channel for m in model.modules() if isinstance(m, BitLinear))


def test_an_optimizer_built_before_conversion_keeps_training():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    convert_to_bitnet(model)
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    losses = []
    for _ in range(10):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_a_shared_linear_becomes_one_bitlinear():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    convert_to_bitnet(model)
    assert isinstance(model["a"], BitLinear) and model["b"][0] is model["a"]


def test_linear_subclasses_are_left_alone():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(Custom(4, 4), nn.Linear(4, 4))
    convert_to_bitnet(model)
    assert type(model[0]) is Custom and isinstance(model[1], BitLinear)


def test_pack_bitnet_matches_training_outputs_and_state_dict_round_trips():
    model = convert_to_bitnet(mlp())
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = model(x)
        assert pack_bitnet(model) is model
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    sd = model.state_dict()
    assert sorted(sd) == ["0.bias", "0.weight_packed", "0.weight_scale", "2.bias", "2.weight_packed", "2.weight_scale"]

    fresh = pack_bitnet(convert_to_bitnet(mlp(seed=7)))
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), after, rtol=0, atol=0)


def test_loading_a_training_state_dict_into_a_packed_model_fails_clearly():
    sd = convert_to_bitnet(mlp()).state_dict()
    packed = pack_bitnet(convert_to_bitnet(mlp()))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*0\.weight_packed"):
        packed.load_state_dict(sd)


def test_bad_input_is_a_clear_one_line_error():
    with pytest.raises(ValueError, match="no nn.Linear layer to convert") as info:
        convert_to_bitnet(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="outside the skip patterns"):
        convert_to_bitnet(nn.ModuleDict({"lm_head": nn.Linear(4, 4)}))
    model = convert_to_bitnet(mlp())
    with pytest.raises(ValueError, match="already converted"):
        convert_to_bitnet(model)
    with pytest.raises(ValueError, match="call convert_to_bitnet"):
        pack_bitnet(mlp())
    pack_bitnet(model)
    with pytest.raises(RuntimeError, match="already packed") as info:
        pack_bitnet(model)
    assert "\n" not in str(info.value)


# torch.compile: "aot_eager" traces with Dynamo and AOTAutograd (fake kernels, autograd formulas)
# exactly as inductor does, without spending ~40 s generating C++; fullgraph=True raises on any
# graph break.


def test_compile_fullgraph_training_forward_and_backward():
    torch._dynamo.reset()
    model = convert_to_bitnet(mlp())
    x = torch.randn(4, 7, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for got, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected)
    model[0].lambda_ = 0.5  # the warm-up path compiles too
    compiled(x).sum().backward()
    assert torch._dynamo.explain(model)(x).graph_break_count == 0


@pytest.mark.parametrize("bits", [2, 1.6])
def test_compile_fullgraph_packed_forward(bits):
    torch._dynamo.reset()
    model = pack_bitnet(convert_to_bitnet(mlp()), bits=bits)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
