"""Codecs of agentforge.compress on synthetic matrices: exact round trips where lossless, exact byte
counts, and the lossy codecs against round-to-nearest (RTN) at the same bits per weight."""

import math

import numpy as np
import pytest
import torch

from agentforge import ops
from agentforge.compress import (
    REGISTRY,
    VPTQ,
    Encoded,
    Hyper,
    Raw,
    RoundToNearest,
    SeedLM,
    Ternary,
    bitpack,
    codec_of,
    rans,
    seedlm,
    ternary,
)
from agentforge.compress.hyper import trajectory

pytestmark = pytest.mark.usefixtures("one_thread")


def relative_error(codec, w, importance=None):
    encoded = codec.encode(w, importance)
    return float((codec.decode(encoded) - w).norm() / w.norm()), encoded.bits_per_weight


def outlier_matrix(rows=64, cols=128, seed=0):
    """Gaussian weights whose outliers are piled into a few rows (as in early attention layers):
    a per-row scale set by the largest weight wastes most of its levels on those rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    spikes = torch.randint(cols, (rows,), generator=g)
    w[torch.arange(rows), spikes] *= 12
    return w


# ---------------------------------------------------------------------------------------------
# bit packing and rANS


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 13, 16])
def test_bitpack_round_trip_and_size(bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=1001)
    packed = bitpack.pack_bits(values, bits)
    assert packed.nbytes == math.ceil(1001 * bits / 8)
    assert np.array_equal(bitpack.unpack_bits(packed, bits, 1001), values)


def test_bitpack_layout_is_lsb_first():
    assert bitpack.pack_bits(np.array([1, 2, 3]), 2).tolist() == [0b111001]


def test_bitpack_rejects_bad_input():
    with pytest.raises(ValueError, match="values must lie"):
        bitpack.pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError, match="bits must be"):
        bitpack.pack_bits(np.array([0]), 0)
    with pytest.raises(ValueError, match="need"):
        bitpack.unpack_bits(np.zeros(1, np.uint8), 4, 3)


@pytest.mark.parametrize("n", [1, 7, 2048, 5000, 40000])
def test_rans_round_trip_and_cost_near_entropy(n):
    symbols = np.random.default_rng(n).choice(3, size=n, p=[0.2, 0.6, 0.2])
    parts = rans.encode(symbols, 3)
    assert np.array_equal(rans.decode(parts, n), symbols)
    if n >= 5000:
        counts = np.bincount(symbols, minlength=3) / n
        entropy = -(counts * np.log2(counts)).sum()
        bits = 8 * sum(p.nbytes for p in parts.values()) / n
        assert entropy <= bits <= entropy + 0.03


def test_rans_decode_many_matches_single_streams():
    rng = np.random.default_rng(1)
    symbols = [rng.choice(3, size=n, p=[0.3, 0.4, 0.3]) for n in (3, 4096, 9000)]
    streams = [(rans.encode(s, 3), s.size) for s in symbols]
    for decoded, original in zip(rans.decode_many(streams), symbols):
        assert np.array_equal(decoded, original)


def test_rans_decode_many_of_no_streams_is_empty():
    assert rans.decode_many([]) == []  # a model without a rANS-coded layer


def test_rans_detects_a_corrupt_stream():
    symbols = np.random.default_rng(2).choice(3, size=6000)
    parts = rans.encode(symbols, 3)
    parts["words"][10] ^= 0x40
    with pytest.raises(ValueError, match="corrupt"):
        rans.decode(parts, symbols.size)


# ---------------------------------------------------------------------------------------------
# ternary layers


@pytest.mark.parametrize("storage", ternary.STORAGES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_layouts_store_the_bitlinear_codes_exactly(storage, per_channel):
    w = torch.randn(24, 37)
    codes, scale = ops.quantize_ternary(w, per_channel)
    codec = Ternary(storage, per_channel)
    encoded = codec.encode(w)
    decoded_codes, decoded_scale = codec.codes_and_scale(encoded)
    assert torch.equal(decoded_codes, codes) and torch.equal(decoded_scale, scale)
    assert torch.equal(codec.decode(encoded), codes.float() * (scale[:, None] if per_channel else scale))
    scale_bytes = 4 * scale.numel()
    if storage == "2bit":
        assert encoded.nbytes == 24 * math.ceil(37 / 4) + scale_bytes
    if storage == "base3":
        assert encoded.nbytes == 24 * math.ceil(37 / 5) + scale_bytes


def test_ternary_entropy_coding_follows_the_entropy_of_the_codes():
    sparse = torch.randn(128, 256) * (torch.rand(128, 256) < 0.3)  # ~75 % zeros after quantisation
    assert ternary.smallest(sparse, False).params["storage"] == "rans"
    assert Ternary("rans").encode(sparse).bits_per_weight < 1.3 < Ternary("base3").encode(sparse).bits_per_weight
    balanced = torch.randint(-1, 2, (128, 256)).float()  # uniform trits: nothing to gain below log2(3)
    assert math.log2(3) < Ternary("rans").encode(balanced).bits_per_weight < 1.61


def test_ternary_rejects_a_vector():
    with pytest.raises(ValueError, match="linear weight"):
        Ternary().encode(torch.randn(8))


# ---------------------------------------------------------------------------------------------
# raw floats and round to nearest


def test_raw_float32_is_exact_and_float16_is_half_rounding():
    w = torch.randn(5, 7)
    assert torch.equal(Raw("float32").decode(Raw("float32").encode(w)), w)
    encoded = Raw("float16").encode(w)
    assert torch.equal(Raw("float16").decode(encoded), w.half().float()) and encoded.nbytes == 70


def test_rtn_hand_checked():
    codec = RoundToNearest(4)
    w = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    encoded = codec.encode(w)
    scale = torch.tensor(4 / 7).half().float()
    expected = torch.round(w / scale).clamp(-8, 7) * scale  # [2, -4, 1, 7] steps of 4/7
    assert torch.equal(codec.decode(encoded), expected)
    assert encoded.nbytes == 2 + 2  # four 4-bit codes, one fp16 scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_bits_per_weight(bits):
    encoded = RoundToNearest(bits).encode(torch.randn(16, 64))
    assert encoded.bits_per_weight == bits + 16 / 64


# ---------------------------------------------------------------------------------------------
# SeedLM


def test_lfsr_is_the_maximal_16_bit_register():
    assert seedlm.lfsr_step(0xACE1) == 0x5670  # the textbook x^16 + x^14 + x^13 + x^11 + 1 register
    cycle = seedlm.lfsr_cycle()
    assert len(cycle) == 65535 and len(np.unique(cycle)) == 65535 and cycle.min() == 1


def test_seedlm_basis_follows_the_seed_and_is_normalised():
    C, P, seed = 4, 2, 0xACE1
    states, state = [], seed
    for _ in range(C * P):
        state = seedlm.lfsr_step(state)
        states.append(state)
    expected = (torch.tensor(states, dtype=torch.float64) - 2**15) / (2**15 - 1)
    assert torch.allclose(seedlm.basis(np.array([seed]), C, P)[0], expected.float().reshape(C, P))


def test_seedlm_search_finds_an_exactly_representable_block():
    C, P = 8, 3
    seeds = np.array([12345, 777, 40000])
    mantissas = torch.tensor([[3.0, -5.0, 7.0], [-7.0, 2.0, 1.0], [4.0, 7.0, -3.0]])  # peak 7: exponent -3
    blocks = torch.einsum("bcp,bp->bc", seedlm.basis(seeds, C, P), mantissas * 2.0**-3)
    position, e, q = SeedLM(C, P).search(blocks)
    recon = torch.einsum(
        "bcp,bp->bc", seedlm.basis(seedlm.lfsr_cycle()[position.numpy()], C, P), q * torch.exp2(e.float())[:, None]
    )
    assert torch.allclose(recon, blocks, atol=1e-6)


@pytest.mark.parametrize(("C", "P", "bits"), [(8, 3, 4.0), (12, 4, 3.0)])
def test_seedlm_bits_and_decode_reproducible(C, P, bits):
    w = torch.randn(16, 48)
    codec = SeedLM(C, P)
    encoded = codec.encode(w)
    assert encoded.nbytes == math.ceil(w.numel() / C) * (2 + (4 + 4 * P) / 8) + 4
    assert abs(encoded.bits_per_weight - bits) < 0.05
    assert torch.equal(codec.decode(encoded), codec.decode(encoded))


@pytest.mark.parametrize(("seed_codec", "rtn_bits"), [(SeedLM(8, 3), 4), (SeedLM(12, 4), 3)])
def test_seedlm_beats_rtn_where_outliers_wreck_the_row_scale(seed_codec, rtn_bits):
    w = outlier_matrix()
    seed_error, seed_bits = relative_error(seed_codec, w)
    rtn_error, rtn_bits_measured = relative_error(RoundToNearest(rtn_bits), w)
    assert seed_bits < rtn_bits_measured and seed_error < rtn_error


def test_seedlm_does_not_beat_rtn_at_4_bits_on_gaussian_weights():
    """The published 4-bit operating point loses to per-row int4 on well-behaved weights
    (relative error ~0.125 vs ~0.118): recorded here so that the phase's choice is understood."""
    w = torch.randn(64, 128)
    assert relative_error(SeedLM(8, 3), w)[0] > relative_error(RoundToNearest(4), w)[0]


