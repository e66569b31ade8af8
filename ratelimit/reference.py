"""Limits files in the format of Envoy's reference rate-limit service (envoyproxy/ratelimit).

A team moving from the reference service keeps its files::

    domain: messaging
    descriptors:
      - key: message_type
        value: marketing            # optional; "foo*" matches every value starting with foo
        descriptors:                # nested: matched entry by entry
          - key: to_number
            rate_limit: {unit: day, requests_per_unit: 5, name: marketing}
            shadow_mode: true       # counted and reported, never denies
            detailed_metric: true   # stats per value, not rolled up
      - key: to_number
        rate_limit:
          unit: day                 # second minute hour day week month year
          requests_per_unit: 100
          replaces: [{name: marketing}]   # where both match, only this one counts
      - key: internal
        rate_limit: {unlimited: true}
      - key: path
        value: "/api/*/orders*"     # "*" anywhere: any run of characters; first match in file order
        share_threshold: true       # every matching value counts against one shared counter
        value_to_metric: true       # stats name the request's value, not the pattern
        rate_limit: {unit: minute, requests_per_unit: 50}

``load`` parses files into one ``Node`` tree per domain, checking what the reference checks (a
key on every descriptor, known units, no unit on unlimited, no duplicate ``key_value`` on a
level, no duplicate domain across files, no empty or self ``replaces``) and reporting every
problem as ``FILE:LINE: key.path: problem``. Windows are clock-aligned fixed windows, counted
as the reference counts them (``algorithms.COUNTED``). ``metadata`` is accepted and not used;
``quota_mode`` is refused by name (the README says why). The domain ``sidegate`` belongs to
gateway.yaml's limits.

``folder_files`` lists the files of a config folder as the reference's runtime finds them, with
symlinks resolved, so that a swap of the folder's symlink shows as a change of the list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ratelimit.algorithms import COUNTED
from ratelimit.limits import UNIT_MS, Node, Rule
from sidegate import config
from sidegate.contract import RATELIMIT_DOMAIN
from sidegate.errors import ConfigError

_Path = config.KeyPath
_TOP_KEYS = frozenset({"domain", "descriptors"})
_DESCRIPTOR_KEYS = frozenset(
    {
        "key",
        "value",
        "rate_limit",
        "descriptors",
        "shadow_mode",
        "detailed_metric",
        "share_threshold",
        "value_to_metric",
        "metadata",
        "quota_mode",
    }
)
_LIMIT_KEYS = frozenset({"unit", "requests_per_unit", "unlimited", "name", "replaces", "quota_mode"})
MAX_REQUESTS = 2**32 - 1  # uint32, as in the reference
QUOTA_MODE = "quota_mode is not supported: remove it (see the README, Migrating from envoyproxy/ratelimit)"
CONFIG_SUFFIXES = (".yaml", ".yml")


def folder_files(folder: str | Path, *, ignore_dotfiles: bool = False) -> list[Path]:
    """The config files under ``folder`` (its whole tree, ``*.yaml`` and ``*.yml``), sorted.

    Paths come back resolved: when ``folder`` or a parent is a symlink that is swapped to another
    directory (the reference runtime's way to publish a new config), the list changes. A missing
    folder lists nothing. Pure apart from reading the directory tree: the caller watches.
    """
    root = Path(os.path.realpath(folder))
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if ignore_dotfiles and any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in CONFIG_SUFFIXES and path.is_file():
            found.append(Path(os.path.realpath(path)))
    return sorted(found)


def wildcard(value: str) -> re.Pattern[str] | None:
    """A value with ``*`` in it as a pattern (``*`` is any run of characters), else None."""
    if "*" not in value:
        return None
    return re.compile(".*".join(re.escape(part) for part in value.split("*")), re.DOTALL)


def load(paths: Iterable[str | Path], *, on_store_error: str = "allow", shadow: bool = False) -> dict[str, Node]:
    """Parse reference-format files into ``{domain: tree}``; raises ``ConfigError`` (every
    problem in ``.errors``, by file then line; the first one in ``str()``)."""
    domains: dict[str, Node] = {}
    errors: list[ConfigError] = []
    for path in paths:
        file = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            errors.append(ConfigError(file, None, "", f"cannot read: {exc.strerror}"))
            continue
        try:
            domain, root, line, problems = _parse(text, file, on_store_error, shadow)
        except ConfigError as exc:  # not YAML, or not a mapping
            errors.append(exc)
            continue
        errors += problems
        if not problems and domain in domains:
            errors.append(ConfigError(file, line, "domain", f"duplicate domain {domain!r}: an earlier file has it"))
        elif not problems:
            domains[domain] = root
    if errors:
        raise config.combined(errors)
    return domains


def parse(
    text: str, file: str = "ratelimit.yaml", *, on_store_error: str = "allow", shadow: bool = False
) -> tuple[str, Node]:
    """One file's text → (domain, its tree); raises ``ConfigError`` like ``load``."""
    domain, root, _line, problems = _parse(text, file, on_store_error, shadow)
    if problems:
        raise config.combined(problems)
    return domain, root


def _parse(text: str, file: str, on_store_error: str, shadow: bool) -> tuple[str, Node, int | None, list[ConfigError]]:
    data, lines = config.compose(text, file)
    if not isinstance(data, dict):
        raise ConfigError(file, 1, "", "top level must be a mapping")
    problems: list[tuple[_Path, str]] = list(_unknown(data, (), _TOP_KEYS))
    domain = data.get("domain")
    if not isinstance(domain, str) or not domain.strip():
        problems.append((("domain",), "required: a non-empty string"))
        domain = ""
    elif domain == RATELIMIT_DOMAIN:
        problems.append((("domain",), f"{domain!r} is reserved for gateway.yaml's plans and API limits"))
    root = Node(path=domain)
    descriptors = data.get("descriptors", [])
    if not isinstance(descriptors, list):
        problems.append((("descriptors",), "must be a list"))
        descriptors = []
    problems += _load_level(root, descriptors, ("descriptors",), on_store_error, shadow)
    errors = config.located(file, lines, problems)
    errors.sort(key=lambda e: e.line or 0)
    return domain, root, lines.get(("domain",)), errors


def _unknown(mapping: dict[str, Any], path: _Path, known: frozenset[str]) -> Iterator[tuple[_Path, str]]:
    for key in mapping:
        if key not in known:
            yield (*path, key), "unknown key"


def _text(value: object) -> str | None:
    """A key or value as the reference reads it: strings, and numbers written bare."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _flag(data: dict[str, Any], key: str, path: _Path, problems: list[tuple[_Path, str]]) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        problems.append(((*path, key), "must be true or false"))
        return False
    return value


def _load_level(
    parent: Node, items: list[Any], path: _Path, on_store_error: str, shadow: bool
) -> list[tuple[_Path, str]]:
    problems: list[tuple[_Path, str]] = []
    for i, item in enumerate(items):
        here = (*path, i)
        if not isinstance(item, dict):
            problems.append((here, "must be a mapping"))
            continue
        problems += _unknown(item, here, _DESCRIPTOR_KEYS)
        key = _text(item.get("key"))
        if not key:
            problems.append(((*here, "key"), "required: a non-empty string"))
            continue
        value = None
        if item.get("value") is not None:
            value = _text(item["value"])
            if value is None:
                problems.append(((*here, "value"), "must be a string (quote true/false/yes/no)"))
                continue
            value = value or None
        node_path = f"{parent.path}.{key}" + (f"_{value}" if value else "")
        if (key, value) in parent.children:
            problems.append(((*here, "key"), f"duplicate descriptor {node_path!r} on this level"))
            continue
        if "quota_mode" in item:
            problems.append(((*here, "quota_mode"), QUOTA_MODE))
        pattern = wildcard(value) if value is not None else None
        node = Node(
            path=node_path,
            segment=key + (f"_{value}" if value else ""),
            value=value,
            share=_flag(item, "share_threshold", here, problems) and pattern is not None,
            value_to_metric=_flag(item, "value_to_metric", here, problems),
        )
        shadow_mode = _flag(item, "shadow_mode", here, problems)
        detailed = _flag(item, "detailed_metric", here, problems)
        if "rate_limit" in item:
            node.rule = _rule(item["rate_limit"], node_path, (*here, "rate_limit"), problems)
            if node.rule is not None:
                node.rule = _finish(node.rule, shadow_mode or shadow, detailed, on_store_error)
        children = item.get("descriptors", [])
        if children is None:
            children = []
        if not isinstance(children, list):
            problems.append(((*here, "descriptors"), "must be a list"))
            children = []
        problems += _load_level(node, children, (*here, "descriptors"), on_store_error, shadow)
        parent.children[(key, value)] = node
        if pattern is not None:
            parent.wildcards.append((key, pattern, node))  # file order: the first match wins
    return problems


def _finish(rule: Rule, shadow: bool, detailed: bool, on_store_error: str) -> Rule:
    return Rule(
        id=rule.id,
        policy=rule.policy,
        limit=rule.limit,
        window_ms=rule.window_ms,
        algorithm=rule.algorithm,
        shadow=shadow,
        on_store_error=on_store_error,
        unlimited=rule.unlimited,
        name=rule.name,
        replaces=rule.replaces,
        detailed_metric=detailed,
        reference=True,
    )


def _rule(data: object, node_path: str, path: _Path, problems: list[tuple[_Path, str]]) -> Rule | None:
    if not isinstance(data, dict):
        problems.append((path, "must be a mapping"))
        return None
    before = len(problems)
    problems += _unknown(data, path, _LIMIT_KEYS)
    if "quota_mode" in data:
        problems.append(((*path, "quota_mode"), QUOTA_MODE))
    unlimited = _flag(data, "unlimited", path, problems)
    unit = data.get("unit")
    if unlimited:
        if unit is not None:
            problems.append(((*path, "unit"), "an unlimited rate_limit takes no unit"))
    elif not isinstance(unit, str) or unit.lower() not in UNIT_MS:
        problems.append(((*path, "unit"), f"unknown unit {unit!r} (known: {', '.join(UNIT_MS)})"))
    requests = data.get("requests_per_unit", 0)
    if isinstance(requests, bool) or not isinstance(requests, int) or not 0 <= requests <= MAX_REQUESTS:
        problems.append(((*path, "requests_per_unit"), f"must be a whole number from 0 to {MAX_REQUESTS}"))
    name = data.get("name", "")
    if name is None:
        name = ""
    if not isinstance(name, str):
        problems.append(((*path, "name"), "must be a string"))
        name = ""
    replaces: list[str] = []
    raw = data.get("replaces", [])
    if not isinstance(raw, list):
        problems.append(((*path, "replaces"), "must be a list of {name: ...}"))
        raw = []
    for j, entry in enumerate(raw):
        where = (*path, "replaces", j)
        target = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(entry, dict):
            problems += _unknown(entry, where, frozenset({"name"}))
        if not isinstance(target, str) or not target:
            problems.append((where, "needs a non-empty name"))
        elif target == name:
            problems.append((where, f"a rate_limit cannot replace itself ({name!r})"))
        else:
            replaces.append(target)
    if len(problems) > before:
        return None
    return Rule(
        id=node_path,
        policy=name or node_path,
        limit=int(requests),
        window_ms=UNIT_MS[unit.lower()] if isinstance(unit, str) and not unlimited else 1_000,
        algorithm=COUNTED,
        unlimited=unlimited,
        name=name,
        replaces=frozenset(replaces),
        reference=True,
    )
