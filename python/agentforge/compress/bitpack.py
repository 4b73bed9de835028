"""Fixed-width unsigned integers packed densely into bytes: ``n`` values of ``bits`` bits take
exactly ``ceil(n * bits / 8)`` bytes. Value ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of
the stream, least significant bit first, and the stream fills each byte from its lowest bit."""
from __future__ import annotations

import numpy as np

MAX_BITS = 32


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
    planes = (values.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The ``n`` values of ``bits`` bits stored in ``data`` by :func:`pack_bits`, as int64."""
    _check_bits(bits)
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size < packed_size(n, bits):
        raise ValueError(f"unpack_bits: {n} values of {bits} bits need {packed_size(n, bits)} bytes, got {data.size}")
    planes = np.unpackbits(data, count=n * bits, bitorder="little").reshape(n, bits).astype(np.int64)
    return planes @ (np.int64(1) << np.arange(bits, dtype=np.int64))
