"""BitLinear: training forward/backward, warm-up, packing, state dicts, bad input, memory."""

import math

import pytest
import torch
import torch.nn.functional as F

from agentforge import ops
from agentforge.nn import BitLinear


def make_layer(K=40, N=24, bias=True, per_channel=False, seed=0):
    torch.manual_seed(seed)
    return BitLinear(K, N, bias=bias, per_channel=per_channel)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_training_forward_is_the_fused_op(bias, per_channel):
    layer = make_layer(bias=bias, per_channel=per_channel)
    x = torch.randn(3, 5, 40)
    y = layer(x)
    assert y.shape == (3, 5, 24)
    torch.testing.assert_close(y, ops.bitlinear(x, layer.weight, layer.bias, per_channel), rtol=0, atol=0)
    # and it is quantized: equal to F.linear on fake-quantized operands, not on the raw ones
    ref = F.linear(ops.act_fake_quant(x), ops.ternary_fake_quant(layer.weight, per_channel), layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, F.linear(x, layer.weight, layer.bias), atol=1e-3)


def test_ste_gradients_reach_weight_bias_and_input():
    layer = make_layer()
    x = torch.randn(6, 40, requires_grad=True)
    grad_y = torch.randn(6, 24)
    layer(x).backward(grad_y)
    w_q = ops.ternary_fake_quant(layer.weight.detach())
    torch.testing.assert_close(x.grad, grad_y @ w_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, grad_y.t() @ ops.act_fake_quant(x.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum(0))


def test_warmup_lambda_blends_full_precision_and_quantized():
    layer = make_layer()
    x = torch.randn(4, 40)
    layer.lambda_ = 0.0
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.lambda_ = 0.3
    w, lam = layer.weight.detach(), 0.3
    expected = F.linear(x + lam * (ops.act_fake_quant(x) - x), w + lam * (ops.ternary_fake_quant(w) - w), layer.bias)
    torch.testing.assert_close(layer(x), expected)
    # STE through the blend: the weight gradient is the one of a plain linear on the blended input
    x.requires_grad_(True)
    layer(x).sum().backward()
    x_blend = x.detach() + lam * (ops.act_fake_quant(x.detach()) - x.detach())
    torch.testing.assert_close(layer.weight.grad, torch.ones(4, 24).t() @ x_blend)
    torch.testing.assert_close(x.grad, torch.ones(4, 24) @ (w + lam * (ops.ternary_fake_quant(w) - w)))
    layer.lambda_ = 1.0
    torch.testing.assert_close(layer(x), ops.bitlinear(x, layer.weight, layer.bias), rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("K,N", [(40, 24), (37, 5), (130, 16)])
def test_pack_keeps_outputs_and_frees_latent_weight(K, N, per_channel):
    torch.manual_seed(1)
    layer = BitLinear(K, N, per_channel=per_channel)
    x = torch.randn(2, 3, K)
    with torch.no_grad():
        before = layer(x)
        assert layer.pack() is layer
        after = layer(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert layer.state == "packed" and not hasattr(layer, "weight")
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert layer.w_prepacked.dtype == torch.uint8 and layer.w_scale.dtype == torch.float32
    assert layer.w_scale.shape == ((N,) if per_channel else (1,))


@pytest.mark.parametrize("bits, pack, per_byte", [(2, ops.pack_ternary, 4), (1.6, ops.pack_ternary_base3, 5)])
def test_packed_state_dict_is_canonical_and_round_trips(bits, pack, per_byte):
    layer = make_layer(K=37, N=12, per_channel=True)
    codes, scale = ops.quantize_ternary(layer.weight.detach(), True)
    layer.pack(bits)
    assert ops.prepacked_info(layer.w_prepacked)["layout"] == {2: "2bit", 1.6: "base3"}[bits]
    sd = layer.state_dict()
    assert set(sd) == {"bias", "weight_packed", "weight_scale"}
    assert sd["weight_packed"].dtype == torch.uint8 and sd["weight_packed"].shape == (12, math.ceil(37 / per_byte))
    assert torch.equal(sd["weight_packed"], pack(codes))
    assert torch.equal(sd["weight_scale"], scale)

    fresh = make_layer(K=37, N=12, per_channel=True, seed=5).pack(bits)
    fresh.load_state_dict(sd)  # strict: no missing or unexpected keys
    x = torch.randn(3, 37)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert torch.equal(fresh.w_prepacked, layer.w_prepacked)


def test_both_widths_compute_the_same_layer():
    two, one_six = make_layer(K=300, N=20).pack(2), make_layer(K=300, N=20).pack(1.6)
    x = torch.randn(2, 5, 300)
    with torch.no_grad():
        assert torch.equal(two(x), one_six(x))
    assert "bits=1.6" in repr(one_six)


def test_pack_refuses_other_widths():
    with pytest.raises(ValueError, match=r"bits must be 2 \(2-bit layout\) or 1.6"):
        make_layer().pack(bits=1.58)


@pytest.mark.parametrize("bits", [2, 1.6])
def test_from_packed_builds_a_packed_layer(bits):
    layer = make_layer(K=33, N=8).pack(bits)
    sd = layer.state_dict()
    rebuilt = BitLinear.from_packed(sd["weight_packed"], sd["weight_scale"], in_features=33, bias=sd["bias"], bits=bits)
    x = torch.randn(4, 33)
    assert (rebuilt.in_features, rebuilt.out_features, rebuilt.state, rebuilt.bits) == (33, 8, "packed", bits)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)


def test_to_bfloat16_keeps_the_kernel_scale_in_fp32():
    layer = make_layer().pack()
    scale = layer.w_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.w_scale.dtype == torch.float32 and torch.equal(layer.w_scale, scale)
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_pack_twice_is_a_clear_error():
    layer = make_layer().pack()
    with pytest.raises(RuntimeError, match="already packed"):
        layer.pack()


def test_loading_packed_weights_into_a_training_layer_says_pack_first():
    sd = make_layer().pack().state_dict()
    with pytest.raises(RuntimeError, match="call pack_bitnet"):
        make_layer().load_state_dict(sd)


def test_corrupt_base3_checkpoint_is_a_clear_error():
    sd = {k: v.clone() for k, v in make_layer().pack(1.6).state_dict().items()}
    sd["weight_packed"].view(-1)[0] = 250
    with pytest.raises(RuntimeError, match="base-3 byte above 242"):
        make_layer(seed=3).pack(1.6).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="needs 10 at 2 bits"):  # a 1.6-bit checkpoint into a 2-bit layer
        make_layer(seed=3).pack(2).load_state_dict(make_layer().pack(1.6).state_dict())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd.update(weight_packed=sd["weight_packed"][:, :-1].contiguous()), "bytes per row"),
        (lambda sd: sd.update(weight_packed=sd["weight_packed"][:-1].contiguous()), "holds 23 rows and 1 scales"),
        (lambda sd: sd.update(weight_packed=sd["weight_packed"].to(torch.int8)), "uint8"),
        (lambda sd: sd["weight_scale"].fill_(float("nan")), "finite and positive"),
        (lambda sd: sd.update(weight_scale=torch.ones(3)), r"shape \[1\] or \[24\]"),
        (lambda sd: sd["weight_packed"].view(-1)[0].fill_(0xFF), "invalid 2-bit code"),
        (lambda sd: sd.update(weight_scale=torch.ones(24)), "24 scales, the layer needs 24 rows and 1"),
        (lambda sd: sd.pop("weight_scale"), "Missing key"),
    ],
)
def test_corrupt_packed_checkpoint_is_a_clear_error(corrupt, message):
    sd = {k: v.clone() for k, v in make_layer().pack().state_dict().items()}
    corrupt(sd)
    with pytest.raises(RuntimeError, match=message):
        make_layer(seed=3).pack().load_state_dict(sd)


