"""A compiled bootstrap as YAML text, written directly: block mappings and lists, every string
that YAML could read as something else in double quotes (JSON's escapes, which YAML shares).

PyYAML's dumper, even over libyaml's emitter, spends its time in Python deciding how to write
each scalar: ~10 s for a 1,200-API gateway before the route table was shared, ~1 s after. The
bootstrap holds only dicts, lists, strings, numbers, booleans and None, so this writes it in a
few hundredths of that. A container met twice (the route table every listener shares) is written
once with an anchor and named by an alias after.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A string YAML reads back as the same string when written plain: letters, digits and a few
# marks, starting with a letter, '/' or '_' (so no number, no '.inf', no indicator character),
# and none of YAML 1.1's booleans or null.
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./@+-]*")
_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


def scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _WORDS:
            return value
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def dump(doc: Any, anchors: tuple[str, ...] = ()) -> str:
    """``doc`` as block YAML; dicts holding a key of ``anchors`` are written once if met again."""
    out: list[str] = []
    named: dict[int, str] = {}
    written: dict[str, str] = {}  # a big table repeats its strings: each is decided once

    def text(value: Any) -> str:
        if isinstance(value, str):
            found = written.get(value)
            if found is None:
                found = written[value] = scalar(value)
            return found
        return scalar(value)

    def shared(node: Any) -> str | None:
        """The alias of an anchored dict written before, or None (naming it if it is one)."""
        if not any(key in node for key in anchors):
            return None
        if id(node) in named:
            return "*" + named[id(node)]
        named[id(node)] = f"id{len(named) + 1:03d}"
        return None

    def block(node: Any, indent: str) -> None:
        """A non-empty dict or list whose lines start at ``indent``."""
        if isinstance(node, dict):
            for key, value in node.items():
                inline(f"{indent}{text(key)}:", value, indent)
            return
        for item in node:
            if isinstance(item, dict) and item:
                head = indent + "- "
                for key, value in item.items():
                    inline(f"{head}{text(key)}:", value, indent + "  ")
                    head = indent + "  "
            else:
                inline(f"{indent}-", item, indent)

    def inline(head: str, value: Any, indent: str) -> None:
        """``head`` (``key:`` or ``-``) and its value: on the same line, or below it at ``indent``
        and two more spaces."""
        if isinstance(value, dict | list) and value:
            if isinstance(value, dict):
                alias = shared(value)
                if alias is not None:
                    out.append(f"{head} {alias}")
                    return
                head += f" &{named[id(value)]}" if id(value) in named else ""
            out.append(head)
            # A list under a key starts at the key's column (as PyYAML writes it): no deeper.
            block(value, indent if isinstance(value, list) and head.endswith(":") else indent + "  ")
        elif isinstance(value, dict | list):
            out.append(f"{head} {'{}' if isinstance(value, dict) else '[]'}")
        else:
            out.append(f"{head} {text(value)}")

    block(doc, "")
    return "\n".join(out) + "\n"
