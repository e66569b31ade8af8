"""YAML with positions: the line of every key path, and errors that name FILE:LINE:key.

``compose`` reads YAML with this package's rules and returns the data with the line of each key
path. ``located`` and ``combined`` turn ``(key path, problem)`` pairs into one ``ConfigError``.
The gateway.yaml loader and the ratelimit sidecar's reference-config loader both use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from sidegate.errors import ConfigError

# --- loading with line numbers ----------------------------------------------------------

KeyPath = tuple[str | int, ...]


_BOOLEAN_WORDS = {"on", "off", "yes", "no", "y", "n", "true", "false"}


def _compose(text: str, file: str) -> tuple[Any, dict[KeyPath, int]]:
    """YAML → plain Python, plus the 1-based line of every key and list item.

    libyaml's parser reads a plain file (``_fast``); a file with anything else (anchors, merge
    keys, tags, or a problem to report) is read again by PyYAML's own composer, whose errors
    are the ones pinned in tests/bad_configs."""
    try:
        return _fast(text)
    except _UnusualError:
        return _careful(text, file)


class _UnusualError(Exception):
    """Something ``_fast`` leaves to ``_careful``."""


_STR = "tag:yaml.org,2002:str"
# First characters of a plain scalar that may be a bool, number, null, date, merge key, …
_RESOLVED_FIRST = frozenset(k for k in yaml.SafeLoader.yaml_implicit_resolvers if k is not None)


def _fast(text: str) -> tuple[Any, dict[KeyPath, int]]:
    """``_careful``'s result for a file of plain mappings, lists and scalars, from libyaml's
    events (several times faster: a big gateway.yaml is read on every edit)."""
    if None in yaml.SafeLoader.yaml_implicit_resolvers or not hasattr(yaml, "CSafeLoader"):
        raise _UnusualError
    events = _Events(yaml.CSafeLoader(text))
    try:
        events.expect(yaml.StreamStartEvent)
        events.expect(yaml.DocumentStartEvent)  # none: an empty file
        data = events.build(events.get(), ())
        events.expect(yaml.DocumentEndEvent)
        events.expect(yaml.StreamEndEvent)  # else: more than one document
        return data, events.lines
    except yaml.YAMLError:
        raise _UnusualError from None
    finally:
        events.loader.dispose()


class _Events:
    """libyaml's events of one document → plain Python and the line of every key path."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.get = loader.get_event
        self.lines: dict[KeyPath, int] = {}

    def expect(self, kind: type) -> None:
        if type(self.get()) is not kind:
            raise _UnusualError

    def scalar(self, event: Any) -> Any:
        if event.anchor is not None or event.tag is not None:
            raise _UnusualError
        value = event.value
        if event.implicit[0] and value and value[0] not in _RESOLVED_FIRST:
            return value  # a plain string: no resolver looks at it
        tag = self.loader.resolve(yaml.ScalarNode, value, event.implicit)
        if tag == _STR:
            return value
        return self.loader.construct_object(yaml.ScalarNode(tag, value, event.start_mark, event.end_mark))

    def build(self, event: Any, path: KeyPath) -> Any:
        self.lines.setdefault(path, _first_line(event))
        kind = type(event)
        if kind is yaml.ScalarEvent:
            return self.scalar(event)
        if kind is yaml.AliasEvent or event.anchor is not None or event.tag is not None:
            raise _UnusualError
        if kind is yaml.MappingStartEvent:
            out: dict[Any, Any] = {}
            while type(key_event := self.get()) is not yaml.MappingEndEvent:
                if type(key_event) is not yaml.ScalarEvent:
                    raise _UnusualError
                key = self.scalar(key_event)
                if not isinstance(key, str) or key in out or key == "<<":
                    raise _UnusualError  # not a string, a duplicate, a merge key
                self.lines[(*path, key)] = _first_line(key_event)
                out[key] = self.build(self.get(), (*path, key))
            return out
        if kind is yaml.SequenceStartEvent:
            items: list[Any] = []
            while type(item := self.get()) is not yaml.SequenceEndEvent:
                items.append(self.build(item, (*path, len(items))))
            return items
        raise _UnusualError


def _first_line(event: Any) -> int:
    return int(event.start_mark.line) + 1


def _careful(text: str, file: str) -> tuple[Any, dict[KeyPath, int]]:
    """PyYAML's composer, node by node, with this module's rules and errors."""
    loader = yaml.SafeLoader(text)
    lines: dict[KeyPath, int] = {}

    def build(node: yaml.Node, path: KeyPath) -> Any:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # YAML merge keys (<<)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if isinstance(key, bool) and str(key_node.value).lower() in _BOOLEAN_WORDS:
                    raise ConfigError(
                        file, line, _dotted(path), f"YAML reads the key {key_node.value!r} as a boolean: quote it"
                    )
                if not isinstance(key, str):
                    raise ConfigError(file, line, _dotted(path), f"keys must be strings, not {key!r}")
                if key in out:
                    raise ConfigError(file, line, _dotted((*path, key)), "duplicate key")
                lines[(*path, key)] = line
                out[key] = build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        return loader.construct_object(node)

    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(file, 1, "", "empty file")
        return build(node, ()), lines
    except yaml.composer.ComposerError as exc:
        if "single document" in str(exc.context):
            mark = exc.problem_mark
            raise ConfigError(file, mark.line + 1 if mark else None, "", "only one YAML document is allowed") from None
        raise ConfigError(file, _mark_line(exc), "", f"not valid YAML: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        problem = f"not valid YAML: {exc.problem}"
        if exc.context and exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError(file, _mark_line(exc), "", problem) from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, None, "", f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _mark_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return mark.line + 1 if mark else None


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(lines: Mapping[KeyPath, int], path: KeyPath) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _problem(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "too_short":
        return "must not be empty"
    if kind in ("tuple_type", "list_type"):
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if message.startswith("Input should"):
        message = "i" + message[1:]
    if kind == "string_type" and isinstance(error.get("input"), bool):
        message += " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
    return message


Problem = tuple[KeyPath, str]  # (key path, what is wrong there)


def located(file: str, lines: Mapping[KeyPath, int], problems: Iterable[Problem]) -> list[ConfigError]:
    """Each problem as a ``ConfigError`` naming the file, the line of its key path and the path."""
    return [ConfigError(file, _line(lines, path), _dotted(path), problem) for path, problem in problems]


def combined(errors: Sequence[ConfigError]) -> ConfigError:
    """The first error, carrying every error's message in ``.errors``: what a loader raises."""
    first = errors[0]
    first.errors = tuple(str(e) for e in errors)
    return first


def by_line(errors: Iterable[ConfigError]) -> list[ConfigError]:
    """``errors`` in the order of their lines in the file (the file's own errors first)."""
    return sorted(errors, key=lambda e: e.line or 0)


def compose(text: str, file: str) -> tuple[Any, dict[KeyPath, int]]:
    """YAML text → plain Python and the line of every key path, with this module's YAML rules.

    For other files that want ``FILE:LINE`` errors (the ratelimit sidecar's reference configs).
    """
    return _compose(text, file)
