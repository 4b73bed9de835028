"""Typed settings: dataclasses whose every field declares the values it accepts, checked when an
object is built, so a bad value fails before any work starts.

    @dataclass
    class Settings(Checked):
        steps: int = setting(100, "[1, 1e6]")                       # an int in a closed range
        strength: float = setting(0.5, "(0, 1)")                    # open ends: ( and )
        method: str = setting("full", choices=("full", "lora"))
        levels: list[int] = setting([0, 1], "[0, 9]", length="[1, 10]")   # each element, and how many
        lora: LoraSettings = setting(LoraSettings)                  # nested settings

``from_dict(Settings, {"steps": 50}, "bitnet")`` builds one from plain values (YAML, JSON or
``--set``); every mistake is a one-line ``ConfigError`` naming the key and what it accepts.
``to_dict`` gives the plain values back. A subclass may add cross-field rules in ``check()``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from typing import Any

from agentforge.errors import ConfigError

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")
_MAX_SHOWN = 60  # characters of a bad value repeated in an error


def setting(
    default: Any, interval: str | None = None, *, choices: tuple | None = None, length: str | None = None, doc: str = ""
) -> Any:
    """A settings field: its default and what it accepts. ``interval`` (``"[1, 100]"``, ``"(0, 1)"``,
    ``"[0, inf)"``) bounds a number, or each number of a list; ``choices`` lists the allowed values
    (of a string, or of each element of a list); ``length`` bounds a list's length. A settings
    class as ``default`` nests one built with its own defaults; a settings object nests a copy of it."""
    metadata = {
        "interval": _parse_interval(interval) if interval else None,
        "choices": choices,
        "length": _parse_interval(length) if length else None,
        "doc": doc,
    }
    if isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if dataclasses.is_dataclass(default):  # nested settings with non-default values: each object its own copy
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: list(default) if isinstance(default, list) else dict(default), metadata=metadata
        )
    return dataclasses.field(default=default, metadata=metadata)


def _parse_interval(text: str) -> tuple[float, float, bool, bool]:
    match = _INTERVAL.match(text)
    if not match:
        raise ValueError(f"interval {text!r}: write it as [low, high], with ( or ) for an open end")
    low, high = float(match[2]), float(match[3])
    return low, high, match[1] == "(", match[4] == ")"


def _interval_text(interval) -> str:
    low, high, open_low, open_high = interval

    def show(x: float) -> str:
        return "inf" if math.isinf(x) else str(int(x)) if x.is_integer() else f"{x:g}"

    return f"{'(' if open_low else '['}{show(low)}, {show(high)}{')' if open_high else ']'}"


def _inside(value: float, interval) -> bool:
    low, high, open_low, open_high = interval
    return (value > low if open_low else value >= low) and (value < high if open_high else value <= high)


def clip(text: str) -> str:
    """``text`` cut to a length that fits in a one-line error."""
    return text if len(text) <= _MAX_SHOWN else f"{text[:_MAX_SHOWN]}... ({len(text)} characters)"


def shown(value: Any) -> str:
    """``repr(value)``, clipped so that a huge bad value does not become a huge error line."""
    try:
        return clip(repr(value))
    except ValueError:  # an int too long to print
        return f"an int of about {value.bit_length() * 3 // 10} digits"


# ---------------------------------------------------------------------------------------------
# checking one value against its declared type and range


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(hint) -> tuple[Any, bool]:
    """``(inner type, True)`` for ``X | None``, else ``(hint, False)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _describe(hint, meta: dict) -> str:
    hint, optional = _optional(hint)
    base = {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(hint)
    if typing.get_origin(hint) is list:
        element = typing.get_args(hint)[0]
        if meta.get("choices") is not None:
            base = f"a list of values from {', '.join(map(str, meta['choices']))}"
        else:
            base = f"a list of {_describe(element, {**meta, 'length': None}).removeprefix('an ').removeprefix('a ')}s"
        if meta.get("length"):
            base += f" (length in {_interval_text(meta['length'])})"
        return ("null or " if optional else "") + base
    if meta.get("choices") is not None:
        base = f"one of {', '.join(map(str, meta['choices']))}"
    elif meta.get("interval") is not None and base in ("an int", "a number"):
        base = f"{base} in {_interval_text(meta['interval'])}"
    if base is None and isinstance(hint, type) and dataclasses.is_dataclass(hint):
        base = f"a mapping of {hint.__name__} settings"
    return ("null or " if optional else "") + (base or str(hint))


def _valid(value, hint, meta: dict) -> bool:
    hint, optional = _optional(hint)
    if value is None:
        return optional
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            return False
        if meta.get("length") and not _inside(len(value), meta["length"]):
            return False
        element = typing.get_args(hint)[0]
        return all(_valid(v, element, {**meta, "length": None}) for v in value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        ok = _is_int(value)
    elif hint is float:
        ok = _is_number(value) and (
            math.isfinite(value) or bool(meta.get("interval")) and _inside(value, meta["interval"])
        )
    elif hint is str:
        ok = isinstance(value, str) and (meta.get("choices") is not None or value != "")
    else:
        raise TypeError(f"settings: unsupported field type {hint!r}")
    if ok and meta.get("interval") is not None and hint in (int, float):
        ok = _inside(value, meta["interval"])
    if ok and meta.get("choices") is not None:
        ok = value in meta["choices"]
    return ok


_CHECKED: dict[str, type] = {}  # every settings class by name: resolves string annotations


def _hints(cls) -> dict[str, Any]:
    # With ``from __future__ import annotations`` the field types are strings, resolved in the
    # defining module. A module run by runpy (``python -m``) is not in sys.modules under the name
    # its classes carry, so there the strings are read against the known settings classes
    # (``evolve.EvolutionSettings`` as ``EvolutionSettings``).
    try:
        return typing.get_type_hints(cls, localns=_CHECKED)
    except NameError:
        return {
            f.name: eval(re.sub(r"\b\w+\.(\w+)", r"\1", f.type), {"Any": Any}, _CHECKED)
            if isinstance(f.type, str)
            else f.type
            for f in dataclasses.fields(cls)
        }


# ---------------------------------------------------------------------------------------------
# the base class


@dataclasses.dataclass
class Checked:
    """Base of every settings dataclass: checks each field against its declaration when built."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        _CHECKED[cls.__name__] = cls

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                isinstance(value, float)
                and value.is_integer()
                and typing.get_origin(hints[f.name]) is None
                and _optional(hints[f.name])[0] is int
            ):
                value = int(value)  # YAML's 1e3 is a float; an int setting takes it when it is whole
            if _optional(hints[f.name])[0] is float and _is_int(value):
                value = float(value)
            setattr(self, f.name, value)
            if not _valid(value, hints[f.name], dict(f.metadata)):
                raise ConfigError(
                    f"{f.name}: expected {_describe(hints[f.name], dict(f.metadata))}, got {shown(value)}"
                )
        self.check()

    def check(self) -> None:
        """Rules between fields; raise ``ConfigError`` (see ``fail``). None by default."""

    def fail(self, name: str, what: str) -> None:
        """Raise the one-line error for field ``name``."""
        raise ConfigError(f"{name}: {what}, got {shown(getattr(self, name))}")


def micro_batch_setting() -> Any:
    """The ``micro_batch_size`` field of settings that train with a ``batch_size`` (check it with
    :func:`check_micro_batch`)."""
    return setting(
        0, "[0, 65536]", doc="rows per forward/backward pass, accumulated to batch_size (0: the whole batch)"
    )


def check_micro_batch(settings: Checked) -> None:
    """Fail unless ``settings.micro_batch_size`` is 0 or divides ``settings.batch_size``."""
    micro, batch = settings.micro_batch_size, settings.batch_size  # type: ignore[attr-defined]
    if micro and batch % micro:
        settings.fail("micro_batch_size", f"must divide batch_size ({batch})")


def fields_of(cls) -> dict[str, dataclasses.Field]:
    """``{name: field}`` of a settings dataclass."""
    return {f.name: f for f in dataclasses.fields(cls)}


def from_dict(cls, values: Any, where: str) -> Any:
    """``cls`` built from plain values; ``where`` (e.g. ``"bitnet"``) prefixes every error."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {shown(values)}")
    fields, hints = fields_of(cls), _hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; allowed: {', '.join(fields)}")
    built = {}
    for name, value in values.items():
        inner, _ = _optional(hints[name])
        built[name] = (
            from_dict(inner, value, f"{where}.{name}")
            if dataclasses.is_dataclass(inner) and value is not None
            else value
        )
    try:
        return cls(**built)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def to_dict(settings: Any) -> dict:
    """The plain values of a settings object (nested ones as mappings)."""
    return dataclasses.asdict(settings)


def replace(settings: Any, values: dict, where: str) -> Any:
    """A copy of ``settings`` with ``values`` (a nested mapping) applied, checked like ``from_dict``."""
    merged = to_dict(settings)
    _deep_update(merged, values, where)
    return from_dict(type(settings), merged, where)


def _deep_update(target: dict, values: dict, where: str) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value, f"{where}.{key}")
        else:
            target[key] = value


def undeclared(cls, prefix: str = "") -> list[str]:
    """Fields of ``cls`` (and nested settings) whose accepted values are not declared: numbers
    without an interval, strings without choices. Strings may be free text; numbers may not."""
    missing = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint, _ = _optional(hints[f.name])
        element = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        if dataclasses.is_dataclass(element):
            missing += undeclared(element, f"{prefix}{f.name}.")
        elif element in (int, float) and f.metadata.get("interval") is None and f.metadata.get("choices") is None:
            missing.append(f"{prefix}{f.name}")
    return missing


def describe(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(key, accepted values, default, doc)`` for every field, nested ones flattened: the
    commented example config is written from this."""
    rows = []
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint, _ = _optional(hints[f.name])
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
        else:
            rows.append(
                (
                    f"{prefix}{f.name}",
                    _describe(hints[f.name], dict(f.metadata)),
                    getattr(defaults, f.name),
                    f.metadata.get("doc", ""),
                )
            )
    return rows
