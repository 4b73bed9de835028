"""The compressed-model container: one file, every byte accounted for.

Layout (little-endian)::

    offset 0   4 bytes   magic b"AFZC"
           4   u32       format version (1)
           8   u64       m = length of the manifest
          16   m bytes   manifest: zlib-compressed UTF-8 JSON (below)
      16 + m   p bytes   payload: every tensor part and carried file, back to back
  16 + m + p   32 bytes  sha256 of all the bytes before it

Manifest::

    {"format": "agentforge.compress", "version": 1, "payload_bytes": p,
     "tensors": [{"names": [state-dict names sharing this tensor], "group": "ternary" | "embedding"
                  | "lm_head" | "rest", "codec": kind, "params": {...}, "shape": [...],
                  "parts": [[part, numpy dtype, shape, offset, length], ...]}, ...],
     "files": [[relative path, "raw" | "lzma", offset, length, original length], ...],
     "metadata": {...}}

Offsets are relative to the payload start. ``read_container`` checks the magic, the lengths
(a truncated file is named as such), the checksum, and that every part lies inside the payload
with the length its dtype and shape need; any failure raises ``CorruptArtifact`` in one line.

Nothing is inflated beyond a bound fixed before inflating, so a small hostile file cannot make a
reader allocate gigabytes (a 312 KB file once carried a 2 GiB lzma stream): the manifest inflates
to at most ``MAX_MANIFEST_BYTES``; a carried file to exactly its declared original length, which
may be at most ``MAX_INFLATION`` times its stored length, and all of them together at most that
times the container's size; and the tensors may hold at most ``MAX_WEIGHTS_PER_BYTE`` weights per
byte of the container (the loader decodes every one). ``serialize`` never writes what these refuse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from agentforge.artifacts import CorruptArtifact, atomic_write_bytes
from agentforge.compress.codec import Encoded

MAGIC = b"AFZC"
VERSION = 1
HEADER = struct.Struct("<4sIQ")
DIGEST_BYTES = 32
PART_DTYPES = ("uint8", "uint16", "uint32", "int64", "float16", "float32")
GROUPS = ("ternary", "embedding", "lm_head", "rest")
# A real manifest is ~0.3 KB of JSON per tensor (80 KB for a 272-tensor model); 8 MiB of JSON
# parses in well under a second into at most a few hundred MB of Python objects.
MAX_MANIFEST_BYTES = 8 << 20
# lzma shrinks a tokenizer.json ~8x and safetensors ~1.2x; a larger ratio is stored raw.
MAX_INFLATION = 64
# Real containers hold 2-7 weights per byte (ternary codes take >= 1 bit each unless a layer is
# almost constant); decoding takes up to 8 bytes per weight (rANS symbols as int64).
MAX_WEIGHTS_PER_BYTE = 64


@dataclass
class TensorRecord:
    """A stored tensor: every state-dict name it is saved under (tied weights share one record)."""

    names: list[str]
    group: str
    encoded: Encoded


@dataclass
class Container:
    tensors: list[TensorRecord]
    files: dict[str, bytes] = field(default_factory=dict)  # carried verbatim (tokenizer, config, extras)
    metadata: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=16)  # the same tokenizer is serialised once per attempt and sweep point
def _file_entry(data: bytes) -> tuple[str, bytes]:
    """Carried files are stored lzma-compressed when that is smaller (tokenizer.json shrinks ~8x)
    and inflates at most ``MAX_INFLATION`` times (what a reader accepts)."""
    packed = lzma.compress(data, preset=9)
    return ("lzma", packed) if len(packed) < len(data) <= MAX_INFLATION * len(packed) else ("raw", data)


def serialize(container: Container) -> tuple[bytes, dict]:
    """The container's bytes and their accounting: ``{"header", "manifest", "files" (stored bytes
    of all carried files), "file_bytes" (per file), "tensors": [bytes per record], "trailer",
    "total"}``."""
    payload, tensors, files = [], [], []
    offset = 0
    for record in container.tensors:
        if record.group not in GROUPS:
            raise ValueError(f"container: group must be one of {GROUPS}, got {record.group!r}")
        parts = []
        for name, array in record.encoded.parts.items():
            array = np.ascontiguousarray(array)
            if array.dtype.name not in PART_DTYPES:
                raise ValueError(f"container: part {name!r} of {record.names[0]} has dtype {array.dtype}")
            parts.append([name, array.dtype.name, list(array.shape), offset, array.nbytes])
            payload.append(array.tobytes())
            offset += array.nbytes
        tensors.append(
            {
                "names": list(record.names),
                "group": record.group,
                "codec": record.encoded.kind,
                "params": record.encoded.params,
                "shape": list(record.encoded.shape),
                "parts": parts,
            }
        )
    file_bytes = {}
    for name, data in sorted(container.files.items()):
        method, stored = _file_entry(data)
        files.append([name, method, offset, len(stored), len(data)])
        payload.append(stored)
        offset += len(stored)
        file_bytes[name] = len(stored)
    manifest = {
        "format": "agentforge.compress",
        "version": VERSION,
        "payload_bytes": offset,
        "tensors": tensors,
        "files": files,
        "metadata": container.metadata,
    }
    text = json.dumps(manifest, separators=(",", ":")).encode()
    if len(text) > MAX_MANIFEST_BYTES:
        raise ValueError(
            f"container: the manifest is {len(text)} bytes of JSON, more than a reader accepts ({MAX_MANIFEST_BYTES})"
        )
    manifest_bytes = zlib.compress(text, 9)
    body = HEADER.pack(MAGIC, VERSION, len(manifest_bytes)) + manifest_bytes + b"".join(payload)
    data = body + hashlib.sha256(body).digest()
    weights = sum(record.encoded.numel for record in container.tensors)
    if weights > MAX_WEIGHTS_PER_BYTE * len(data):
        raise ValueError(
            f"container: {weights} weights in {len(data)} bytes, more than a reader accepts "
            f"({MAX_WEIGHTS_PER_BYTE} per byte)"
        )
    accounting = {
        "header": HEADER.size,
        "manifest": len(manifest_bytes),
        "files": sum(file_bytes.values()),
        "file_bytes": file_bytes,
        "tensors": [record.encoded.nbytes for record in container.tensors],
        "trailer": DIGEST_BYTES,
        "total": len(data),
    }
    return data, accounting


def write_container(path: str | os.PathLike, container: Container) -> dict:
    """Write ``container`` to ``path`` atomically; returns the byte accounting of :func:`serialize`."""
    data, accounting = serialize(container)
    atomic_write_bytes(path, data)
    return accounting


def _manifest(data: bytes, where: str) -> tuple[dict, int]:
    if len(data) < HEADER.size + DIGEST_BYTES:
        raise CorruptArtifact(f"{where}: truncated ({len(data)} bytes, shorter than any container)")
    magic, version, manifest_length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptArtifact(f"{where}: not an agentforge compressed model (magic {magic!r})")
    if version != VERSION:
        raise CorruptArtifact(f"{where}: container version {version}, this agentforge reads version {VERSION}")
    start = HEADER.size + manifest_length
    if start + DIGEST_BYTES > len(data):
        raise CorruptArtifact(f"{where}: truncated ({len(data)} bytes; the manifest alone needs {start})")
    text = _inflate(zlib.decompressobj(), data[HEADER.size : start], MAX_MANIFEST_BYTES, "the manifest", where)
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CorruptArtifact(f"{where}: the manifest is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise CorruptArtifact(f"{where}: the manifest is a JSON {type(manifest).__name__}, not an object")
    payload_bytes = manifest.get("payload_bytes")
    if not _is_count(payload_bytes):
        raise CorruptArtifact(f"{where}: the manifest's payload_bytes is {payload_bytes!r}, not a byte count")
    expected = start + payload_bytes + DIGEST_BYTES
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise CorruptArtifact(f"{where}: {state} ({len(data)} bytes, the manifest says {expected})")
    return manifest, start


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _inflate(decompressor, stored: bytes, limit: int, what: str, where: str) -> bytes:
    """``stored`` inflated by ``decompressor`` (zlib or lzma), never to more than ``limit``
    bytes; the stream must end within them."""
    try:
        data = decompressor.decompress(stored, limit + 1)
    except (zlib.error, lzma.LZMAError) as e:
        raise CorruptArtifact(f"{where}: {what} does not decompress ({e})") from None
    if len(data) > limit:
        raise CorruptArtifact(f"{where}: {what} inflates to more than {limit} bytes")
    if not decompressor.eof:
        raise CorruptArtifact(f"{where}: {what} is a truncated compressed stream")
    return data


def _check_span(offset: int, length: int, payload: int, what: str, where: str) -> None:
    if not (_is_count(offset) and _is_count(length) and offset + length <= payload):
        raise CorruptArtifact(f"{where}: {what} lies outside the payload")


def _numel(shape, what: str, where: str) -> int:
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CorruptArtifact(f"{where}: {what} has shape {shape!r}, not a list of sizes")
    return math.prod(shape)


def _part(payload: memoryview, entry: list, where: str) -> tuple[str, np.ndarray]:
    name, dtype, shape, offset, length = entry
    if dtype not in PART_DTYPES:
        raise CorruptArtifact(f"{where}: part {name!r} has unknown dtype {dtype!r}")
    _check_span(offset, length, len(payload), f"part {name!r}", where)
    needed = _numel(shape, f"part {name!r}", where) * np.dtype(dtype).itemsize
    if length != needed:
        raise CorruptArtifact(f"{where}: part {name!r} is {length} bytes, {dtype} {shape} needs {needed}")
    return name, np.frombuffer(payload[offset : offset + length], dtype=dtype).reshape(shape).copy()


def _file(payload: memoryview, entry: list, where: str) -> tuple[str, bytes]:
    """A carried file, inflated to its declared length (checked by :func:`_check_inflation` first)."""
    name, method, offset, length, original = entry
    stored = bytes(payload[offset : offset + length])
    data = stored if method == "raw" else _inflate(lzma.LZMADecompressor(), stored, original, f"file {name!r}", where)
    if len(data) != original:
        raise CorruptArtifact(f"{where}: file {name!r} ({method}) has {len(data)} bytes, expected {original}")
    return name, data


def _check_files(entries: list, payload: int, size: int, where: str) -> None:
    """Every carried file's entry before any is inflated: a safe name, a span inside the payload,
    a known method, and declared lengths within ``MAX_INFLATION`` of what is stored (``size``:
    the container's bytes, which bound them all together)."""
    total = 0
    for name, method, offset, length, original in entries:
        if not isinstance(name, str) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise CorruptArtifact(f"{where}: carried file name {name!r} points outside the model directory")
        _check_span(offset, length, payload, f"file {name!r}", where)
        if method not in ("raw", "lzma") or not _is_count(original):
            raise CorruptArtifact(f"{where}: file {name!r} has method {method!r} and length {original!r}")
        if original > MAX_INFLATION * length:
            raise CorruptArtifact(
                f"{where}: file {name!r} declares {original} bytes stored in {length}, more than {MAX_INFLATION}x"
            )
        total += original
    if total > MAX_INFLATION * size:
        raise CorruptArtifact(f"{where}: the carried files declare {total} bytes in a {size}-byte container")


def parse(data: bytes, where: str = "container") -> Container:
    """The Container stored in ``data``; ``CorruptArtifact`` (one line, naming ``where``) when the
    bytes are truncated, changed or inconsistent."""
    manifest, start = _manifest(data, where)
    if hashlib.sha256(data[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]:
        raise CorruptArtifact(f"{where}: checksum mismatch (the file was changed or damaged after it was written)")
    payload = memoryview(data)[start : len(data) - DIGEST_BYTES]
    try:
        weights = sum(_numel(entry["shape"], "a tensor", where) for entry in manifest["tensors"])
        if weights > MAX_WEIGHTS_PER_BYTE * len(data):
            raise CorruptArtifact(f"{where}: the tensors declare {weights} weights in a {len(data)}-byte container")
        _check_files(manifest["files"], len(payload), len(data), where)
        tensors = [
            TensorRecord(
                entry["names"],
                entry["group"],
                Encoded(
                    entry["codec"],
                    entry["params"],
                    tuple(entry["shape"]),
                    dict(_part(payload, part, where) for part in entry["parts"]),
                ),
            )
            for entry in manifest["tensors"]
        ]
        files = dict(_file(payload, entry, where) for entry in manifest["files"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptArtifact(f"{where}: the manifest is malformed ({type(e).__name__}: {e})") from None
    return Container(tensors, files, manifest.get("metadata", {}))


def read_container(path: str | os.PathLike) -> Container:
    """Read and verify the container at ``path`` (see :func:`parse`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptArtifact(f"{path}: cannot read the compressed model ({e.strerror})") from None
    return parse(data, str(path))
