"""Static range asymmetric numeral systems (rANS) for small alphabets, interleaved over lanes.

An order-0 entropy coder: the stream costs about ``n * H`` bits, H the empirical entropy of its
symbols, plus a small header (the frequency table and 4 bytes per lane). Ternary codes with
many zeros (H < log2 3) come out below the 1.6-bit base-3 packing; balanced ones do not, and
the caller keeps whichever is smaller.

Conventions (Duda's rANS with 32-bit state and 16-bit output words, as ryg_rans' "rans_word"):
frequencies quantised to sum to ``M = 2**PROB_BITS``; state ``x`` in ``[L, L * 2**16)`` with
``L = 2**16``; encoding symbol s with frequency f and cumulative frequency c maps
``x -> (x // f) * M + x % f + c`` after emitting the low 16 bits of x when ``x >= 2**20 * f``
(at most one word per symbol). Symbols are dealt round-robin to ``lanes`` independent coders
(symbol i to lane ``i % lanes``; the tail padded with the most frequent symbol) so that numpy
advances every lane in one vector step. All lanes share one word stream, stored in the order the
decoder reads it (step by step, lane by lane), so a lane needs no offset of its own; decoding
must consume exactly the stream and return every lane to state L, which catches corruption.
"""

from __future__ import annotations

import numpy as np

PROB_BITS = 12
M = 1 << PROB_BITS
L = 1 << 16
SYMBOLS_PER_LANE = 2048  # lanes = n // this (at least 1): a 4-byte lane state costs 0.016 bits/symbol


def quantized_frequencies(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to ``M``, proportional to ``counts``; every symbol that occurs keeps at
    least 1 (the largest absorbs the rounding)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() == 0:
        raise ValueError("rans: no symbols to code")
    if (counts > 0).sum() > M:
        raise ValueError(f"rans: at most {M} distinct symbols, got {(counts > 0).sum()}")
    freqs = np.where(counts > 0, np.maximum(1, np.floor(counts * M / counts.sum())), 0).astype(np.int64)
    freqs[np.argmax(freqs)] += M - freqs.sum()
    return freqs


def lane_count(n: int) -> int:
    return max(1, n // SYMBOLS_PER_LANE)


def _lane_matrix(symbols: np.ndarray, lanes: int, filler: int) -> np.ndarray:
    """[steps, lanes]: row t holds symbols t*lanes .. t*lanes + lanes - 1."""
    steps = -(-symbols.size // lanes)
    padded = np.full(steps * lanes, filler, dtype=np.int64)
    padded[: symbols.size] = symbols
    return padded.reshape(steps, lanes)


def encode(symbols: np.ndarray, alphabet: int) -> dict[str, np.ndarray]:
    """Code ``symbols`` (ints in ``[0, alphabet)``, at least one). Returns the parts a decoder
    needs: ``freqs`` uint16 [alphabet], ``states`` uint32 [lanes], ``words`` uint16."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError(f"rans.encode: symbols must lie in [0, {alphabet})")
    freqs = quantized_frequencies(np.bincount(symbols, minlength=alphabet))
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]])
    rows = _lane_matrix(symbols, lane_count(symbols.size), int(np.argmax(freqs)))
    x = np.full(rows.shape[1], L, dtype=np.uint64)
    emitted = []  # per step (in decoding order once reversed): the words of the lanes that renormalised
    for s in rows[::-1]:  # rANS encodes backwards, so the decoder reads forwards
        f, c = freqs[s].astype(np.uint64), starts[s].astype(np.uint64)
        emit = x >= (np.uint64(L >> PROB_BITS) << np.uint64(16)) * f
        emitted.append((x[emit] & np.uint64(0xFFFF)).astype(np.uint16))  # lane order within the step
        x = np.where(emit, x >> np.uint64(16), x)
        x = (x // f) * np.uint64(M) + x % f + c
    words = np.concatenate(emitted[::-1]) if emitted else np.zeros(0, np.uint16)
    return {"freqs": freqs.astype(np.uint16), "states": x.astype(np.uint32), "words": words}


def decode(parts: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The ``n`` symbols coded in ``parts`` (as returned by :func:`encode`), as int64. Raises
    ``ValueError`` when the parts are inconsistent (a corrupt stream)."""
    return decode_many([(parts, n)])[0]


def decode_many(streams: list[tuple[dict[str, np.ndarray], int]]) -> list[np.ndarray]:
    """Decode several streams at once: all their lanes advance in the same numpy step (one
    Python iteration per step of the longest stream instead of one per step of each), each lane
    with its stream's frequency table and word stream. No streams decode to no arrays (a model
    without a rANS-coded layer)."""
    if not streams:
        return []
    tables, states, words, lanes_of, steps, sizes = [], [], [], [], [], []
    for index, (parts, n) in enumerate(streams):
        freqs = parts["freqs"].astype(np.int64)
        lanes = parts["states"].size
        if freqs.sum() != M or lanes != lane_count(n):
            raise ValueError("rans.decode: the frequency table or the lane count does not fit the symbol count")
        starts = np.concatenate([[0], np.cumsum(freqs)[:-1]])
        symbol = np.repeat(np.arange(freqs.size), freqs)
        tables.append((symbol, freqs[symbol], starts[symbol]))
        states.append(parts["states"].astype(np.uint64))
        words.append(parts["words"].astype(np.uint64))
        lanes_of.append(np.full(lanes, index))
        steps.append(-(-n // lanes))
        sizes.append(n)
    symbol_of_slot = np.concatenate([t[0] for t in tables])  # row = stream * M + slot
    freq_of_slot = np.concatenate([t[1] for t in tables]).astype(np.uint64)
    start_of_slot = np.concatenate([t[2] for t in tables]).astype(np.uint64)
    stream = np.concatenate(lanes_of)
    base = stream * M
    first_lane = np.concatenate([[0], np.cumsum([s.size for s in states])[:-1]])
    word_start = np.concatenate([[0], np.cumsum([w.size for w in words])[:-1]])
    stream_words = np.concatenate(words + [np.zeros(max(s.size for s in states), np.uint64)])
    pointer = word_start.copy()  # next unread word of each stream
    x = np.concatenate(states)
    lane_steps = np.asarray(steps)[stream]
    out = np.zeros((max(steps), x.size), dtype=np.int64)
    for t in range(max(steps)):
        active = lane_steps > t
        slot = (x & np.uint64(M - 1)).astype(np.int64) + base
        out[t] = symbol_of_slot[slot]
        stepped = (
            freq_of_slot[slot] * (x >> np.uint64(PROB_BITS)) + (slot - base).astype(np.uint64) - start_of_slot[slot]
        )
        x = np.where(active, stepped, x)
        refill = active & (x < np.uint64(L))
        # a refilling lane reads its stream's next word; lanes of a stream read in lane order
        rank = np.cumsum(refill) - 1
        position = pointer[stream] + rank - (np.cumsum(refill)[first_lane] - refill[first_lane])[stream]
        x = np.where(refill, (x << np.uint64(16)) | stream_words[np.minimum(position, stream_words.size - 1)], x)
        pointer += np.bincount(stream, weights=refill, minlength=len(streams)).astype(np.int64)
    results = []
    for index, n in enumerate(sizes):
        columns = slice(first_lane[index], first_lane[index] + states[index].size)
        if pointer[index] != word_start[index] + words[index].size or np.any(x[columns] != np.uint64(L)):
            raise ValueError("rans.decode: the stream does not end where it should (corrupt data)")
        results.append(out[: steps[index], columns].reshape(-1)[:n])
    return results
