"""Files and directories that are either complete or absent, and model directories that can
prove they are the ones that were written.

Every write goes to a hidden temp name next to its target, is fsync'ed, then renamed into place
(a rename within one directory is atomic on POSIX), so a crash at any moment, `kill -9`
included, leaves either the old version or the new one, never a mixture. Temp names start with
a dot and contain ``.tmp-``, so no reader ever mistakes a half-written directory for a complete one.

A model that crosses a phase boundary is a Hugging Face model directory plus ``agentforge.json``
(the phase's metadata and the sha256 of every file); ``load_model_dir`` refuses a directory whose
files do not match it.
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "agentforge.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class CorruptArtifact(RuntimeError):
    """An artifact on disk is incomplete or differs from what was written."""


class DiskFull(OSError):
    """A write failed because the file system ran out of space."""


# Pickle files run code when loaded; agentforge reads weights from safetensors only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Config fields that size a model: none may exceed what the stored weights hold.
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size")
LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "num_prelude_layers", "num_core_layers")
_LOW_SPACE = 16 << 20  # bytes: below this, a failed write is taken for a full disk


def _disk_full(path: Path, error: BaseException) -> DiskFull | None:
    """A ``DiskFull`` that names where and how much is free, when ``error`` (an OSError with
    ENOSPC/EDQUOT, or a library's error while the disk is nearly full) came from a full disk."""
    import errno

    target = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(target).free
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or free < _LOW_SPACE:
        return DiskFull(
            errno.ENOSPC,
            f"the disk holding {target} is full ({free / 2**20:.1f} MiB free) while "
            f"writing {path}; free some space, then resume",
        )
    return None


# ---------------------------------------------------------------------------------------------
# atomic files


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    # Hidden, and never the name of a complete file: ".NAME.tmp-PID-RANDOM".
    return f".{path.name}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_dead_temps(path: Path) -> None:
    """Delete temp files and directories for ``path`` left by writers that died (``kill -9``)."""
    prefix = _temp_prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are ordinary readable files
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = _disk_full(path, e) if isinstance(e, Exception) else None
        if full is not None:
            raise full from e
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON; raises ``TypeError`` before touching the disk if it cannot."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# atomic directories


def _backup_path(path: Path) -> Path:
    # Where the previous version waits during a replacement; a fixed name, so recovery finds it.
    return path.with_name(f".{path.name}.old")


def recover_directory(path: str | os.PathLike) -> None:
    """Finish or undo a directory replacement that a crash interrupted, and remove dead writers'
    temp directories. Safe to call any time no writer is active; ``atomic_directory`` calls it."""
    path = Path(path)
    backup = _backup_path(path)
    if backup.exists():
        if path.exists():
            shutil.rmtree(backup)  # the new version made it in; the old one is garbage
        else:
            os.replace(backup, path)  # crashed between the two renames: the old one is the latest complete one
            _fsync_dir(path.parent)
    _remove_dead_temps(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` to ``path``; an existing ``path`` is moved aside first and deleted
    last, so some complete version exists at every moment (``recover_directory`` restores it)."""
    backup = _backup_path(path)
    if path.exists():
        os.replace(path, backup)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory next to ``path``; fill it. On normal exit its files are fsync'ed
    and it replaces ``path``. On an exception it is removed and a previous ``path`` is untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            recover_directory(path)  # a failure between the swap's two renames: put the old one back
        full = _disk_full(path, e) if isinstance(e, Exception) else None
        if full is not None:
            raise full from e
        raise


# ---------------------------------------------------------------------------------------------
# hashes


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(path: str | os.PathLike) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` for every file under ``path``, sorted by path. Hidden
    entries (``.DS_Store``, editor swap files, temp names) are not part of an artifact."""
    root = Path(path)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def verify_hashes(root: str | os.PathLike, expected: dict[str, str], *, ignore: tuple[str, ...] = ()) -> None:
    """Raise ``CorruptArtifact`` naming the first file under ``root`` that is missing, changed or
    not in ``expected`` (files named in ``ignore`` are skipped)."""
    root = Path(root)
    actual = {name: digest for name, digest in sha256_dir(root).items() if name not in ignore}
    problems = [f"{name} is missing" for name in expected if name not in actual]
    problems += [
        f"{name} has changed since it was written"
        for name in expected
        if name in actual and actual[name] != expected[name]
    ]
    problems += [
        f"{name} was not part of it when it was written (remove it)" for name in actual if name not in expected
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptArtifact(f"{root}: {problems[0]}{more}; re-run the phase that wrote it")


# ---------------------------------------------------------------------------------------------
# model directories


def _read_manifest(path: Path) -> dict:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CorruptArtifact(
            f"{path}: {MANIFEST} is missing (not an agentforge artifact, or written "
            "incompletely); re-run the phase that wrote it"
        )
    try:
        data = json.loads(manifest.read_text())
    except ValueError as e:
        raise CorruptArtifact(f"{path}: {MANIFEST} is unreadable ({e}); re-run the phase that wrote it") from None
    if not isinstance(data, dict) or not {"metadata", "files"} <= data.keys():
        raise CorruptArtifact(f"{path}: {MANIFEST} lacks 'metadata' or 'files'; re-run the phase that wrote it")
    return data


def save_model_dir(
    model, tokenizer, path: str | os.PathLike, metadata: dict, write_extra: Callable[[Path], None] | None = None
) -> Path:
    """Write ``model`` (and ``tokenizer`` unless None) as a Hugging Face model directory at ``path``
    with ``agentforge.json`` = ``{"format", "metadata", "files": {name: sha256}}``; atomic: a
    crash leaves the previous directory (or none). ``metadata`` must be JSON-serialisable.
    ``write_extra(directory)`` may add files of its own (e.g. a mixing head); they are hashed too."""
    json.dumps(metadata)  # fail before writing anything
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)  # transformers v5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if write_extra is not None:
            write_extra(tmp)
        manifest = {"format": MANIFEST_FORMAT, "metadata": metadata, "files": sha256_dir(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(path)


def tensor_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` over a directory's safetensors files, read from their headers only."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="np") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def check_loadable(path: str | os.PathLike) -> None:
    """Refuse, before anything is built from it, a model directory that holds a pickle file or
    whose config declares a model larger than its stored weights (a config edited to a million
    layers would otherwise build them). ``CorruptArtifact`` with one line."""
    import re

    path = Path(path)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CorruptArtifact(
            f"{path}: {pickles[0]} is a pickle file, which can run code when loaded; agentforge "
            "loads safetensors only (remove it, or convert the weights to safetensors)"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptArtifact(f"{path}: config.json is missing or unreadable ({e})") from None
    shapes = tensor_shapes(path)
    if not isinstance(config, dict) or not shapes:
        raise CorruptArtifact(f"{path}: no config mapping or no safetensors weights")
    largest = max(max(shape, default=1) for shape in shapes.values())
    depth = 1 + max((int(i) for name in shapes for i in re.findall(r"\.(\d+)\.", name)), default=0)
    for key, limit in [*((k, largest) for k in SIZE_KEYS), *((k, depth) for k in LAYER_KEYS)]:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise CorruptArtifact(
                f"{path}: config.json declares {key}={value}, more than its weights hold ({limit}); "
                "the config does not belong to these weights"
            )


def load_model_dir(path: str | os.PathLike, *, verify: bool = True, **model_kwargs):
    """Load a directory written by ``save_model_dir``: ``(model, tokenizer or None, metadata)``.

    With ``verify`` every file is hashed first and a missing, extra or changed file raises
    ``CorruptArtifact``. ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g.
    ``dtype=``). The model comes back in eval mode, as ``from_pretrained`` returns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = _read_manifest(path)
    if verify:
        verify_hashes(path, manifest["files"], ignore=(MANIFEST,))
    check_loadable(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **model_kwargs)
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return model, tokenizer, manifest["metadata"]


def load_finished_model_dir(path: str | os.PathLike):
    """``load_model_dir(path)`` if a previous run completed that directory (every hash checks out),
    else None: how a rerun of a phase reuses its finished models and redoes the rest."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None
    try:
        return load_model_dir(path)
    except CorruptArtifact:
        return None


def read_manifest_files(path: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` that ``save_model_dir`` recorded for the directory at ``path``."""
    files = _read_manifest(Path(path))["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CorruptArtifact(f"{path}: {MANIFEST} has a malformed file list; re-run the phase that wrote it")
    return files


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` that ``save_model_dir`` recorded for the directory at ``path``."""
    return _read_manifest(Path(path))["metadata"]


def verify_model_dir(path: str | os.PathLike) -> dict:
    """Hash-check a directory written by ``save_model_dir`` without loading it; returns its
    metadata, or raises ``CorruptArtifact`` (also when it is missing or half-written)."""
    path = Path(path)
    manifest = _read_manifest(path)
    verify_hashes(path, manifest["files"], ignore=(MANIFEST,))
    return manifest["metadata"]
