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
    """Carried files are stored lzma-compressed when that is smaller (tokenizer.json shrinks ~4x)."""
    packed = lzma.compress(data, preset=9)
    return ("lzma", packed) if len(packed) < len(data) else ("raw", data)


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
        tensors.append({"names": list(record.names), "group": record.group, "codec": record.encoded.kind,
                        "params": record.encoded.params, "shape": list(record.encoded.shape), "parts": parts})
    file_bytes = {}
    for name, data in sorted(container.files.items()):
        method, stored = _file_entry(data)
        files.append([name, method, offset, len(stored), len(data)])
        payload.append(stored)
        offset += len(stored)
        file_bytes[name] = len(stored)
    manifest = {"format": "agentforge.compress", "version": VERSION, "payload_bytes": offset,
                "tensors": tensors, "files": files, "metadata": container.metadata}
    manifest_bytes = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    body = HEADER.pack(MAGIC, VERSION, len(manifest_bytes)) + manifest_bytes + b"".join(payload)
    data = body + hashlib.sha256(body).digest()
    accounting = {"header": HEADER.size, "manifest": len(manifest_bytes), "files": sum(file_bytes.values()),
                  "file_bytes": file_bytes,
                  "tensors": [record.encoded.nbytes for record in container.tensors],
                  "trailer": DIGEST_BYTES, "total": len(data)}
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
    try:
        manifest = json.loads(zlib.decompress(data[HEADER.size:start]))
    except (zlib.error, ValueError) as e:
        raise CorruptArtifact(f"{where}: the manifest is unreadable ({e})") from None
    expected = start + int(manifest.get("payload_bytes", -1)) + DIGEST_BYTES
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise CorruptArtifact(f"{where}: {state} ({len(data)} bytes, the manifest says {expected})")
    return manifest, start


def _check_span(offset: int, length: int, payload: int, what: str, where: str) -> None:
    if not (0 <= offset and 0 <= length and offset + length <= payload):
        raise CorruptArtifact(f"{where}: {what} lies outside the payload")


def _part(payload: memoryview, entry: list, where: str) -> tuple[str, np.ndarray]:
    name, dtype, shape, offset, length = entry
    if dtype not in PART_DTYPES:
        raise CorruptArtifact(f"{where}: part {name!r} has unknown dtype {dtype!r}")
    _check_span(offset, length, len(payload), f"part {name!r}", where)
    if length != math.prod(shape) * np.dtype(dtype).itemsize:
        raise CorruptArtifact(f"{where}: part {name!r} is {length} bytes, {dtype} {shape} needs "
                              f"{math.prod(shape) * np.dtype(dtype).itemsize}")
    return name, np.frombuffer(payload[offset:offset + length], dtype=dtype).reshape(shape).copy()


def _file(payload: memoryview, entry: list, where: str) -> tuple[str, bytes]:
    name, method, offset, length, original = entry
    if not isinstance(name, str) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise CorruptArtifact(f"{where}: carried file name {name!r} points outside the model directory")
    _check_span(offset, length, len(payload), f"file {name!r}", where)
    stored = bytes(payload[offset:offset + length])
    try:
        data = lzma.decompress(stored) if method == "lzma" else stored
    except lzma.LZMAError as e:
        raise CorruptArtifact(f"{where}: file {name!r} does not decompress ({e})") from None
    if method not in ("raw", "lzma") or len(data) != original:
        raise CorruptArtifact(f"{where}: file {name!r} ({method}) has {len(data)} bytes, expected {original}")
    return name, data


def parse(data: bytes, where: str = "container") -> Container:
    """The Container stored in ``data``; ``CorruptArtifact`` (one line, naming ``where``) when the
    bytes are truncated, changed or inconsistent."""
    manifest, start = _manifest(data, where)
    if hashlib.sha256(data[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]:
        raise CorruptArtifact(f"{where}: checksum mismatch (the file was changed or damaged after it was written)")
    payload = memoryview(data)[start:len(data) - DIGEST_BYTES]
    try:
        tensors = [TensorRecord(entry["names"], entry["group"],
                                Encoded(entry["codec"], entry["params"], tuple(entry["shape"]),
                                        dict(_part(payload, part, where) for part in entry["parts"])))
                   for entry in manifest["tensors"]]
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
