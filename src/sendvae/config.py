"""Typed configuration: dataclasses, YAML presets and ``key=value`` overrides.

Every command's options are a (nested) dataclass. A preset YAML file fills some fields, then
``key=value`` overrides from the command line fill others (``optim.lr=1e-4``). Values are
checked against the field's type and its declared range or choices; any problem raises
:class:`ConfigError` naming the key and the offending value. The resolved config is written
into each run directory with :func:`save_config`, and reads back to an equal object.

Declare a field with :func:`param` so its help text, range and choices live next to it::

    @dataclass
    class OptimConfig:
        lr: float = param(3e-4, "AdamW learning rate", min=0.0)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from sendvae.errors import UserError

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range (the message names it)."""


def param(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    choices: typing.Sequence[Any] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field carrying its help text and validity range (checked by :func:`validate`)."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to type ``tp`` or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(f"[{value}]") if not value.startswith("[") else yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return int(value)
        try:
            return int(value) if isinstance(value, int) else int(str(value).replace("_", ""))
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
            if not as_float.is_integer():
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
            return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _check_range(value: Any, field: dataclasses.Field, key: str) -> None:
    meta = field.metadata
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {list(meta['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping, checking every key, type and range."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (known keys under {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        coerced = _coerce(value, hints[name], key)
        _check_range(coerced, fields[name], key)
        values[name] = coerced
    try:
        obj = cls(**values)
    except TypeError as exc:
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"missing required key {prefix}{missing[0] if missing else '?'}") from exc
    validate(obj, prefix)
    return obj


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of ``cfg`` (recursively) against its type range and choices."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{field.name}.")
        else:
            _check_range(value, field, f"{prefix}{field.name}")
    post = getattr(cfg, "check", None)
    if callable(post):
        post()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-friendly data (tuples become lists, paths strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a group of keys")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=1e-4", "data.resolution=64"]`` into a nested mapping (values parsed as YAML)."""
    data: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        _set_path(data, key, value)
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (its own report spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key=value`` overrides."""
    data: dict[str, Any] = to_dict(cls()) if _has_all_defaults(cls) else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        try:
            from_dict(cls, _merge(data, loaded))  # name the file in errors that come from it
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        data = _merge(data, loaded)
    return from_dict(cls, _merge(data, parse_overrides(overrides)))


def _has_all_defaults(cls: type) -> bool:
    try:
        cls()
    except TypeError:
        return False
    return True


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (reads back with :func:`load_config` to an equal object)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key: ``name (type, default): help`` for ``--help`` epilogs."""
    lines = []
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, f"{prefix}{field.name}."))
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else "required")
        lines.append(f"  {prefix}{field.name} = {default!r}  {field.metadata.get('help', '')}".rstrip())
    return lines