def _bits_per_weight(N, K, bits=2):
    """A packed BitLinear of shape N x K built from random canonical bytes (no float weights)."""
    codes = torch.randint(-1, 2, (N, K), dtype=torch.int8)
    packed = ops.pack_ternary_base3(codes) if bits == 1.6 else ops.pack_ternary(codes)
    layer = BitLinear.from_packed(packed, torch.ones(1), in_features=K, bits=bits)
    w = layer.w_prepacked
    weight_bits = w.numel() * w.element_size() * 8 / (N * K)
    with_scales = (w.numel() * w.element_size() + layer.w_scale.numel() * 4) * 8 / (N * K)
    return weight_bits, with_scales


@pytest.mark.parametrize("bits", [2, 1.6])
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008), (2560, 6912)])
def test_packed_memory_realistic_shapes_pay_only_block_padding(N, K, bits):
    # 1.6 bits in blocks of 160 weights: K = 4096 is 25.6 blocks, so 26 are stored (1.625 bits).
    block = ops.reference.BLOCK_K[{2: "2bit", 1.6: "base3"}[bits]]
    measured, with_scales = _bits_per_weight(N, K, bits)
    print(f"\npacked {N}x{K} at {bits}: {measured:.4f} bits/weight, {with_scales:.6f} with scales")
    assert measured <= bits * math.ceil(K / block) * block / K + 0.01 and with_scales <= measured + 0.01


@pytest.mark.parametrize("bits", [2, 1.6])
@pytest.mark.parametrize("N,K", [(4095, 4097), (1000, 999), (37, 5)])
def test_packed_memory_odd_shapes_pays_only_the_kernel_block_padding(N, K, bits):
    # The kernel layout pads K to a multiple of the block (128 weights at 2 bits, 160 at 1.6)
    # and adds one header row (plus one byte per row at 1.6, which names the layout).
    block = ops.reference.BLOCK_K[{2: "2bit", 1.6: "base3"}[bits]]
    measured, _ = _bits_per_weight(N, K, bits)
    row = max(math.ceil(K / block) * 32, 32) + (bits == 1.6)
    print(f"\npacked {N}x{K} at {bits}: {measured:.4f} bits/weight")
    assert measured == pytest.approx((N + 1) * row * 8 / (N * K))
    assert measured < bits + bits * block / K + row * 8 / (N * K) + 8 / K
