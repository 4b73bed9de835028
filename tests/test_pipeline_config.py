"""The run configuration: presets from the phase modules, a YAML file, --set overrides, resumed
configs, and a one-line error naming the bad key and what is allowed for every mistake."""

import dataclasses

import pytest

from agentforge import config, pipeline
from agentforge.config import ConfigError
from agentforge.data.spec import PRESETS as DATA_PRESETS
from agentforge.phases import cognate
from pipeline_helpers import TEST_PHASES


def resolve(**options):
    return config.resolve(TEST_PHASES, **options).to_dict()


def test_each_preset_takes_every_phase_preset():
    for preset in config.PRESETS:
        built = config.resolve(pipeline.default_phases()[:1], preset=preset)
        assert built.preset == preset and built.seed == 0 and built.data == DATA_PRESETS[preset]
        assert built["cognate"] == cognate.PRESETS[preset]
    assert resolve()["preset"] == "tiny"  # the default


def test_file_then_sets_override_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: micro\nseed: 3\npolish:\n  lr: 1e-3\n  steps: 7\n")
    built = resolve(file=path, sets=["polish.steps=9", "seed=5", "seedling.layers=2", "data.seq_len=96"])
    assert built == {
        "seed": 5,
        "preset": "micro",
        "data": {**dataclasses.asdict(DATA_PRESETS["micro"]), "seq_len": 96},
        "tools": {"python": "os"},
        "seedling": {"hidden_size": 16, "layers": 2},
        "polish": {"steps": 9, "lr": 0.001},
    }
    assert resolve(file=path, preset="tiny")["preset"] == "tiny"  # --preset wins over the file's


def test_a_run_json_is_accepted_back_as_a_config(tmp_path):
    import json

    built = resolve(preset="micro", sets=["polish.steps=11"])
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"id": "x", "created": "2026-12-07T00:00:00+00:00", "config": built}))
    assert resolve(file=path) == built
    yaml_path = tmp_path / "printed.yaml"
    yaml_path.write_text(config.resolve(TEST_PHASES, preset="micro", sets=["polish.steps=11"]).to_yaml())
    assert resolve(file=yaml_path) == built  # what --print-config prints


def test_values_parse_as_yaml():
    assert config.parse_value("40", "x") == 40
    assert config.parse_value("1e-3", "x") == 0.001  # plain YAML 1.1 would keep this a string
    assert config.parse_value("[0, 1]", "x") == [0, 1]
    assert config.parse_value("true", "x") is True
    assert config.parse_value("reasoning", "x") == "reasoning"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"preset": "huge"}, "unknown preset 'huge'; allowed: micro, tiny, small"),
        ({"sets": ["polish.stepz=3"]}, "polish: unknown setting 'stepz'; allowed: steps, lr"),
        ({"sets": ["polish.steps=many"]}, "polish.steps: expected an int in [1, 1000], got 'many'"),
        ({"sets": ["polish.steps=0"]}, "polish.steps: expected an int in [1, 1000], got 0"),
        ({"sets": ["polish.lr=[1]"]}, "polish.lr: expected a number in (0, 1], got [1]"),
        ({"sets": ["seed=-1"]}, "seed: expected an int in [0, 4294967295], got -1"),
        ({"sets": ["seed=1e23"]}, "seed: expected an int in [0, 4294967295], got 1e+23"),
        ({"sets": ["data.seq_len=0"]}, "data.seq_len: expected an int in [8, 8192], got 0"),
        (
            {"sets": ["polsh.steps=3"]},
            "--set polsh.steps=3: unknown config key 'polsh'; allowed: seed, preset, data, tools, seedling, polish",
        ),
        ({"sets": ["tools.python=docker"]}, "tools.python: expected one of os, unsafe-inprocess, got 'docker'"),
        ({"sets": ["polish=3"]}, "--set polish=3: polish must be a mapping of settings, got 3"),
        ({"sets": ["steps"]}, "--set 'steps': expected KEY=VALUE, e.g. seed=1 or bitnet.steps=40"),
        ({"sets": ["preset=micro"]}, "--set preset=...: use --preset"),
        ({"sets": ["polish.steps=[1"]}, "--set polish.steps: not valid YAML"),
        ({"sets": ["polish.steps=" + "9" * 4_000_000]}, "--set polish.steps: not a readable value (Exceeds the limit"),
        ({"sets": ["polish.steps=" + "9" * 4_000]}, "polish.steps: expected an int in [1, 1000], got 9999"),
    ],
)
def test_every_mistake_is_one_line_naming_the_key(options, message):
    with pytest.raises(ConfigError) as caught:
        resolve(**options)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


@pytest.mark.parametrize(
    "text, message",
    [
        ("- 1\n- 2\n", "expected a mapping of keys to values, got list"),
        ("polish: 3\n", "polish must be a mapping of settings, got 3"),
        ("colour: red\n", "unknown config key 'colour'"),
        ("polish: {steps: [\n", "not valid YAML"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^--config {path}: .*{message}"):
        resolve(file=path)
    with pytest.raises(ConfigError, match=r"cannot read it \(No such file or directory\)"):
        resolve(file=tmp_path / "absent.yaml")


def test_a_preset_a_phase_lacks_is_refused():
    partial = dataclasses.replace(TEST_PHASES[1], presets={"micro": TEST_PHASES[1].presets["micro"]})
    with pytest.raises(ConfigError, match=r"^preset 'small' is not defined for phase polish \(it defines: micro\)$"):
        config.resolve([TEST_PHASES[0], partial], preset="small")


def test_a_resumed_run_keeps_its_settings_and_new_phases_get_the_preset():
    saved = {"seed": 2, "preset": "micro", "seedling": {"hidden_size": 8, "layers": 1}}  # polish came later
    built = resolve(saved=saved)
    assert built["seedling"] == {"hidden_size": 8, "layers": 1} and built["seed"] == 2
    assert built["polish"] == {"steps": 4, "lr": 0.01}
    assert config.first_difference(saved, built) is None
    changed = resolve(saved=saved, sets=["seedling.layers=3"])
    assert config.first_difference(saved, changed) == "seedling.layers: 1 -> 3"
    assert resolve(saved=saved, preset="tiny")["seedling"]["hidden_size"] == 32  # another preset: rebuilt


def test_every_setting_of_every_phase_declares_what_it_accepts():
    from agentforge.data.spec import DataSpec
    from agentforge.settings import undeclared

    for spec in pipeline.default_phases():
        assert undeclared(spec.settings) == [], spec.name
        for preset in config.PRESETS:
            assert isinstance(spec.presets[preset], spec.settings)
    assert undeclared(DataSpec) == []
