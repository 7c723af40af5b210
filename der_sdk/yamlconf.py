"""Line-numbered YAML for configuration files, shared by the inventory and agent loaders.

:func:`parse_yaml` builds plain Python data whose mappings and sequences remember where
they came from (:class:`LineDict`, :class:`LineList`), so a loader can name the file, line
and field of every problem. :class:`Issues` collects problems so a loader reports all of
them at once in one :class:`~der_sdk.errors.ConfigError`, and :class:`Section` reads typed
fields out of one mapping with the field path (``assets[2].max_mw``) and line at hand.

Reading goes through plain file I/O (:func:`read_text`): configuration is loaded at
start-up, before any event loop runs.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Collection, Iterator
from typing import Any, Final, TypeVar

import msgspec
import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from der_sdk.errors import ConfigError, ConfigIssue

__all__ = [
    "MISSING",
    "Issues",
    "LineDict",
    "LineList",
    "Section",
    "describe_validation_error",
    "join_field",
    "parse_yaml",
    "read_text",
    "top_level_mapping",
    "type_name",
]

T = TypeVar("T")
_C = TypeVar("_C", "LineDict", "LineList")


class _Missing:
    """The marker for a key that is absent (``None`` is a legitimate YAML value)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


class LineDict(dict[Any, Any]):
    """A YAML mapping that knows its own line and the line of each key (1-based)."""

    line: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines: dict[Any, int] = {}
        self.value_lines: dict[Any, int] = {}
        self.duplicate_keys: list[tuple[Any, int, int]] = []  # key, line, first line

    def line_of(self, key: Any) -> int | None:
        """The line of ``key``, else of the mapping itself."""
        return self.key_lines.get(key, self.line)


