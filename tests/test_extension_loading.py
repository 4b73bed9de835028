"""The compiled extension finds torch's libraries by itself, through its rpath to the installed
torch (site-packages/agentforge/_C*.so -> site-packages/torch/lib), so loading it does not
depend on `import torch` having loaded libc10 and libtorch first (CMakeLists.txt, INSTALL_RPATH).

These tests check the extension that `import agentforge` loads, as installed from a wheel (CI
installs it non-editable). A copy that CMake did not install (an old build copied into
python/agentforge/, say) has no such rpath and fails them.
"""

import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import agentforge.ops as ops

TORCH_RPATH = {"linux": "$ORIGIN/../torch/lib", "darwin": "@loader_path/../torch/lib"}
# Anything that would find torch's libraries for the loader without the rpath.
LOADER_ENV = (
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "DYLD_LIBRARY_PATH",
    "DYLD_FALLBACK_LIBRARY_PATH",
    "DYLD_INSERT_LIBRARIES",
)
DT_NEEDED, DT_RPATH, DT_RUNPATH = 1, 15, 29
SHT_DYNAMIC = 6


def extension_file() -> Path:
    if not ops.extension_loaded():
        pytest.skip("the native extension is not built or not loaded (agentforge uses the reference ops)")
    if sys.platform not in TORCH_RPATH:
        pytest.skip(f"no rpath check for {sys.platform}")
    from agentforge import _C  # type: ignore[attr-defined]

    return Path(_C.__file__)


