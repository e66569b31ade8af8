"""XML ⇄ JSON, pure: a documented, reversible mapping and a parser that refuses DTDs.

The parser is the stdlib expat (C) with namespace processing, set to refuse any DTD: a
``<!DOCTYPE`` is an error before anything is declared, so no entity can be defined — no
expansion (billion laughs), no external entity (XXE), no external DTD fetch. References to
undeclared entities are expat errors. Every problem is an ``XmlError`` (the session answers
400 for a client's body, 502 for an upstream's).

The mapping (``J`` is the hint namespace ``urn:sidegate:json``, written with the prefix
``json``; ``xsi`` is XML Schema's instance namespace)::

    XML                                      JSON
    <root>…</root>                           the body is the root element's value; its name
                                             is not kept (JSON → XML writes the route's root)
    <a>text</a>                              "a": "text"   (a number or true/false if it reads
                                             exactly as one, unless the route turns inference off)
    <a></a>, <a/>                            "a": ""
    <a xsi:nil="true"/>                      "a": null
    <a x="1">text</a>                        "a": {"@x": "1", "#text": "text"}
    <a><b>1</b><c>2</c></a>                  "a": {"b": 1, "c": 2}
    <a><b>1</b><b>2</b></a>                  "a": {"b": [1, 2]}     repeated elements → an array
    <a xmlns:p="urn:p"><p:b/></a>            "a": {"@xmlns:p": "urn:p", "p:b": ""}  prefixes kept
    <a>t<b/>u</a>                            "a": {"#text": "tu", "b": ""}  text beside elements
                                             is joined and trimmed

Where plain XML would read back differently, JSON → XML adds a hint (an XML client may use
them too): ``json:type="string|number|boolean|object|array"`` on the element,
``json:array="true"`` on a one-item array, ``json:type="array"`` on an empty one. An array
that is not the value of a key (the whole body, or an item of another array) is an element
with ``json:type="array"`` whose children (named by the route's ``item``) are its items.
Attribute values and ``#text`` are strings. JSON keys that are not XML names are escaped as
``_xHHHH_`` (``_UHHHHHH_`` beyond U+FFFF), as .NET's XmlConvert does, and unescaped on the way
back; a prefix is kept only where an ``@xmlns:prefix`` in scope declares it.

So every JSON document round-trips through XML, except: empty keys and characters XML 1.0
cannot carry are errors; ``@`` values and ``#text`` are strings; an empty ``#text`` is dropped
and one beside elements is trimmed; the sibling order of differently named elements is not kept; ``@xmlns:json`` and
``@xmlns:xsi`` are the gateway's own and not carried.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any
from xml.parsers import expat

JSON_NS = "urn:sidegate:json"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
MAX_DEPTH = 128  # nesting levels, both ways (json.dumps recurses; a deep document is an attack)

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?\Z")
_ASCII_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*\Z")
_ESCAPE_LIKE = re.compile(r"_(?=x[0-9A-Fa-f]{4}_|U[0-9A-Fa-f]{6}_)")
_ESCAPED = re.compile(r"_x([0-9A-Fa-f]{4})_|_U([0-9A-Fa-f]{6})_")
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_TEXT_SPECIAL = re.compile("[&<>\r]")
_ATTR_SPECIAL = re.compile('[&<>"\t\n\r]')
_REFS = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
_TYPES = ("string", "number", "boolean", "object", "array")
_HINT_PREFIX, _XSI_PREFIX = "json", "xsi"


class XmlError(ValueError):
    """The body cannot be mapped: not well-formed, a DTD, a hint that does not fit, …"""


# -- names ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _name_char(ch: str, first: bool) -> bool:
    """Whether expat takes ``ch`` in a name (it follows XML 1.0's older, narrower tables)."""
    parser = expat.ParserCreate()
    try:
        name = f"{ch}a" if first else f"a{ch}a"
        parser.Parse(f"<{name}></{name}>", True)
    except (expat.ExpatError, UnicodeEncodeError):  # a lone surrogate is no name character
        return False
    return True


@functools.lru_cache(maxsize=8192)
def encode_name(key: str) -> str:
    """A JSON key (no prefix) → an XML name without a colon: other characters as ``_xHHHH_``."""
    if not key:
        raise XmlError("an empty key cannot be an XML name")
    if _ASCII_NAME.match(key) and not _ESCAPE_LIKE.search(key):
        return key
    out = []
    for i, ch in enumerate(key):
        if ch == "_" and _ESCAPE_LIKE.match(key, i):
            out.append("_x005F_")
        elif ch != ":" and ord(ch) <= 0xFFFF and _name_char(ch, i == 0):
            out.append(ch)
        elif ord(ch) > 0xFFFF:
            out.append(f"_U{ord(ch):06X}_")
        else:
            out.append(f"_x{ord(ch):04X}_")
    return "".join(out)


def _is_name(text: str) -> bool:
    return bool(text) and encode_name(text) == text


def decode_name(name: str) -> str:
    if "_x" not in name and "_U" not in name:
        return name
    return _ESCAPED.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), name)