# ---------------------------------------------------------------------------------------------
# VPTQ and hyper-compression


@pytest.mark.parametrize(
    ("vq", "rtn_bits"),
    [(VPTQ(4, (256,), iterations=8), 2), (VPTQ(4, (256, 16), iterations=8), 3), (VPTQ(4, (256, 256), iterations=8), 4)],
)
def test_vptq_beats_rtn_at_similar_bits(vq, rtn_bits):
    w = torch.randn(1024, 128)
    vq_error, vq_bits = relative_error(vq, w)
    rtn_error, rtn_bits_measured = relative_error(RoundToNearest(rtn_bits), w)
    assert vq_bits <= rtn_bits_measured + 0.25 and vq_error < rtn_error  # codebooks: up to 0.25 bits here


def test_vptq_counts_its_codebooks():
    codec = VPTQ(4, (256,), iterations=2)
    encoded = codec.encode(torch.randn(32, 64))
    index_bytes, codebook_bytes, scale_bytes = 32 * 16 * 8 // 8, 256 * 4 * 2, 32 * 2
    assert encoded.nbytes == index_bytes + codebook_bytes + scale_bytes  # codebook larger than the indices


def test_vptq_importance_weighting_lowers_the_weighted_error():
    w = torch.randn(256, 32)
    importance = torch.ones_like(w)
    importance[:, :4] = 50.0  # four input columns carry most of the layer's input energy
    codec = VPTQ(4, (16,), iterations=10)

    def weighted(encoded):
        return float((importance * (codec.decode(encoded) - w).pow(2)).sum())

    assert weighted(codec.encode(w, importance)) < weighted(codec.encode(w))


