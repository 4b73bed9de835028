"""Storage formats (canonical 2-bit, base-3) and the kernels' prepacked tensors (header and
2bit/base3 payloads): exact agreement with the reference, round trips, hand-computed bytes,
layouts and opcheck. Corrupt and mis-sized inputs are in test_bad_input.py."""

import pytest
import torch
from torch.library import opcheck

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import LAYOUTS, ODD_K, PREPACK_LAYOUTS, assert_same, make_layout, random_codes

# (N, K): K = 0, single element, every K class, base3 block edges and N across row tiles of 8
# (N = 0 is in test_bad_input.py).
PACK_SHAPES = [(3, 0), (1, 1), (2, 4), (4, 64), (4, 128), (5, 512), (8, 160), (16, 161), (23, 320)] + [
    (n, k) for n, k in zip((1, 3, 5, 17, 6, 7, 2, 9), ODD_K)
]
# name -> (pack, unpack, bytes per row for K): the two storage formats share their tests.
FORMATS = {
    "2bit": (ops.pack_ternary, ops.unpack_ternary, ref.pack_ternary, ref.unpack_ternary, lambda K: -(-K // 4)),
    "base3": (
        ops.pack_ternary_base3,
        ops.unpack_ternary_base3,
        ref.pack_ternary_base3,
        ref.unpack_ternary_base3,
        lambda K: -(-K // 5),
    ),
}


def prepacked_bytes_per_row(K: int, layout: str) -> int:
    """prepacked.h: blocks of 128 (2bit) or 160 (base3) weights in 32 bytes, at least the 32-byte
    header; one more byte for base3."""
    return max(-(-K // {"2bit": 128, "base3": 160}[layout]) * 32, 32) + (layout == "base3")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N, K", PACK_SHAPES)
def test_storage_format_matches_reference_and_round_trips(fmt, N, K):
    pack, unpack, ref_pack, ref_unpack, row_bytes = FORMATS[fmt]
    codes = random_codes(N, K)
    packed = pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (N, row_bytes(K))
    assert_same(packed, ref_pack(codes))
    assert_same(unpack(packed, K), codes)
    assert_same(ref_unpack(packed, K), codes)


@pytest.mark.parametrize("layout", PREPACK_LAYOUTS)
@pytest.mark.parametrize("N, K", PACK_SHAPES)
def test_prepack_matches_reference_and_round_trips(N, K, layout):
    packed = ops.pack_ternary(random_codes(N, K))
    pre = ops.prepack_ternary(packed, K, layout)
    assert pre.dtype == torch.uint8 and pre.shape == (N + 1, prepacked_bytes_per_row(K, layout))
    assert_same(pre, ref.prepack_ternary(packed, K, layout))
    assert ops.prepacked_info(pre) == {"N": N, "K": K, "layout": layout, "tile_rows": 8, "version": 2}
    assert_same(ops.unprepack_ternary(pre, K), packed)
    assert_same(ref.unprepack_ternary(pre, K), packed)


def test_prepack_without_k_takes_every_canonical_code():
    # The canonical rows do not record K: by default all 4 codes of every byte are weights.
    packed = ops.pack_ternary(random_codes(3, 6))
    assert ops.prepacked_info(ops.prepack_ternary(packed))["K"] == 8
    assert_same(ops.unprepack_ternary(ops.prepack_ternary(packed), 8), packed)


def test_prepack_header_known_bytes():
    # prepacked.h: "AFTW", version 2, layout 1 (2bit), tile 8, N and K little-endian, FNV-1a of bytes 0..27.
    head = ops.prepack_ternary(ops.pack_ternary(random_codes(3, 5)), 5)[-1].tolist()
    assert head[:8] == [65, 70, 84, 87, 2, 1, 8, 0]
    assert head[8:16] == [3, 0, 0, 0, 0, 0, 0, 0] and head[16:24] == [5, 0, 0, 0, 0, 0, 0, 0]
    h = 2166136261
    for b in head[:28]:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    assert head[28:32] == list(h.to_bytes(4, "little"))


@pytest.mark.parametrize("q", range(243))
def test_base3_payload_byte_decodes_to_its_five_codes(q):
    # kernels.h: byte = ceil(256 q / 243) for q = sum_s c_s 3^(4-s); c_s = floor(3 m_s / 256), m -> 3 m mod 256.
    codes = [q // 3 ** (4 - s) % 3 for s in range(5)]
    byte = -(-256 * q // 243)
    m, decoded = byte, []
    for _ in range(5):
        m *= 3
        decoded.append(m >> 8)
        m &= 255
    assert decoded == codes
    block = torch.tensor(codes, dtype=torch.int8)[:, None].expand(5, 32).reshape(1, 160) - 1
    assert ops.prepack_ternary(ops.pack_ternary(block), 160, "base3")[0, 0].item() == byte


def test_pack_ternary_known_bytes():
    # code = w + 1, first element in the lowest two bits, tail padded with code 1:
    # [-1, 0, 1, 1] -> 0 | 1<<2 | 2<<4 | 2<<6 = 164; [-1, pad, pad, pad] -> 0 | 1<<2 | 1<<4 | 1<<6 = 84
    codes = torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)
    assert ops.pack_ternary(codes).tolist() == [[164, 84]]


def test_pack_ternary_base3_known_bytes():
    # byte = sum c_i 3^i: [0,1,2,2,0] -> 3 + 18 + 54 = 75; [2, pad x4] -> 2 + 3 + 9 + 27 + 81 = 122
    codes = torch.tensor([[-1, 0, 1, 1, -1, 1]], dtype=torch.int8)
    assert ops.pack_ternary_base3(codes).tolist() == [[75, 122]]


@pytest.mark.parametrize("N, K", [(1, 4), (6, 300), (9, 129), (19, 200)])
def test_prepack_follows_documented_layout(N, K):
    # An independent oracle for the layout stated in csrc/cpu/kernels.h (the reference builds it
    # with tensor reshapes): from byte 0, row n, block kb lives at
    # (n - r)*KB*32 + (kb*rows_in_tile + r)*32, r = n % 8, and byte j of a block holds element
    # 32*s + j of it in bits 2s..2s+1.
    codes = random_codes(N, K)
    pre = ops.prepack_ternary(ops.pack_ternary(codes), K)
    flat = pre.flatten().tolist()
    KB = prepacked_bytes_per_row(K, "2bit") // 32
    for n in range(N):
        r = n % 8
        rows_in_tile = min(8, N - (n - r))
        for k in range(KB * 128):
            kb, e = divmod(k, 128)
            s, j = divmod(e, 32)
            byte = flat[(n - r) * KB * 32 + (kb * rows_in_tile + r) * 32 + j]
            expected = codes[n, k].item() + 1 if k < K else 1
            assert (byte >> (2 * s)) & 3 == expected, (n, k)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_ops_ignore_memory_layout(layout):
    codes = random_codes(7, 300)
    packed, packed5 = ops.pack_ternary(codes), ops.pack_ternary_base3(codes)
    assert_same(ops.pack_ternary(make_layout(codes, layout)), packed)
    assert_same(ops.pack_ternary_base3(make_layout(codes, layout)), packed5)
    assert_same(ops.unpack_ternary(make_layout(packed, layout), 300), codes)
    assert_same(ops.unpack_ternary_base3(make_layout(packed5, layout), 300), codes)
    for prepack_layout in PREPACK_LAYOUTS:
        pre = ops.prepack_ternary(make_layout(packed, layout), 300, prepack_layout)
        assert_same(pre, ops.prepack_ternary(packed, 300, prepack_layout))
        assert_same(ops.unprepack_ternary(make_layout(pre, layout), 300), packed)


@pytest.mark.parametrize(
    "op, make_args",
    [
        ("pack_ternary", lambda: (random_codes(5, 129),)),
        ("unpack_ternary", lambda: (ops.pack_ternary(random_codes(5, 129)), 129)),
        ("pack_ternary_base3", lambda: (random_codes(5, 129),)),
        ("unpack_ternary_base3", lambda: (ops.pack_ternary_base3(random_codes(5, 129)), 129)),
        ("prepack_ternary", lambda: (ops.pack_ternary(random_codes(5, 129)),)),
        ("prepack_ternary", lambda: (ops.pack_ternary(random_codes(5, 129)), 129, "base3")),
        ("unprepack_ternary", lambda: (ops.prepack_ternary(ops.pack_ternary(random_codes(5, 129)), 129), 129)),
        ("unprepack_ternary", lambda: (ops.prepack_ternary(ops.pack_ternary(random_codes(9, 300)), 300, "base3"), 300)),
    ],
)
def test_opcheck_pack_ops(op, make_args):
    opcheck(getattr(torch.ops.agentforge, op).default, make_args())
