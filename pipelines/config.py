"""TOML configuration for any command: presets, files, and flags that override them.

A config is flat keys named like the command's flags (``num_captions`` or ``num-captions``),
optionally grouped in tables (``[sampling]``, ``[policy]``...), which are only for reading.
``--config NAME`` takes a file path or the name of a preset in ``pipelines/presets``.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


def preset_names() -> list[str]:
    folder = resources.files("pipelines").joinpath("presets")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(name: str) -> tuple[str, dict[str, Any]]:
    """(where it came from, flat settings) for a path or a preset name."""
    path = Path(name)
    if path.is_file():
        origin, text = str(path), path.read_text()
    elif name in preset_names():
        origin = f"preset {name}"
        text = resources.files("pipelines").joinpath("presets", f"{name}.toml").read_text()
    else:
        raise ConfigError(f"--config {name}: no such file, and not a preset "
                          f"(presets: {', '.join(preset_names())})")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML ({exc})") from exc
    return origin, _flatten(data, origin)


def _flatten(data: dict, origin: str, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, origin, f"{prefix}{key}."))
        else:
            dest = key.replace("-", "_")
            if dest in flat:
                raise ConfigError(f"{origin}: {prefix}{key} is set twice")
            flat[dest] = value
    return flat


class CommandParser(argparse.ArgumentParser):
    """An argument parser that keeps the arguments added to it, its groups' included, by
    name: a config file's keys are checked and typed against them (argparse keeps its own
    list private)."""

    def __init__(self, *args, **kwargs):
        self.arguments: dict[str, argparse.Action] = {}  # before argparse adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        return self._keep(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args, **kwargs):
        return self._keeping(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *args, **kwargs):
        return self._keeping(super().add_mutually_exclusive_group(*args, **kwargs))

    def _keeping(self, group):
        add = group.add_argument
        group.add_argument = lambda *a, **k: self._keep(add(*a, **k))
        return group

    def _keep(self, action: argparse.Action) -> argparse.Action:
        self.arguments[action.dest] = action
        return action


def apply_config(parser: CommandParser, origin: str, values: dict[str, Any]) -> None:
    """Make ``values`` the parser's defaults, so flags given on the command line still win."""
    actions = {dest: a for dest, a in parser.arguments.items() if dest not in ("help", "config")}
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            known = ", ".join(sorted(actions))
            raise ConfigError(f"{origin}: unknown key {key!r}; this command takes: {known}")
        values[key] = _typed(action, origin, key, value)
    parser.set_defaults(**values)


EXPECTED = {int: ("int", "a whole number without quotes"),
            float: ("float", "a number without quotes"),
            str: ("string", "text in quotes"),
            bool: ("bool", "true or false")}


def _typed(action: argparse.Action, origin: str, key: str, value: Any) -> Any:
    """``value`` as the flag would have given it; a TOML value of another type is refused,
    never coerced (``batch_size = 1.9`` is not 1, and ``true`` is not an int in a config)."""
    if action.nargs == 0:  # store_true / store_false: the value is the flag's result
        return _checked(bool, None, origin, key, value)
    if action.nargs in ("+", "*") or isinstance(action.default, list):  # a list, or append
        # One string where a list is expected is a one-item list: nothing else could be meant.
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{origin}: {key} = {value!r} is not a valid list; expected "
                              "a string or a list of them in brackets")
        return [_checked(action.type or str, action.choices, origin, key, item) for item in items]
    return _checked(action.type or str, action.choices, origin, key, value)


def _checked(kind, choices, origin: str, key: str, value: Any) -> Any:
    if kind not in EXPECTED:  # a flag with its own parser: it says what is wrong
        try:
            return kind(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: {key} = {value!r} is not valid ({exc})") from exc
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
        name, form = EXPECTED[kind]
        raise ConfigError(f"{origin}: {key} = {value!r} is not a valid {name}; write it as "
                          f"{form}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{origin}: {key} = {value!r}; choose one of "
                          f"{', '.join(map(str, choices))}")
    return float(value) if kind is float else value


def to_toml(settings: dict[str, Any]) -> str:
    """The resolved settings as TOML (flat scalars and lists of strings)."""
    lines = []
    for key, value in settings.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


PATH_PREFIXES = ("scratch:", "world:")  # --init scratch:FOLDER, --judge world:FOLDER


def home_path(dest: str, value: str) -> str:
    """``value`` with a leading ``~`` (after any ``scratch:``-like prefix) expanded; a home that
    cannot be found is refused rather than taken as a folder name."""
    prefix = next((p for p in PATH_PREFIXES if value.startswith(p)), "")
    rest = value[len(prefix):]
    if not rest.startswith("~"):
        return value
    expanded = os.path.expanduser(rest)
    if expanded.startswith("~"):
        raise ConfigError(f"--{dest.replace('_', '-')} {value}: no such user's home folder; "
                          "give the path in full")
    return prefix + expanded