class LineList(list[Any]):
    """A YAML sequence that knows its own line and the line of each item (1-based)."""

    line: int | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int | None:
        """The line of item ``index``, else of the sequence itself."""
        if 0 <= index < len(self.item_lines):
            return self.item_lines[index]
        return self.line


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader whose mappings and sequences record the line of every key and item."""


def _construct_mapping(loader: _LineLoader, node: MappingNode) -> Iterator[LineDict]:
    data = LineDict()
    data.line = _line(node)
    yield data
    # Duplicate keys are legal for PyYAML (the last wins) but almost always a mistake in a
    # hand-edited file; note them here, report them with their field path later.
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                data.duplicate_keys.append((key_node.value, _line(key_node), seen[ident]))
            else:
                seen[ident] = _line(key_node)
    data.update(loader.construct_mapping(node))  # flattens merge keys (<<) in place
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        try:
            data.key_lines[key] = _line(key_node)
            data.value_lines[key] = _line(value_node)
        except TypeError:  # unhashable key; construct_mapping has already refused it
            pass


def _construct_sequence(loader: _LineLoader, node: SequenceNode) -> Iterator[LineList]:
    data = LineList()
    data.line = _line(node)
    yield data
    data.extend(loader.construct_sequence(node))
    data.item_lines = [_line(item) for item in node.value]


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


# --------------------------------------------------------------------------- issues


class Issues:
    """Problems found in one file, collected so that all of them are reported together."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[ConfigIssue] = []

    def add(self, line: int | None, field: str | None, message: str) -> None:
        self.items.append(ConfigIssue(self.path, line, field, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        """Raise one :class:`ConfigError` listing every issue, ordered by line."""
        if self.items:
            ordered = sorted(self.items, key=lambda i: (i.line is not None, i.line or 0))
            raise ConfigError(ordered)


def read_text(path: str | os.PathLike[str]) -> str:
    """The text of a configuration file, with every failure as a :class:`ConfigError`.

    Plain blocking file I/O on purpose: configuration is read at start-up, before the
    event loop runs.
    """
    label = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        message = f"file not found (working directory: {os.getcwd()}); check the path"
    except IsADirectoryError:
        message = "is a directory, expected a YAML file"
    except PermissionError:
        message = "permission denied; check the file's permissions"
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        message = f"cannot be read: {exc.strerror or exc}"
    raise ConfigError([ConfigIssue(label, None, None, message)])


def parse_yaml(text: str, path: str) -> Any:
    """Parse ``text`` with line tracking.

    :raises ConfigError: the YAML is malformed (the issue carries the line), or a mapping
        repeats a key (every repetition is named with its field path and both lines).
    :return: the document, ``None`` for an empty one.
    """
    try:
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        parts = [p for p in (exc.context, exc.problem) if p]
        detail = "; ".join(parts) or "syntax error"
        raise ConfigError([ConfigIssue(path, line, None, f"invalid YAML: {detail}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(path, None, None, f"invalid YAML: {exc}")]) from None
    issues = Issues(path)
    _report_duplicate_keys(data, "", issues)
    issues.raise_if_any()
    return data


def _report_duplicate_keys(value: Any, prefix: str, issues: Issues) -> None:
    if isinstance(value, LineDict):
        for key, line, first in value.duplicate_keys:
            issues.add(
                line,
                join_field(prefix, str(key)),
                f"duplicate key {key!r} (first on line {first}); remove one of them",
            )
        for key, item in value.items():
            _report_duplicate_keys(item, join_field(prefix, str(key)), issues)
    elif isinstance(value, LineList):
        for index, item in enumerate(value):
            _report_duplicate_keys(item, f"{prefix}[{index}]", issues)


# --------------------------------------------------------------------------- typed fields


def join_field(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def describe_validation_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    """Split a msgspec error into ``(path, message)``.

    ``"Expected `float`, got `str` - at `$.a[0].b`"`` becomes
    ``(".a[0].b", "expected float, got str")``; ``path`` is ``""`` at the top level.
    """
    text = str(exc)
    match = _AT_PATH.search(text)
    path = ""
    if match:
        path = match.group("path")
        text = text[: match.start()]
    text = text.replace("| null`", "| None`").replace("`null`", "`None`").replace("`", "")
    return path, text[:1].lower() + text[1:]


def type_name(value: Any) -> str:
    """A YAML-ish name for the type of ``value``, for messages."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


class Section:
    """Typed access to one YAML mapping, naming fields as ``prefix.key``.

    Each getter returns the converted value, the default when the key is absent, or
    :data:`MISSING` after recording an issue (so a caller can skip dependent checks).
    """

    def __init__(self, issues: Issues, mapping: LineDict, prefix: str = "") -> None:
        self.issues = issues
        self.mapping = mapping
        self.prefix = prefix

    def field(self, key: str) -> str:
        return join_field(self.prefix, key)

    def line(self, key: str | None = None) -> int | None:
        return self.mapping.line if key is None else self.mapping.line_of(key)

    def error(self, key: str, message: str) -> None:
        self.issues.add(self.line(key), self.field(key), message)

    def check_keys(self, allowed: Collection[str]) -> None:
        """Report every key not in ``allowed``, with the allowed keys and a close match."""
        for key in self.mapping:
            if isinstance(key, str) and key in allowed:
                continue
            hint = ""
            if isinstance(key, str):
                close = difflib.get_close_matches(key, list(allowed), n=1)
                if close:
                    hint = f" (did you mean {close[0]!r}?)"
            self.issues.add(
                self.mapping.line_of(key),
                self.field(str(key)),
                f"unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}",
            )

    def get(self, key: str, typ: Any, *, default: Any = MISSING, required: bool = False) -> Any:
        """The value of ``key`` converted to ``typ`` (msgspec rules: strict, int→float ok)."""
        if key not in self.mapping:
            if required:
                self.issues.add(self.line(), self.field(key), f"missing required key {key!r}")
            return default
        value = self.mapping[key]
        try:
            return msgspec.convert(value, typ)
        except msgspec.ValidationError as exc:
            _, message = describe_validation_error(exc)
            if isinstance(value, bool | int | float) and "expected str" in message:
                message += "; quote the value to make it text"
            self.error(key, message)
            return MISSING

    def string(self, key: str, *, default: Any = MISSING, required: bool = False) -> Any:
        value = self.get(key, str, default=default, required=required)
        if isinstance(value, str) and not value.strip():
            self.error(key, "must not be empty")
            return MISSING
        return value

    def number(
        self,
        key: str,
        *,
        default: Any = MISSING,
        required: bool = False,
        nullable: bool = False,
    ) -> Any:
        """A finite float (``None`` too when ``nullable``)."""
        value = self.get(
            key, float | None if nullable else float, default=default, required=required
        )
        if isinstance(value, float) and not math.isfinite(value):
            self.error(key, f"must be a finite number, got {value}")
            return MISSING
        return value

    def mapping_at(self, key: str, *, required: bool = False) -> LineDict | _Missing | None:
        """The mapping under ``key``: ``None`` when absent (or null), MISSING if not a mapping."""
        return self._container_at(key, LineDict, "a mapping", required)

    def list_at(self, key: str, *, required: bool = False) -> LineList | _Missing | None:
        """The list under ``key``: ``None`` when absent (or null), MISSING if not a list."""
        return self._container_at(key, LineList, "a list", required)

    def _container_at(
        self, key: str, kind: type[_C], what: str, required: bool
    ) -> _C | _Missing | None:
        if key not in self.mapping:
            if required:
                self.issues.add(self.line(), self.field(key), f"missing required key {key!r}")
            return None
        value = self.mapping[key]
        if value is None:
            return None
        if not isinstance(value, kind):
            self.error(key, f"expected {what}, got {type_name(value)}")
            return MISSING
        return value


def top_level_mapping(data: Any, issues: Issues, what: str) -> LineDict | None:
    """``data`` if it is a mapping, else record why not (empty file, wrong shape)."""
    if data is None:
        issues.add(1, None, f"file is empty; expected a mapping with {what}")
        return None
    if not isinstance(data, LineDict):
        line = data.line if isinstance(data, LineList) else 1
        issues.add(
            line,
            None,
            f"top level must be a mapping with {what}, got {type_name(data)}",
        )
        return None
    return data