def _qname(key: str, scope: frozenset[str]) -> str:
    prefix, sep, local = key.partition(":")
    if sep and prefix in scope and _is_name(prefix) and _is_name(local):
        return key
    return encode_name(key)


# -- scalars ----------------------------------------------------------------------------------


def infer(text: str) -> Any:
    """``"12"`` → 12, ``"1.5"`` → 1.5, ``"true"`` → True; anything else stays the string."""
    if text == "true":
        return True
    if text == "false":
        return False
    m = _NUMBER.match(text)
    if m is None:
        return text
    try:
        if m.group(1) is None and m.group(2) is None:
            return int(text)
        value = float(text)
    except ValueError:  # more digits than int() takes
        return text
    return text if value in (float("inf"), float("-inf")) else value


def _scalar_text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)  # what json.dumps writes for a float, without its overhead
    return str(value) if isinstance(value, int) else json.dumps(value)


def _hinted(kind: str, text: str) -> Any:
    if kind == "string":
        return text
    if kind == "boolean":
        if text not in ("true", "false"):
            raise XmlError(f"json:type=boolean needs true or false, not {text[:40]!r}")
        return text == "true"
    value = infer(text)
    if isinstance(value, bool | str):
        raise XmlError(f"json:type=number needs a JSON number, not {text[:40]!r}")
    return value


# -- JSON → XML -------------------------------------------------------------------------------


def _text(value: str) -> str:
    if _NOT_XML_CHAR.search(value):
        raise XmlError("the body holds a character XML 1.0 cannot carry")
    return _TEXT_SPECIAL.sub(lambda m: _REFS[m.group()], value) if _TEXT_SPECIAL.search(value) else value


def _attr(value: str) -> str:
    if _NOT_XML_CHAR.search(value):
        raise XmlError("the body holds a character XML 1.0 cannot carry")
    return _ATTR_SPECIAL.sub(lambda m: _REFS[m.group()], value)