def test_hyper_trajectory_and_bits():
    table = trajectory(255)
    assert table.shape == (256, 2) and table.abs().max() <= 1 and torch.equal(table[0], torch.zeros(2))
    assert len({tuple(p) for p in table.tolist()}) == 256
    encoded = Hyper(8, 1).encode(torch.randn(32, 64))
    assert encoded.nbytes == 32 * 64 // 2 + 16 and encoded.bits_per_weight == 4 + 128 / 2048


def test_hyper_error_falls_with_bits_and_beats_rtn_at_2_bits():
    w = torch.randn(128, 64)
    errors = [relative_error(Hyper(bits, 0), w)[0] for bits in (4, 6, 8)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] < relative_error(RoundToNearest(2), w)[0]


# ---------------------------------------------------------------------------------------------
# every codec: trainable view, settings, bad input

ALL_CODECS = [
    Raw("float16"),
    RoundToNearest(4),
    SeedLM(8, 3, top_k=4),
    VPTQ(4, (16, 4), iterations=2),
    Hyper(6, 1),
    Ternary("rans"),
]


@pytest.mark.parametrize("codec", ALL_CODECS, ids=lambda c: c.kind)
def test_trainable_view_starts_at_the_decoded_tensor_and_trains(codec):
    w = torch.randn(16, 24)
    encoded = codec.encode(w)
    view = codec.trainable(encoded)
    assert torch.allclose(view(), codec.decode(encoded), atol=1e-6)
    exported = view.export()
    assert torch.allclose(codec.decode(exported), codec.decode(encoded), atol=1e-3)
    loss = (view() - w).pow(2).sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in view.parameters())


@pytest.mark.parametrize("codec", ALL_CODECS, ids=lambda c: c.kind)
def test_codec_of_rebuilds_the_codec_from_its_record(codec):
    encoded = codec.encode(torch.randn(8, 16))
    assert type(codec_of(encoded)) is REGISTRY[codec.kind] and codec_of(encoded).settings() == codec.settings()


def test_bad_settings_and_unknown_codecs_fail_clearly():
    with pytest.raises(ValueError, match="unknown codec"):
        codec_of(Encoded("zip", {}, (1,), {}))
    with pytest.raises(ValueError, match="powers of two"):
        VPTQ(4, (100,))
    with pytest.raises(ValueError, match="P < C"):
        SeedLM(3, 3)
    with pytest.raises(ValueError, match="bits must be"):
        RoundToNearest(1)
    with pytest.raises(ValueError, match="rings"):
        Hyper(8, 2)
