"""The shipped configs: configs/all-keys.yaml is exactly what `agentforge run --print-config
--explain` prints (so its comments stay true of the settings declarations), every key in it carries
its comment, and every shipped config is accepted by `agentforge run --config FILE`; the preset
examples run what their preset runs."""

import re
from pathlib import Path

import pytest
import yaml

from agentforge import cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_all_keys_is_the_explained_default_config(tmp_path, capsys):
    code, out, err = run(capsys, "--print-config", "--explain", "--out", tmp_path / "run")
    assert (code, err) == (0, "")
    assert out == (CONFIGS / "all-keys.yaml").read_text(), (
        "configs/all-keys.yaml is stale: agentforge run --print-config --explain > configs/all-keys.yaml"
    )
    assert not (tmp_path / "run").exists()


def leaves(values: dict, prefix: str = "") -> list[str]:
    return [
        key
        for name, value in values.items()
        for key in (leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"])
    ]


def test_every_key_is_explained_in_all_keys(tmp_path, capsys):
    text = (CONFIGS / "all-keys.yaml").read_text()
    plain = yaml.safe_load(run(capsys, "--print-config", "--out", tmp_path / "run")[1])
    assert yaml.safe_load(text) == plain  # the same config, comments aside
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^ *[a-z_]+:", line)]
    explained = 0
    for i in keys:
        section = lines[i].endswith(":") and i + 1 < len(lines) and not lines[i + 1].lstrip().startswith("- ")
        if section:  # a mapping of settings: its keys carry the comments
            continue
        comment = []
        for line in reversed(lines[:i]):
            if not line.lstrip().startswith("#"):
                break
            comment.insert(0, line.lstrip("# "))
        assert re.search(r"Accepts .+\. Presets: |Accepts .+; default ", " ".join(comment)), lines[i]
        explained += 1
    assert explained == len(leaves(plain))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_accepted(path, tmp_path, capsys):
    code, out, err = run(capsys, "--config", path, "--print-config", "--out", tmp_path / "run")
    assert (code, err) == (0, "")
    preset = yaml.safe_load(path.read_text())["preset"]
    # the examples restate their preset's values: they run what the preset runs
    assert out == run(capsys, "--preset", preset, "--print-config", "--out", tmp_path / "run")[1]


def test_explain_shows_the_resolved_values_and_loads_back(tmp_path, capsys):
    args = [
        "--preset",
        "micro",
        "--set",
        "bitnet.steps=7",
        "--set",
        "baking.tool_prompts=[one]",
        "--out",
        tmp_path / "run",
        "--print-config",
    ]
    code, explained, _ = run(capsys, *args, "--explain")
    assert code == 0
    assert yaml.safe_load(explained) == yaml.safe_load(run(capsys, *args)[1])
    assert "# Accepts an int in [1, 10000000]. Presets: micro=6, tiny=100, small=" in explained
    assert "  tool_prompts: [one]" in explained


def test_explain_needs_print_config(tmp_path, capsys):
    code, out, err = run(capsys, "--explain", "--out", tmp_path / "run")
    assert (code, out) == (2, "")
    assert err == "agentforge run: error: --explain goes with --print-config: agentforge run --print-config --explain\n"
    assert not (tmp_path / "run").exists()
