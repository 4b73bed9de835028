"""The run configuration: one typed object, validated once, carried as it is.

    config = resolve(PHASES, preset="tiny", file="my.yaml", sets=["bitnet.steps=200"])
    config.seed, config.preset, config.data            # DataSpec: the run's held-out data
    config.tools.python                                # the Python tool's isolation
    config["bitnet"].steps                             # each phase's Settings object
    config.to_dict()                                   # plain values: run.json, --print-config

Built in layers, each checked before anything is written:

1. a preset (``micro``: seconds per phase, for tests and CI; ``tiny``: the default user run;
   ``small``: one GPU; ``smol``: a pretrained 135M base, SmolLM2-135M-Instruct unless
   ``cognate.base_model`` names another): the data spec's and every phase's ``PRESETS[preset]``;
2. a YAML file (``--config FILE``) of the same shape, e.g. ``{preset: micro, bitnet: {steps: 40}}``;
   a run's ``run.json`` works too (its ``config`` is taken);
3. ``--set KEY=VALUE`` overrides, the key a dotted path (``seed=1``, ``data.seq_len=96``,
   ``bitnet.steps=40``, ``baking.lora.rank=4``), the value a YAML scalar or list.

Every mistake raises ``ConfigError`` with one line naming the key and what it accepts.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agentforge.data.spec import PRESETS as DATA_PRESETS
from agentforge.data.spec import DataSpec
from agentforge.errors import ConfigError
from agentforge.settings import clip, from_dict, shown, to_dict
from agentforge.tools.sandbox import ToolSettings

PRESETS = ("micro", "tiny", "small", "smol")
DEFAULT_PRESET = "tiny"
RUN_KEYS = ("seed", "preset", "data", "tools")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding accept this range


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); this loader reads it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def parse_value(text: str, where: str) -> Any:
    """A ``--set`` value or YAML document: ``40`` -> 40, ``1e-3`` -> 0.001, ``[0, 1]`` -> [0, 1], ``abc`` -> 'abc'."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({clip(' '.join(str(e).split()))})") from None
    except ValueError as e:  # e.g. an int of more digits than Python converts
        raise ConfigError(f"{where}: not a readable value ({clip(str(e))})") from None


def load_file(path: str | os.PathLike) -> dict:
    """The mapping in a YAML config file, or the ``config`` of a run's ``run.json``."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    values = parse_value(text, f"--config {path}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(values).__name__}")
    if isinstance(values.get("config"), dict) and "created" in values:  # a run.json
        return values["config"]
    return values


@dataclass
class RunConfig:
    """The resolved configuration of a run: seed, preset, data spec, tool settings and each
    phase's settings."""

    seed: int
    preset: str
    data: DataSpec
    tools: ToolSettings
    phases: dict[str, Any]

    def __getitem__(self, phase: str) -> Any:
        return self.phases[phase]

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "preset": self.preset,
            "data": to_dict(self.data),
            "tools": to_dict(self.tools),
            **{name: to_dict(settings) for name, settings in self.phases.items()},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _preset_values(preset: str, specs) -> dict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    values: dict[str, Any] = {
        "seed": 0,
        "preset": preset,
        "data": to_dict(DATA_PRESETS[preset]),
        "tools": to_dict(ToolSettings()),
    }
    for spec in specs:
        if preset not in spec.presets:
            raise ConfigError(
                f"preset {preset!r} is not defined for phase {spec.name} "
                f"(it defines: {', '.join(sorted(spec.presets))})"
            )
        values[spec.name] = to_dict(spec.presets[preset])
    return values


def _merge(target: dict, values: dict, where: str, allowed: list[str]) -> None:
    """Apply ``values`` (nested mappings) onto ``target``; top-level keys must be in ``allowed``."""
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown config key {key!r}; allowed: {', '.join(allowed)}")
        if key == "preset":
            continue
        if isinstance(target.get(key), dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a mapping of settings, got {shown(value)}")
            _merge_nested(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _merge_nested(target: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_nested(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def parse_set(item: str, default_prefix: str | None = None, known: tuple[str, ...] = ()) -> dict:
    """``"bitnet.steps=40"`` -> ``{"bitnet": {"steps": 40}}``. With ``default_prefix`` (a phase run
    alone), a key whose first part is not in ``known`` belongs to that phase: ``steps=40``."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {shown(item)}: expected KEY=VALUE, e.g. seed=1 or bitnet.steps=40")
    if key == "preset":
        raise ConfigError("--set preset=...: use --preset")
    parts = key.split(".")
    if default_prefix is not None and parts[0] not in known:
        parts = [default_prefix, *parts]
    if parts[0] in ("seed",) and len(parts) > 1:
        raise ConfigError(f"--set {key}: {parts[0]} has no sub-keys")
    value: Any = parse_value(text, f"--set {key}")
    for part in reversed(parts):
        value = {part: value}
    return value


def build(values: dict, specs) -> RunConfig:
    """A ``RunConfig`` from plain values (every section checked)."""
    seed = values.get("seed")
    if isinstance(seed, float) and seed.is_integer() and 0 <= seed <= MAX_SEED:
        seed = int(seed)  # YAML reads 1e3 as a float
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed: expected an int in [0, {MAX_SEED}], got {shown(seed)}")
    return RunConfig(
        seed=seed,
        preset=values["preset"],
        data=from_dict(DataSpec, values["data"], "data"),
        tools=from_dict(ToolSettings, values["tools"], "tools"),
        phases={spec.name: from_dict(spec.settings, values[spec.name], spec.name) for spec in specs},
    )


def resolve(
    specs,
    *,
    preset: str | None = None,
    file: str | os.PathLike | None = None,
    sets: Sequence[str] = (),
    saved: dict | None = None,
    standalone: str | None = None,
) -> RunConfig:
    """The validated config: ``saved`` (a resumed run's config) or the preset's, then the file's
    values, then ``sets``. A resumed run keeps its own values unless ``preset`` names another
    preset. ``standalone``: the one phase run alone, whose settings a bare ``--set KEY`` names."""
    specs = list(specs)
    values = load_file(file) if file else {}
    name = preset or values.get("preset") or (saved or {}).get("preset") or DEFAULT_PRESET
    if not isinstance(name, str):
        raise ConfigError(f"preset: expected one of {', '.join(PRESETS)}, got {shown(name)}")
    config = _preset_values(name, specs)
    allowed = [*RUN_KEYS, *(spec.name for spec in specs)]
    if saved is not None and saved.get("preset") == name:
        _merge(config, {k: v for k, v in saved.items() if k in allowed}, "run.json", allowed)
    _merge(config, values, f"--config {file}", allowed)
    for item in sets:
        _merge(config, parse_set(item, standalone, tuple(allowed)), f"--set {clip(item)}", allowed)
    return build(config, specs)


def first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """``"cognate.trunk_steps: 12 -> 40"`` for the first key whose value differs, else None.
    Keys only in ``new`` do not count."""
    for key in old:
        where = f"{prefix}{key}"
        if key not in new:
            return f"{where}: {shown(old[key])} -> (absent)"
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            found = first_difference(old[key], new[key], f"{where}.")
            if found:
                return found
        elif old[key] != new[key]:
            return f"{where}: {shown(old[key])} -> {shown(new[key])}"
    return None


def settings_json(settings: Any) -> str:
    """A settings object as canonical JSON (what a phase's records compare)."""
    return json.dumps(to_dict(settings), sort_keys=True)