class _Writer:
    def __init__(self, item: str, infer_types: bool) -> None:
        self.item = item
        self.infer = infer_types
        self.out: list[str] = []
        self.used_hints = False
        self.used_xsi = False

    def element(
        self, name: str, value: Any, scope: frozenset[str], depth: int, extra: str = "", *, root: bool = False
    ) -> None:
        """``<name extra …>value</name>``; at the root, a ``\\0`` marks where declarations go."""
        if depth > MAX_DEPTH:
            raise XmlError(f"nested deeper than {MAX_DEPTH} levels")
        out = self.out
        mark = "\0" if root else ""
        if isinstance(value, dict):
            self._object(name, value, scope, depth, extra + mark)
        elif isinstance(value, list):
            self.used_hints = True
            if not value:
                out.append(f'<{name}{extra}{mark} json:type="array"/>')
                return
            out.append(f'<{name}{extra}{mark} json:type="array">')
            for item in value:
                self.element(self.item, item, scope, depth + 1)
            out.append(f"</{name}>")
        elif value is None:
            self.used_xsi = True
            out.append(f'<{name}{extra}{mark} xsi:nil="true"/>')
        else:
            text = _scalar_text(value)
            hint = ""
            if isinstance(value, str):
                if self.infer and infer(value) is not value:
                    hint = ' json:type="string"'
            elif not self.infer:
                hint = f' json:type="{"boolean" if isinstance(value, bool) else "number"}"'
            if hint:
                self.used_hints = True
            out.append(f"<{name}{extra}{mark}{hint}>{_text(text)}</{name}>")

    def _object(self, name: str, value: dict[str, Any], scope: frozenset[str], depth: int, extra: str) -> None:
        attrs: list[str] = []
        declared = [k[7:] for k in value if k.startswith("@xmlns:")]
        if declared:
            scope = scope | frozenset(p for p in declared if p not in (_HINT_PREFIX, _XSI_PREFIX))
        text: str | None = None
        children: list[tuple[str, Any]] = []
        for key, item in value.items():
            if key.startswith("@"):
                attr = key[1:]
                if attr in ("xmlns:" + _HINT_PREFIX, "xmlns:" + _XSI_PREFIX):
                    continue  # the gateway's own prefixes: declared by the writer when used
                if attr == "xmlns" or attr.startswith("xmlns:"):
                    qname = attr if attr == "xmlns" or _is_name(attr[6:]) else encode_name(attr)
                else:
                    qname = _qname(attr, scope)
                    if qname.startswith(_XSI_PREFIX + ":"):
                        self.used_xsi = True
                attrs.append(f' {qname}="{_attr(_scalar_text(item))}"')
            elif key == "#text":
                text = _scalar_text(item) or None
            else:
                children.append((key, item))
        hint = ""
        if not attrs and not children:
            hint = ' json:type="object"'
            self.used_hints = True
        out = self.out
        head = f"<{name}{extra}{''.join(attrs)}{hint}"
        if text is None and not children:
            out.append(head + "/>")
            return
        out.append(head + ">")
        if text is not None:
            out.append(_text(text))
        for key, item in children:
            child = _qname(key, scope)
            if child.startswith(_XSI_PREFIX + ":"):
                self.used_xsi = True
            if isinstance(item, list):
                self.used_hints = self.used_hints or len(item) <= 1
                if not item:
                    out.append(f'<{child} json:type="array"/>')
                for one in item:
                    self.element(child, one, scope, depth + 1, ' json:array="true"' if len(item) == 1 else "")
            else:
                self.element(child, item, scope, depth + 1)
        out.append(f"</{name}>")


def to_xml(doc: Any, *, root: str = "root", item: str = "item", infer_types: bool = True) -> bytes:
    """A JSON document (parsed) → UTF-8 XML bytes, as the module docstring maps it."""
    writer = _Writer(item, infer_types)
    writer.element(root, doc, frozenset(("xml", _XSI_PREFIX)), 0, root=True)
    body = "".join(writer.out)
    declarations = ""
    if writer.used_hints:
        declarations += f' xmlns:{_HINT_PREFIX}="{JSON_NS}"'
    if writer.used_xsi:
        declarations += f' xmlns:{_XSI_PREFIX}="{XSI_NS}"'
    body = body.replace("\0", declarations, 1)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body.encode("utf-8")


# -- XML → JSON -------------------------------------------------------------------------------


class _Element:
    __slots__ = ("array_hint", "attrs", "children", "name", "nil", "text", "type_hint")

    def __init__(self, name: str) -> None:
        self.name = name
        self.attrs: dict[str, str] = {}
        self.children: list[tuple[str, Any, bool]] = []  # (key, value, json:array)
        self.text: list[str] = []
        self.type_hint: str | None = None
        self.array_hint = False
        self.nil = False


def _split(name: str) -> tuple[str, str, str]:
    """expat's ``uri local prefix`` → (uri, local, prefix)."""
    parts = name.split(" ")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return parts[0], parts[1], ""
    return "", name, ""


class _Namespaced(Exception):  # noqa: N818 - a signal, not an error
    """A prefixed name in a document read without namespace processing: read it again, with."""


def _refuse_dtd(*_: object) -> None:
    raise XmlError("DTDs are not allowed (no <!DOCTYPE>, entities or external references)")


