"""Storage formats (canonical 2-bit, base-3) and the kernels' prepacked layout: exact
agreement with the reference, round trips, hand-computed bytes, layouts and opcheck.
Corrupt and mis-sized inputs are in test_bad_input.py."""
import pytest
import torch
from torch.library import opcheck

import agentforge.ops as ops
from agentforge.ops import reference as ref
from helpers import LAYOUTS, ODD_K, assert_same, make_layout, random_codes

# (N, K): K = 0, single element, every K class, and N across row tiles of 4 (N = 0 is in
# test_bad_input.py: the reference cannot take it).
PACK_SHAPES = [(3, 0), (1, 1), (2, 4), (4, 64), (4, 128), (5, 512)] + \
              [(n, k) for n, k in zip((1, 3, 5, 17, 6, 7, 2, 9), ODD_K)]
# name -> (pack, unpack, bytes per row for K): the two storage formats share their tests.
FORMATS = {
    "2bit": (ops.pack_ternary, ops.unpack_ternary, ref.pack_ternary, ref.unpack_ternary, lambda K: -(-K // 4)),
    "base3": (ops.pack_ternary_base3, ops.unpack_ternary_base3, ref.pack_ternary_base3, ref.unpack_ternary_base3,
              lambda K: -(-K // 5)),
}


def prepacked_bytes_per_row(K: int) -> int:
    """kernels.h: K is padded to the canonical bytes' 4 codes, then to blocks of 128 codes in 32 bytes."""
    return -(-(-(-K // 4) * 4) // 128) * 32


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


@pytest.mark.parametrize("N, K", PACK_SHAPES)
def test_prepack_matches_reference_and_round_trips(N, K):
    packed = ops.pack_ternary(random_codes(N, K))
    pre = ops.prepack_ternary(packed)
    assert pre.dtype == torch.uint8 and pre.shape == (N, prepacked_bytes_per_row(K))
    assert_same(pre, ref.prepack_ternary(packed))
    assert_same(ops.unprepack_ternary(pre, K), packed)
    assert_same(ref.unprepack_ternary(pre, K), packed)


def test_pack_ternary_known_bytes():
    # code = w + 1, first element in the lowest two bits, tail padded with code 1:
    # [-1, 0, 1, 1] -> 0 | 1<<2 | 2<<4 | 2<<6 = 164; [-1, pad, pad, pad] -> 0 | 1<<2 | 1<<4 | 1<<6 = 84
    codes = torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)
    assert ops.pack_ternary(codes).tolist() == [[164, 84]]


def test_pack_ternary_base3_known_bytes():
    # byte = sum c_i 3^i: [0,1,2,2,0] -> 3 + 18 + 54 = 75; [2, pad x4] -> 2 + 3 + 9 + 27 + 81 = 122
    codes = torch.tensor([[-1, 0, 1, 1, -1, 1]], dtype=torch.int8)
    assert ops.pack_ternary_base3(codes).tolist() == [[75, 122]]


@pytest.mark.parametrize("N, K", [(1, 4), (6, 300), (9, 129)])
def test_prepack_follows_documented_layout(N, K):
    # An independent oracle for the layout stated in csrc/cpu/kernels.h (the reference builds it
    # with tensor reshapes): row n, block kb lives at (n - r)*KB*32 + (kb*rows_in_tile + r)*32,
    # r = n % 4, and byte j of a block holds element 32*s + j of it in bits 2s..2s+1.
    codes = random_codes(N, K)
    flat = ops.prepack_ternary(ops.pack_ternary(codes)).flatten().tolist()
    KB = prepacked_bytes_per_row(K) // 32
    for n in range(N):
        r = n % 4
        rows_in_tile = min(4, N - (n - r))
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
    pre = ops.prepack_ternary(make_layout(packed, layout))
    assert_same(pre, ops.prepack_ternary(packed))
    assert_same(ops.unprepack_ternary(make_layout(pre, layout), 300), packed)


@pytest.mark.parametrize("op, make_args", [
    ("pack_ternary", lambda: (random_codes(5, 129),)),
    ("unpack_ternary", lambda: (ops.pack_ternary(random_codes(5, 129)), 129)),
    ("pack_ternary_base3", lambda: (random_codes(5, 129),)),
    ("unpack_ternary_base3", lambda: (ops.pack_ternary_base3(random_codes(5, 129)), 129)),
    ("prepack_ternary", lambda: (ops.pack_ternary(random_codes(5, 129)),)),
    ("unprepack_ternary", lambda: (ops.prepack_ternary(ops.pack_ternary(random_codes(5, 129))), 129)),
])
def test_opcheck_pack_ops(op, make_args):
    opcheck(getattr(torch.ops.agentforge, op).default, make_args())
