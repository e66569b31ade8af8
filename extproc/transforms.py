"""Body transforms between API versions, as declared in gateway.yaml. Pure: no grpc, no I/O.

A version's ``changes`` say how the next newer version differs from it. A request from a v1
client to the v3 upstream goes *up* through v1's then v2's changes; the response comes back
*down* through their inverses in reverse order. Every change is reversible by construction:

    rename a→b      up: move a to b               down: move b to a
    add f=d         up: set f to d if missing     down: drop f
    remove f=d      up: drop f                    down: set f to d if missing
    map f {a: A}    up: a → A                     down: A → a
    wrap f into k   up: f → {k: f}                down: {k: v} → v

Dotted paths reach into nested objects. A top-level JSON array is transformed item by item.
A path that is absent is left alone; a path that runs through a non-object is an error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extproc.errors import TransformError
from sidegate.config import Api, Change, Gateway, json_key
from sidegate.contract import route_key

_MISSING = object()


def _parent(doc: Any, path: str, create: bool) -> tuple[dict[str, Any] | None, str]:
    *parents, leaf = path.split(".")
    node = doc
    for part in parents:
        if not isinstance(node, dict):
            raise TransformError(f"{path}: {part!r} is inside a non-object")
        if part not in node:
            if not create:
                return None, leaf
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        raise TransformError(f"{path}: not inside an object")
    return node, leaf


def _get(doc: Any, path: str) -> Any:
    parent, leaf = _parent(doc, path, create=False)
    return _MISSING if parent is None else parent.get(leaf, _MISSING)


def _pop(doc: Any, path: str) -> Any:
    parent, leaf = _parent(doc, path, create=False)
    return _MISSING if parent is None else parent.pop(leaf, _MISSING)


def _set(doc: Any, path: str, value: Any) -> None:
    parent, leaf = _parent(doc, path, create=True)
    assert parent is not None
    parent[leaf] = value


def _move(doc: Any, source: str, target: str) -> Any:
    value = _pop(doc, source)
    if value is not _MISSING:
        _set(doc, target, value)
        _prune(doc, source)
    return doc


def _prune(doc: Any, path: str) -> None:
    """Drop the objects a move emptied (``info`` after ``info.title`` moved out), innermost first."""
    parts = path.split(".")[:-1]
    while parts:
        parent, leaf = _parent(doc, ".".join(parts), create=False)
        if parent is None or parent.get(leaf) != {}:
            return
        del parent[leaf]
        parts.pop()


def _default(doc: Any, path: str, value: Any) -> Any:
    if _get(doc, path) is _MISSING:
        _set(doc, path, copy.deepcopy(value))
    return doc


def _drop(doc: Any, path: str) -> Any:
    _pop(doc, path)
    return doc


def _map(doc: Any, path: str, table: dict[str, Any]) -> Any:
    value = _get(doc, path)
    if value is not _MISSING:
        found = table.get(json_key(value), _MISSING)
        if found is not _MISSING:
            _set(doc, path, copy.deepcopy(found) if isinstance(found, (dict, list)) else found)
    return doc


def _wrap(doc: Any, path: str | None, key: str) -> Any:
    if path is None:
        return {key: doc}
    value = _get(doc, path)
    if value is not _MISSING:
        _set(doc, path, {key: value})
    return doc


def _unwrap(doc: Any, path: str | None, key: str) -> Any:
    if path is None:
        return doc[key] if isinstance(doc, dict) and key in doc else doc
    value = _get(doc, path)
    if isinstance(value, dict) and key in value:
        _set(doc, path, value[key])
    return doc


Step = Callable[[Any], Any]


def _steps(change: Change) -> tuple[Step, Step]:
    """(up, down) for one declared change."""
    if change.rename is not None:
        a, b = change.rename.from_, change.rename.to
        return (lambda d: _move(d, a, b)), (lambda d: _move(d, b, a))
    if change.add is not None:
        f, v = change.add.field, change.add.default
        return (lambda d: _default(d, f, v)), (lambda d: _drop(d, f))
    if change.remove is not None:
        f, v = change.remove.field, change.remove.default
        return (lambda d: _drop(d, f)), (lambda d: _default(d, f, v))
    if change.map is not None:
        f = change.map.field
        up = {json_key(k): v for k, v in change.map.values.items()}
        down = {json_key(v): k for k, v in change.map.values.items()}
        return (lambda d: _map(d, f, up)), (lambda d: _map(d, f, down))
    assert change.wrap is not None
    w, k = change.wrap.field, change.wrap.into
    return (lambda d: _wrap(d, w, k)), (lambda d: _unwrap(d, w, k))


def _run(steps: list[Step], doc: Any) -> Any:
    if isinstance(doc, list):
        return [_run(steps, item) for item in doc]
    for step in steps:
        doc = step(doc)
    return doc


@dataclass(frozen=True)
class Chain:
    """The changes between a client's version and the version its upstream speaks."""

    api: str
    client: str
    upstream: str
    up_steps: tuple[Step, ...]
    down_steps: tuple[Step, ...]
    max_body_bytes: int

    def up(self, doc: Any) -> Any:
        """A request body from the client's version to the upstream's."""
        return _run(list(self.up_steps), doc)

    def down(self, doc: Any) -> Any:
        """A response body from the upstream's version to the client's."""
        return _run(list(self.down_steps), doc)


def chain(api: Api, client: str) -> Chain:
    spec = api.versions[client]
    upstream = spec.served_by or client
    names = list(api.versions)
    between = names[names.index(client) : names.index(upstream)]
    pairs = [_steps(change) for name in between for change in api.versions[name].changes]
    return Chain(
        api.name,
        client,
        upstream,
        tuple(up for up, _ in pairs),
        tuple(down for _, down in reversed(pairs)),
        spec.max_body_bytes,
    )


def chains(gateway: Gateway) -> dict[str, Chain]:
    """Every route that needs a body transform, keyed as the compiler names it: ``api:version``."""
    out = {}
    for api in gateway.apis:
        for name, spec in api.versions.items():
            if spec.served_by is not None:
                out[route_key(api.name, name)] = chain(api, name)
    return out