class _Reader:
    def __init__(self, infer_types: bool) -> None:
        self.infer = infer_types
        self.stack: list[_Element] = []
        self.pending: list[tuple[str, str]] = []
        self.result: Any = None
        self.done = False

    def namespace(self, prefix: str | None, uri: str | None) -> None:
        self.pending.append((prefix or "", uri or ""))

    def start(self, name: str, attributes: list[str]) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise XmlError(f"nested deeper than {MAX_DEPTH} levels")
        _, local, prefix = _split(name)
        element = _Element(decode_name(f"{prefix}:{local}" if prefix else local))
        for prefix, uri in self.pending:
            if uri == JSON_NS or (uri == XSI_NS and prefix == _XSI_PREFIX):
                continue
            element.attrs["xmlns:" + prefix if prefix else "xmlns"] = uri
        self.pending = []
        for i in range(0, len(attributes), 2):
            uri, local, prefix = _split(attributes[i])
            value = attributes[i + 1]
            if uri == JSON_NS:
                if local == "type" and value in _TYPES:
                    element.type_hint = value
                elif local == "array" and value in ("true", "false"):
                    element.array_hint = value == "true"
                else:
                    raise XmlError(f"unknown hint json:{local}={value!r} (json:type={'|'.join(_TYPES)}, json:array)")
            elif uri == XSI_NS and local == "nil":
                element.nil = value in ("true", "1")
            else:
                element.attrs[decode_name(f"{prefix}:{local}" if prefix else local)] = value
        self.stack.append(element)

    def start_plain(self, name: str, attributes: list[str]) -> None:
        """``start`` for documents that declare no namespace (no prefixes, no hints): the fast path."""
        if ":" in name:
            raise _Namespaced
        if len(self.stack) >= MAX_DEPTH:
            raise XmlError(f"nested deeper than {MAX_DEPTH} levels")
        element = _Element(decode_name(name))
        for i in range(0, len(attributes), 2):
            if ":" in attributes[i]:
                raise _Namespaced
            element.attrs[decode_name(attributes[i])] = attributes[i + 1]
        self.stack.append(element)

    def text(self, data: str) -> None:
        if self.stack:
            self.stack[-1].text.append(data)

    def end(self, _name: str) -> None:
        element = self.stack.pop()
        value = self._value(element)
        if self.stack:
            self.stack[-1].children.append((element.name, value, element.array_hint))
        else:
            self.result = value
            self.done = True

    def _value(self, e: _Element) -> Any:
        if e.nil:
            if e.children or "".join(e.text).strip():
                raise XmlError(f"<{e.name}> is xsi:nil but has content")
            return None
        kind = e.type_hint
        if kind == "array":
            if e.attrs or "".join(e.text).strip():
                raise XmlError(f"<{e.name}> is json:type=array: its items are child elements, nothing else")
            return [value for _, value, _ in e.children]
        text = "".join(e.text)
        if kind == "object" or e.attrs or e.children:
            if kind not in (None, "object"):
                raise XmlError(f"<{e.name}> has attributes or elements, so it cannot be json:type={kind}")
            obj: dict[str, Any] = {"@" + k: v for k, v in e.attrs.items()}
            if e.children:
                text = text.strip()
            if text:
                obj["#text"] = text
            arrays: set[str] = set()
            for key, value, hinted in e.children:
                if key in obj:
                    if key not in arrays:
                        obj[key] = [obj[key]]
                        arrays.add(key)
                    obj[key].append(value)
                elif hinted:
                    obj[key] = [value]
                    arrays.add(key)
                else:
                    obj[key] = value
            return obj
        if kind is not None:
            return _hinted(kind, text)
        return infer(text) if self.infer else text


def from_xml(body: bytes, *, infer_types: bool = True) -> Any:
    """XML bytes → a JSON document (plain Python); ``XmlError`` for anything refused."""
    if b"xmlns" not in body and b"\x00" not in body[:2] and body[:2] not in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return _parse(body, infer_types, namespaces=False)
        except _Namespaced:
            pass  # a prefix nobody declared: namespace processing says so
    return _parse(body, infer_types, namespaces=True)


def _parse(body: bytes, infer_types: bool, *, namespaces: bool) -> Any:
    reader = _Reader(infer_types)
    if namespaces:
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.namespace_prefixes = True
        parser.StartNamespaceDeclHandler = reader.namespace
        parser.StartElementHandler = reader.start
    else:
        parser = expat.ParserCreate()
        parser.StartElementHandler = reader.start_plain
    parser.buffer_text = True
    parser.ordered_attributes = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    refuse: Callable[..., None] = _refuse_dtd
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse  # type: ignore[assignment]
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.text
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise XmlError(f"not well-formed XML: {expat.ErrorString(exc.code)} at line {exc.lineno}") from None
    except RecursionError:
        raise XmlError(f"nested deeper than {MAX_DEPTH} levels") from None
    if not reader.done:
        raise XmlError("no root element")
    return reader.result