def elf_dynamic(path: Path) -> dict[int, list[str]]:
    """The string entries of an ELF file's dynamic section, by tag: {DT_NEEDED: [...], ...}."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    wide, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:  # ELF64: e_shoff at 0x28, e_shentsize and e_shnum at 0x3A
        shoff = struct.unpack_from(end + "Q", data, 0x28)[0]
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        section, entry = end + "IIQQQQIIQQ", end + "qQ"
    else:  # ELF32: e_shoff at 0x20, e_shentsize and e_shnum at 0x2E
        shoff = struct.unpack_from(end + "I", data, 0x20)[0]
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
        section, entry = end + "IIIIIIIIII", end + "iI"
    # section header: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from(section, data, shoff + i * shentsize) for i in range(shnum)]
    out: dict[int, list[str]] = {}
    for _, kind, _, _, offset, size, link, *_ in sections:
        if kind != SHT_DYNAMIC:
            continue
        strtab = sections[link][4]  # the dynamic section's sh_link: its string table (.dynstr)
        for pos in range(offset, offset + size, struct.calcsize(entry)):
            tag, value = struct.unpack_from(entry, data, pos)
            if tag in (DT_NEEDED, DT_RPATH, DT_RUNPATH):
                name = data[strtab + value : data.index(b"\0", strtab + value)].decode()
                out.setdefault(tag, []).append(name)
    return out


def rpath_entries(path: Path) -> list[str]:
    if sys.platform == "darwin":
        if shutil.which("otool") is None:
            pytest.skip("otool (Xcode command line tools) is not installed: cannot read LC_RPATH")
        lines = subprocess.run(["otool", "-l", str(path)], capture_output=True, text=True, check=True).stdout
        lines = [line.split() for line in lines.splitlines()]
        # "cmd LC_RPATH" / "cmdsize N" / "path @loader_path/../torch/lib (offset 12)"
        return [lines[i + 2][1] for i, words in enumerate(lines) if words == ["cmd", "LC_RPATH"]]
    dynamic = elf_dynamic(path)
    return [entry for tag in (DT_RUNPATH, DT_RPATH) for value in dynamic.get(tag, []) for entry in value.split(":")]


def test_extension_has_rpath_to_installed_torch():
    so = extension_file()
    entries = rpath_entries(so)
    assert TORCH_RPATH[sys.platform] in entries, (
        f"{so} has rpath entries {entries}, none of them {TORCH_RPATH[sys.platform]!r}: without it the "
        "extension loads only after `import torch`. Was it installed by CMake (pip install), not copied?"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF files only on Linux")
def test_elf_reader_agrees_with_readelf():
    so = extension_file()
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed: nothing to compare the ELF reader with")
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    dynamic = elf_dynamic(so)
    for tag, label in ((DT_NEEDED, "NEEDED"), (DT_RPATH, "RPATH"), (DT_RUNPATH, "RUNPATH")):
        # e.g. " 0x000000000000001d (RUNPATH)            Library runpath: [$ORIGIN/../torch/lib]"
        expected = [line.split("[", 1)[1].rsplit("]", 1)[0] for line in out.splitlines() if f"({label})" in line]
        assert dynamic.get(tag, []) == expected, label
    assert dynamic[DT_NEEDED], "an extension that needs no shared library at all?"


def load_without_torch(so: Path) -> subprocess.CompletedProcess:
    """dlopen `so` (ctypes) in a fresh interpreter that never imports torch: no site-packages,
    no .pth files (-I -S), no loader search path from the environment."""
    code = textwrap.dedent(
        """
        import ctypes, sys
        ctypes.CDLL(sys.argv[1])
        assert "torch" not in sys.modules, "torch was imported"
        if sys.platform.startswith("linux"):  # where libc10 was loaded from
            with open("/proc/self/maps") as f:
                print(*sorted({line.split()[-1] for line in f if "libc10." in line}), sep="\\n")
        """
    )
    env = {key: value for key, value in os.environ.items() if key not in LOADER_ENV}
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(so)], env=env, capture_output=True, text=True, timeout=300
    )


def test_extension_loads_without_torch_imported(tmp_path):
    """The extension beside a torch package, as in site-packages, loads in an interpreter that
    has not imported torch; without the torch package beside it, it does not (so the rpath, not
    some other search path, is what finds torch's libraries)."""
    so = extension_file()
    torch_dir = Path(torch.__file__).resolve().parent
    site = tmp_path / "site-packages"
    (site / so.parent.name).mkdir(parents=True)
    copy = site / so.parent.name / so.name
    shutil.copy2(so, copy)
    # libraries a repaired wheel vendors: auditwheel's <dist>.libs beside the package, delocate's
    # agentforge/.dylibs inside it
    for vendored in [*so.parent.parent.glob("agentforge*.libs"), so.parent / ".dylibs"]:
        if vendored.is_dir():
            (site / vendored.relative_to(so.parent.parent)).symlink_to(vendored, target_is_directory=True)

    alone = load_without_torch(copy)
    if alone.returncode == 0:
        pytest.skip("torch's libraries load here without the rpath (a system path?): the test cannot tell")
    assert "libc10" in alone.stderr or "libtorch" in alone.stderr, alone.stderr

    (site / "torch").symlink_to(torch_dir, target_is_directory=True)
    beside_torch = load_without_torch(copy)
    assert beside_torch.returncode == 0, (
        f"{so.name} beside torch did not load without `import torch`:\n{beside_torch.stderr}"
    )
    if sys.platform.startswith("linux"):
        loaded = [Path(p).resolve() for p in beside_torch.stdout.split()]
        assert loaded and all(p.parent == torch_dir / "lib" for p in loaded), (loaded, torch_dir)


@pytest.mark.parametrize(
    "pin, version, named",
    [
        ("torch<2.14,>=2.13", "2.13.0+cpu", False),
        ("torch<2.14,>=2.13", "2.13.2", False),
        ("torch<2.14,>=2.13", "2.14.0", True),
        ("torch<2.14,>=2.13", "2.12.1+cu121", True),
        ("torch>=2.6", "2.13.0", False),
    ],
)
def test_a_torch_outside_the_wheels_pin_is_named_with_both_versions(pin, version, named):
    from agentforge.ops._native import pin_problem

    problem = pin_problem(pin, version)
    assert (problem is not None) == named
    if named:
        assert "<2.14,>=2.13" in problem and version in problem and "\n" not in problem
