"""The run configuration: presets from the phase modules, a YAML file, --set overrides, resumed
configs, and a one-line error naming the bad key and what is allowed for every mistake."""
import dataclasses

import pytest

from agentforge import config, pipeline
from agentforge.config import ConfigError
from agentforge.phases import cognate
from pipeline_helpers import TEST_PHASES

MODULES = pipeline.implemented(TEST_PHASES)  # seedling, polish
NAMES = [s.name for s in TEST_PHASES]


def resolve(**options):
    return config.resolve(MODULES, NAMES, **options)


def test_each_preset_takes_every_implemented_phase_preset():
    for preset in config.PRESETS:
        built = config.resolve(pipeline.implemented(pipeline.PHASES), [s.name for s in pipeline.PHASES], preset=preset)
        assert built["preset"] == preset and built["seed"] == 0
        assert built["cognate"] == dataclasses.asdict(cognate.PRESETS[preset])
    assert resolve()["preset"] == "tiny"  # the default


def test_file_then_sets_override_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: micro\nseed: 3\npolish:\n  lr: 1e-3\n  steps: 7\n")
    built = resolve(file=path, sets=["polish.steps=9", "seed=5", "seedling.layers=2"])
    assert built == {"seed": 5, "preset": "micro", "seedling": {"hidden_size": 16, "layers": 2},
                     "polish": {"steps": 9, "lr": 0.001}}
    assert resolve(file=path, preset="tiny")["preset"] == "tiny"  # --preset wins over the file's


def test_values_parse_as_yaml():
    assert config.parse_value("40", "x") == 40
    assert config.parse_value("1e-3", "x") == 0.001  # plain YAML 1.1 would keep this a string
    assert config.parse_value("[0, 1]", "x") == [0, 1]
    assert config.parse_value("true", "x") is True
    assert config.parse_value("reasoning", "x") == "reasoning"


@pytest.mark.parametrize("options, message", [
    ({"preset": "huge"}, "unknown preset 'huge'; allowed: micro, tiny, small"),
    ({"sets": ["polish.stepz=3"]}, "polish: unknown setting(s) ['stepz']; allowed: ['lr', 'steps']"),
    ({"sets": ["polish.steps=many"]}, "polish.steps: expected int, got 'many'"),
    ({"sets": ["polish.lr=[1]"]}, "polish.lr: expected float, got [1]"),
    ({"sets": ["seed=-1"]}, "seed: expected an int >= 0, got -1"),
    ({"sets": ["polsh.steps=3"]}, "--set polsh.steps: unknown config key 'polsh'; allowed: seed, preset, seedling, polish"),
    ({"sets": ["unbuilt.steps=3"]}, "--set unbuilt.steps: phase unbuilt is not implemented yet, so it takes no settings"),
    ({"sets": ["polish=3"]}, "--set polish: name a setting of polish, e.g. --set polish.SETTING=VALUE"),
    ({"sets": ["steps"]}, "--set 'steps': expected KEY=VALUE, e.g. seed=1 or cognate.trunk_steps=40"),
    ({"sets": ["preset=micro"]}, "--set preset=...: use --preset"),
    ({"sets": ["polish.steps=[1"]}, "--set polish.steps: not valid YAML"),
])
def test_every_mistake_is_one_line_naming_the_key(options, message):
    with pytest.raises(ConfigError) as caught:
        resolve(**options)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text, message", [
    ("- 1\n- 2\n", "expected a mapping of keys to values, got list"),
    ("polish: 3\n", "polish must be a mapping of settings, got 3"),
    ("colour: red\n", "unknown config key 'colour'"),
    ("polish: {steps: [\n", "not valid YAML"),
])
def test_bad_config_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^--config {path}: .*{message}"):
        resolve(file=path)
    with pytest.raises(ConfigError, match=r"cannot read it \(No such file or directory\)"):
        resolve(file=tmp_path / "absent.yaml")


def test_a_preset_a_phase_lacks_is_refused():
    class Partial:  # a phase module that defines only one preset
        PRESETS = {"micro": cognate.PRESETS["micro"]}

    with pytest.raises(ConfigError, match=r"^preset 'small' is not defined for phase partial \(it defines: micro\)$"):
        config.preset_config("small", {"partial": Partial})


def test_a_resumed_run_keeps_its_settings_and_new_phases_get_the_preset():
    saved = {"seed": 2, "preset": "micro", "seedling": {"hidden_size": 8, "layers": 1}}  # polish came later
    built = resolve(saved=saved)
    assert built["seedling"] == {"hidden_size": 8, "layers": 1} and built["seed"] == 2
    assert built["polish"] == {"steps": 4, "lr": 0.01}
    assert config.first_difference(saved, built) is None
    changed = resolve(saved=saved, sets=["seedling.layers=3"])
    assert config.first_difference(saved, changed) == "seedling.layers: 1 -> 3"
    assert resolve(saved=saved, preset="tiny")["seedling"]["hidden_size"] == 32  # another preset: rebuilt
