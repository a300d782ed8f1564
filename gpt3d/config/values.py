"""How settings arrive: YAML mappings and flags (flat or by section) read, named, and coerced strictly to each
field's type (`flatten`, `apply_flat`, `apply_layer`, `read_settings_file`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import IO, Any, Optional, Union
from collections.abc import Callable

from ..errors import ConfigError
from .schema import SECTIONS, Sections


def field_index() -> dict:
    """Map every field name to its section, refusing duplicates so a flat key is unambiguous."""
    index = {}
    for section, klass in SECTIONS.items():
        for f in dataclasses.fields(klass):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = section
    return index


def flatten(d: dict, source: str = "config") -> dict:
    """Accept both `{model: {num_layers: 2}}` and flat `{num-layers: 2}` YAML styles."""
    flat = {}

    def name(key: Any) -> str:
        if not isinstance(key, str):
            raise ConfigError(f"setting names in {source} are words like num_layers, got {key!r}")
        return key.replace("-", "_")
    for key, value in (d or {}).items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"section '{key}' in {source} must be a mapping of settings, got {value!r}")
            for k, v in value.items():
                flat[name(k)] = v
        else:
            flat[name(key)] = value
    index = field_index()
    for key in flat:
        if key not in index:
            close = difflib.get_close_matches(key, index, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown setting '{key}' in {source}{hint}")
    return flat


def read_settings_file(path: str, load: Callable[[IO[str]], Any],
                       parse_error: Union[type[Exception], tuple[type[Exception], ...]],
                       describe: Callable[[Exception], str], missing: str, expected: str) -> dict:
    """The mapping that `load` parses from the file at `path` (a YAML config, a ds_config.json), or one
    ConfigError line: `missing` when there is no such file, `path: describe(error)` when `load` raises
    `parse_error`, `path: expected` when the file holds something other than a mapping (or is not UTF-8 text,
    or is nested too deeply to parse)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = load(fh)
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except parse_error as e:
        raise ConfigError(f"{path}: {describe(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {expected}")
    return data


def apply_flat(cfg: Sections, flat: dict) -> None:
    index = field_index()
    for key, value in flat.items():
        section = getattr(cfg, index[key])
        setattr(section, key, _coerce(section, key, value))


def apply_layer(cfg: Sections, flat: dict, source: str, order: Optional[list] = None) -> None:
    """One layer of settings (a YAML file, then the flags) over `cfg`, as `apply_flat`, where a data path
    means real data: a layer that names a data path turns off an earlier layer's mock_data. A layer that asks
    for both decides by `order` (the command line's: the later flag wins, so a launcher's extra --mock-data
    overrides its --data-path) and is refused without one (a YAML file). It used to train on mock tokens,
    silently, with the data path given."""
    mock = _coerce(cfg.data, "mock_data", flat["mock_data"]) if "mock_data" in flat else None
    paths = _coerce(cfg.data, "data_path", flat["data_path"]) if "data_path" in flat else None
    last = next((k for k in reversed(order or []) if k in ("mock_data", "data_path")), None)
    if paths and mock and last is None:
        raise ConfigError(f"{source} asks for both mock data and --data-path {' '.join(paths)} (mock data trains "
                          "on synthetic tokens, a data path on your data): give one")
    apply_flat(cfg, flat)
    if paths and (mock is None or last == "data_path"):
        cfg.data.mock_data = False


@functools.cache
def optional_fields(klass: type) -> frozenset:
    """The fields of a config section that may be unset (None)."""
    return frozenset(name for name, t in typing.get_type_hints(klass).items()
                     if typing.get_origin(t) is typing.Union and type(None) in typing.get_args(t))


@functools.cache
def field_types(klass: type) -> dict:
    """{field name: its type without Optional} of a config section, read from the annotations."""
    out = {}
    for name, t in typing.get_type_hints(klass).items():
        if typing.get_origin(t) is typing.Union:
            t = next(a for a in typing.get_args(t) if a is not type(None))
        out[name] = typing.get_origin(t) or t
    return out


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _coerce(section, key: str, value: Any) -> Any:
    """`value` (from YAML, flags or a saved config) as the field's type, strictly: a bool is not a number, a
    number is not a string (a path, a split) nor a list, a non-integral number is not an int. Numbers written
    as strings (PyYAML reads `3e-4` and `300e9` as strings) are read as numbers."""
    klass = type(section)
    t = field_types(klass)[key]
    if value is None:
        if key in optional_fields(klass):
            return None
        raise ConfigError(f"setting '{key}' needs a value ({t.__name__}), got null")

    def bad(hint: str = "") -> ConfigError:
        return ConfigError(f"setting '{key}' expects {t.__name__}, got {value!r}{hint}")
    if t is list:
        if isinstance(value, str):
            return value.split()
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                    for v in value):
            return [str(v) for v in value]
        raise bad(" (a path, or weights and paths: [0.7, data/web, 0.3, data/books])")
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise bad(" (true or false)")
    if isinstance(value, str) and "\0" in value or isinstance(value, (list, tuple)) and any(
            isinstance(v, str) and "\0" in v for v in value):
        raise bad(" (a NUL character)")
    if t is str:
        if isinstance(value, str):
            return value
        raise bad(f" (in YAML, quote it: {key}: \"{value}\")" if isinstance(value, (int, float)) else "")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad()
    if t is int:
        if isinstance(value, int):
            return value
        try:
            return int(value) if isinstance(value, str) else _integral(value)
        except ValueError:
            pass
        try:
            return _integral(float(value))
        except (ValueError, OverflowError):
            raise bad() from None
    if t is float:
        try:
            return float(value)
        except (ValueError, OverflowError):
            raise bad() from None
    return value


def _integral(x: float) -> int:
    if not (x == x and abs(x) != float("inf") and x.is_integer()):
        raise ValueError(x)
    return int(x)
