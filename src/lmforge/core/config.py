"""Typed config dataclasses: load from YAML, apply dotted overrides, reject bad input.

Every config in lmforge is a dataclass deriving from :class:`Config`. ``from_dict``
checks each key against the dataclass fields and each value against the field's type
annotation, so a typo or a wrong type fails at start-up with a message naming the key
(``model.n_layers: expected int, got str 'eight'``) instead of deep inside a run.

Hand-written rather than pydantic/omegaconf: the checks needed are small (a few
annotation shapes), and keeping configs as plain dataclasses lets them carry ``build()``
methods and be read top to bottom without a framework.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from lmforge.core.errors import ConfigError

_NONE_TYPE = type(None)


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if origin in (list, tuple):
        args = get_args(annotation)
        return f"list of {_describe(args[0])}" if args else "list"
    if origin is dict:
        args = get_args(annotation)
        return f"mapping of str to {_describe(args[1])}" if args else "mapping"
    if annotation is _NONE_TYPE:
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, Config):
        return f"mapping ({annotation.__name__})"
    return getattr(annotation, "__name__", str(annotation))


def _fail(path: str, annotation: Any, value: Any) -> typing.NoReturn:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise ConfigError(
        f"{path}: expected {_describe(annotation)}, got {type(value).__name__} {shown}"
    )


# A number in exponent notation without a decimal point (3e-4, 1E6): YAML 1.1 resolves it as a
# string, so PyYAML hands over "3e-4" for `lr: 3e-4`; a float field takes the number it spells.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(path: str, annotation: Any, value: Any) -> Any:
    """Return ``value`` checked against ``annotation`` (ints are accepted for floats)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value in get_args(annotation):
            return value
        _fail(path, annotation, value)
    if origin in (Union, types.UnionType):
        for option in get_args(annotation):
            if option is _NONE_TYPE and value is None:
                return None
        specific: ConfigError | None = None
        for option in get_args(annotation):
            if option is _NONE_TYPE:
                continue
            try:
                return _coerce(path, option, value)
            except ConfigError as exc:
                # A mapping given for an optional section: its own error (naming the inner
                # key) says more than "expected mapping or null".
                if isinstance(value, dict) and isinstance(option, type) and issubclass(option, Config):
                    specific = specific or exc
        if specific is not None:
            raise specific
        _fail(path, annotation, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(path, annotation, value)
        (item_type,) = get_args(annotation)[:1] or (Any,)
        return [_coerce(f"{path}[{i}]", item_type, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, annotation, value)
        key_type, value_type = get_args(annotation) or (str, Any)
        return {
            _coerce(f"{path}.<key>", key_type, k): _coerce(f"{path}.{k}", value_type, v)
            for k, v in value.items()
        }
    if isinstance(annotation, type) and issubclass(annotation, Config):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            _fail(path, annotation, value)
        return annotation.from_dict(value, path=path)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        _fail(path, annotation, value)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(path, annotation, value)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            return float(value)  # 3e-4 in YAML or --set: PyYAML (YAML 1.1) reads it as a string
        _fail(path, annotation, value)
    if annotation is str:
        if isinstance(value, str):
            return value
        _fail(path, annotation, value)
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        _fail(path, annotation, value)
    return value


def _key_text(key: Any) -> str:
    """A key as it should appear in a one-line message (quoted if it is not a plain name)."""
    text = str(key)
    return text if text.replace("_", "").replace("-", "").isalnum() else repr(key)


class FieldValueError(ValueError):
    """Raised by a config's ``__post_init__`` about one of its fields: ``from_dict`` reports
    it under that field's full key (``optim.name: unknown optimizer 'x' (known: ...)``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class Config:
    """Base for config dataclasses (subclasses must be decorated with ``@dataclass``)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, path: str = "") -> "Config":
        data = {} if data is None else data
        prefix = f"{path}." if path else ""
        if not isinstance(data, dict):
            raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted((_key_text(k) for k in set(data) - set(fields)))
        if unknown:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{prefix}{unknown[0]}: unknown key for {cls.__name__} (known keys: {known})"
            )
        kwargs = {}
        for name, field in fields.items():
            if name in data:
                kwargs[name] = _coerce(f"{prefix}{name}", hints[name], data[name])
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{prefix}{name}: required key is missing ({_describe(hints[name])})")
        try:
            instance = cls(**kwargs)
        except FieldValueError as exc:
            raise ConfigError(f"{prefix}{exc.key}: {exc.message}") from exc
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path or cls.__name__}: {exc}") from exc
        return instance

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "Config":
        return cls.from_dict(apply_overrides(read_yaml(path), overrides or []))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; anything else is a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where it is."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (``8``, ``true``, ``[1,2]``)."""
    data = _plain(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.n_layers=8")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data
