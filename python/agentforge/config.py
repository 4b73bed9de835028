"""The run configuration: ``{"seed": int, "preset": str, <phase>: {setting: value}, ...}`` with one
settings mapping per implemented phase.

Built in layers, each checked before anything is written:

1. a preset (``micro``: seconds per phase, for tests and CI; ``tiny``: the default user run;
   ``small``: one GPU), taken from each implemented phase module's ``PRESETS[preset]``;
2. a YAML file (``--config FILE``) with the same shape, e.g. ``{preset: micro, cognate: {trunk_steps: 40}}``;
3. ``--set KEY=VALUE`` overrides (``seed=1``, ``cognate.trunk_steps=40``, ``cognate.task_levels=[0,1]``),
   each value parsed as a YAML scalar or list.

Every mistake raises ``ConfigError`` with one line that names the bad key and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from agentforge.phases import settings_from_dict

PRESETS = ("micro", "tiny", "small")
DEFAULT_PRESET = "tiny"
RUN_KEYS = ("seed", "preset")


class ConfigError(ValueError):
    """A bad configuration or command line, found before anything is written (exit code 2)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); this loader reads it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."))


def parse_value(text: str, where: str) -> Any:
    """A ``--set`` value or YAML document: ``40`` -> 40, ``1e-3`` -> 0.001, ``[0, 1]`` -> [0, 1], ``abc`` -> 'abc'."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None


def load_file(path: str | Path) -> dict:
    """The mapping in a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    values = parse_value(text, f"--config {path}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def preset_config(preset: str, implemented: dict[str, Any], seed: int = 0) -> dict:
    """The config of ``preset``: each implemented phase's ``PRESETS[preset]`` as a plain dict.
    ``implemented`` maps phase name -> its module, in pipeline order."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    config: dict[str, Any] = {"seed": seed, "preset": preset}
    for name, module in implemented.items():
        if preset not in module.PRESETS:
            raise ConfigError(f"preset {preset!r} is not defined for phase {name} "
                              f"(it defines: {', '.join(sorted(module.PRESETS))})")
        config[name] = dataclasses.asdict(module.PRESETS[preset])
    return config


def _check_key(key: str, implemented: dict[str, Any], all_phases: list[str], where: str) -> None:
    if key in RUN_KEYS or key in implemented:
        return
    if key in all_phases:
        raise ConfigError(f"{where}: phase {key} is not implemented yet, so it takes no settings")
    raise ConfigError(f"{where}: unknown config key {key!r}; allowed: {', '.join([*RUN_KEYS, *implemented])}")


def _merge(config: dict, values: dict, implemented: dict[str, Any], all_phases: list[str], where: str) -> None:
    for key, value in values.items():
        _check_key(key, implemented, all_phases, where)
        if key in implemented:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a mapping of settings, got {value!r}")
            config[key].update(value)
        else:
            config[key] = value


def _parse_set(item: str, implemented: dict[str, Any], all_phases: list[str]) -> dict:
    """``"cognate.trunk_steps=40"`` -> ``{"cognate": {"trunk_steps": 40}}``."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. seed=1 or cognate.trunk_steps=40")
    phase, dot, setting = key.partition(".")
    if key == "preset":
        raise ConfigError("--set preset=...: use --preset")
    _check_key(phase, implemented, all_phases, f"--set {key}")
    value = parse_value(text, f"--set {key}")
    if phase in RUN_KEYS:
        if dot:
            raise ConfigError(f"--set {key}: {phase} has no sub-keys")
        return {phase: value}
    if not dot or not setting:
        raise ConfigError(f"--set {key}: name a setting of {phase}, e.g. --set {phase}.SETTING=VALUE")
    return {phase: {setting: value}}


def validate(config: dict, implemented: dict[str, Any]) -> None:
    """Check the run keys and build each phase's ``Settings`` (unknown keys and wrong types refused)."""
    seed = config.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: expected an int >= 0, got {seed!r}")
    for name, module in implemented.items():
        try:
            settings_from_dict(module.Settings, config[name], name)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None


def resolve(implemented: dict[str, Any], all_phases: list[str], *, preset: str | None = None,
            file: str | Path | None = None, sets: list[str] = (), saved: dict | None = None) -> dict:
    """The validated config: ``saved`` (a resumed run's config) or the preset's, then the file's
    values, then ``sets``. ``implemented``: phase name -> module; ``all_phases``: every phase name.

    A resumed run keeps its own settings unless ``preset`` names another preset; phases implemented
    since it started get the preset's settings."""
    values = load_file(file) if file else {}
    name = preset or values.get("preset") or (saved or {}).get("preset") or DEFAULT_PRESET
    if not isinstance(name, str):
        raise ConfigError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    config = preset_config(name, implemented, seed=(saved or {}).get("seed", 0))
    if saved is not None and saved.get("preset") == name:
        config.update({k: copy.deepcopy(v) for k, v in saved.items() if k in RUN_KEYS or k in implemented})
    _merge(config, {k: v for k, v in values.items() if k != "preset"}, implemented, all_phases, f"--config {file}")
    for item in sets:
        _merge(config, _parse_set(item, implemented, all_phases), implemented, all_phases, f"--set {item}")
    validate(config, implemented)
    return config


def settings_of(config: dict, phase: str, module: Any):
    """The ``Settings`` object of ``phase`` (validated by ``resolve``)."""
    return settings_from_dict(module.Settings, config[phase], phase)


def first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """``"cognate.trunk_steps: 12 -> 40"`` for the first key whose value differs, else None.
    Keys only in ``new`` (phases implemented since ``old`` was saved) do not count."""
    for key in old:
        where = f"{prefix}{key}"
        if key not in new:
            return f"{where}: {old[key]!r} -> (absent)"
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            found = first_difference(old[key], new[key], f"{where}.")
            if found:
                return found
        elif old[key] != new[key]:
            return f"{where}: {old[key]!r} -> {new[key]!r}"
    return None
