"""Fixed-width unsigned integers packed densely into bytes: ``n`` values of ``bits`` bits take
exactly ``ceil(n * bits / 8)`` bytes. Value ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of
the stream, least significant bit first, and the stream fills each byte from its lowest bit.

Both directions work in chunks of ``CHUNK`` values (a multiple of 8, so every chunk but the last
fills whole bytes): the bit planes of a chunk take ``bits`` bytes per value, which for a whole
28M-weight embedding at 8 bits would be 1.8 GB of int64 planes at once."""

from __future__ import annotations

import numpy as np

MAX_BITS = 32
CHUNK = 1 << 20  # values per chunk: planes of at most 32 MiB (uint8) at 32 bits


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` values of ``bits`` bits occupy."""
    return -(-n * bits // 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bitpack: bits must be an int in [1, {MAX_BITS}], got {bits!r}")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers below ``2**bits`` into a uint8 array (see the module docstring)."""
    _check_bits(bits)
    values = np.asarray(values).reshape(-1)
    if values.size and (values.min() < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"pack_bits: values must lie in [0, 2**{bits}), got [{values.min()}, {values.max()}]")
    out = np.empty(packed_size(values.size, bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint64)
    for start in range(0, values.size, CHUNK):
        chunk = values[start : start + CHUNK].astype(np.uint64)
        planes = ((chunk[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        first = start * bits // 8  # whole bytes: start is a multiple of 8
        packed = np.packbits(planes.reshape(-1), bitorder="little")
        out[first : first + packed.size] = packed
    return out


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The ``n`` values of ``bits`` bits stored in ``data`` by :func:`pack_bits`, as int64."""
    _check_bits(bits)
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size < packed_size(n, bits):
        raise ValueError(f"unpack_bits: {n} values of {bits} bits need {packed_size(n, bits)} bytes, got {data.size}")
    out = np.empty(n, dtype=np.int64)
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        first = start * bits // 8
        chunk = data[first : first + packed_size(count, bits)]
        planes = np.unpackbits(chunk, count=count * bits, bitorder="little").reshape(count, bits)
        out[start : start + count] = planes @ weights
    return out
