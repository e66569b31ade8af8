"""What a route does to bodies, as strategies the extproc ``Session`` drives. Pure: bytes in, bytes out.

A strategy says which bodies it takes (by media type), turns a request body into the
upstream's and a response body into the client's, and names the headers it changes on the
way up. Three kinds, one per route:

    Versions     JSON → JSON through a version's declared changes (extproc/transforms.py)
    XmlClient    XML clients of a JSON service: XML → JSON up, JSON → XML down for them
    XmlUpstream  JSON clients of an XML service: JSON → XML up, XML → JSON down

A body a strategy cannot take raises ``Refusal`` (HTTP status, code, message): 400 for a
client's body, 502 for an upstream's. ``None`` means "leave it as it is".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from extproc import xml
from extproc.errors import Refusal, TransformError
from extproc.transforms import Chain, chains
from sidegate.config import Gateway, Translation
from sidegate.contract import route_key

JSON = "application/json"
XML = "application/xml"
Headers = Mapping[str, str]


def media_type(headers: Headers, name: str = "content-type") -> str:
    return headers.get(name, "").split(";")[0].strip().lower()


def is_json(media: str) -> bool:
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


def is_xml(media: str) -> bool:
    return media in (XML, "text/xml") or (media.startswith("application/") and media.endswith("+xml"))


def accepts_xml(headers: Headers) -> bool:
    """The client lists an XML media type in Accept and no JSON one ahead of it."""
    for part in headers.get("accept", "").split(","):
        media = part.split(";")[0].strip().lower()
        if is_json(media):
            return False
        if is_xml(media):
            return True
    return False


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: no double holds it, and no writer can give it back
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def load_json(body: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, no number a double cannot hold); ``ValueError`` (or
    RecursionError) otherwise.

    By ``json``: orjson reads 1 KB only ~4 µs faster, and turns an integer past 64 bits into a
    float, which would change a client's number.
    """
    doc = json.loads(body, parse_constant=_no_constants, parse_float=_finite)
    if _SURROGATE_ESCAPE.search(body):  # rare: only then walk the document
        _no_lone_surrogates(doc)
    return doc


# A \uD800-\uDFFF escape. JSON allows one alone, but UTF-8 cannot carry it: a body holding
# one cannot be written again, for the upstream or the client.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_lone_surrogates(node: Any) -> None:
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which UTF-8 cannot carry"
            ) from None
    elif isinstance(node, dict):
        for key, value in node.items():
            _no_lone_surrogates(key)
            _no_lone_surrogates(value)
    elif isinstance(node, list):
        for item in node:
            _no_lone_surrogates(item)


def dump_json(doc: Any) -> bytes:
    """Compact UTF-8 JSON. By orjson (1 KB in ~0.6 µs, ``json`` takes ~10), or by ``json`` for
    what orjson will not write (integers past 64 bits, keys that are not strings)."""
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class Strategy(Protocol):
    @property
    def api(self) -> str: ...
    @property
    def max_body_bytes(self) -> int: ...
    @property
    def must_translate_response(self) -> bool:
        """Whether a response it takes but cannot buffer is an error rather than passed on."""

    @property
    def noun(self) -> str:
        """How errors name the bodies it takes: "a JSON body for this API version"."""

    def request_headers(self, headers: Headers) -> list[tuple[str, str]]: ...
    def takes_request(self, headers: Headers) -> bool: ...
    def request(self, body: bytes) -> tuple[bytes, str | None]: ...
    def takes_response(self, request: Headers, response: Headers) -> bool: ...
    def response(self, body: bytes) -> tuple[bytes, str | None] | None: ...


@dataclass(frozen=True)
class Versions:
    """A version served by a newer one: JSON bodies through the declared changes."""

    chain: Chain
    must_translate_response = False
    noun = "a JSON body for this API version"

    @property
    def api(self) -> str:
        return self.chain.api

    @property
    def max_body_bytes(self) -> int:
        return self.chain.max_body_bytes

    def request_headers(self, headers: Headers) -> list[tuple[str, str]]:
        return []

    def takes_request(self, headers: Headers) -> bool:
        return is_json(media_type(headers))

    def request(self, body: bytes) -> tuple[bytes, str | None]:
        try:
            doc = load_json(body)
        except (ValueError, RecursionError) as exc:
            raise Refusal(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
        try:
            return dump_json(self.chain.up(doc)), None
        except TransformError as exc:
            raise Refusal(400, "invalid_body", f"the body does not fit version {self.chain.client}: {exc}") from None

    def takes_response(self, request: Headers, response: Headers) -> bool:
        return is_json(media_type(response))

    def response(self, body: bytes) -> tuple[bytes, str | None] | None:
        try:
            doc = load_json(body)
        except (ValueError, RecursionError):
            return None  # the upstream's own business: passed through
        try:
            return dump_json(self.chain.down(doc)), None
        except TransformError:
            raise Refusal(502, "bad_upstream_body", "the upstream answered a body this version cannot carry") from None


@dataclass(frozen=True)
class _Xml:
    api: str
    root: str
    item: str
    infer_types: bool
    max_body_bytes: int
    must_translate_response = True

    def to_json(self, body: bytes, status: int, code: str, whose: str) -> bytes:
        try:
            return dump_json(xml.from_xml(body, infer_types=self.infer_types))
        except xml.XmlError as exc:
            raise Refusal(status, code, f"{whose} is not XML this gateway reads: {exc}") from None

    def to_xml(self, body: bytes, status: int, whose: str) -> bytes:
        try:
            doc = load_json(body)
        except (ValueError, RecursionError) as exc:
            raise Refusal(
                status, "invalid_json" if status == 400 else "bad_upstream_body", f"{whose} is not valid JSON: {exc}"
            ) from None
        try:
            return xml.to_xml(doc, root=self.root, item=self.item, infer_types=self.infer_types)
        except xml.XmlError as exc:
            raise Refusal(
                status,
                "invalid_body" if status == 400 else "bad_upstream_body",
                f"{whose} cannot be written as XML: {exc}",
            ) from None


class XmlClient(_Xml):
    """XML clients of a JSON service. JSON clients of the same API pass through untouched."""

    noun = "an XML body"

    def request_headers(self, headers: Headers) -> list[tuple[str, str]]:
        return [("accept", JSON)] if accepts_xml(headers) else []

    def takes_request(self, headers: Headers) -> bool:
        return is_xml(media_type(headers))

    def request(self, body: bytes) -> tuple[bytes, str | None]:
        return self.to_json(body, 400, "invalid_xml", "the request body"), JSON

    def takes_response(self, request: Headers, response: Headers) -> bool:
        wants_xml = is_xml(media_type(request)) or accepts_xml(request)
        return wants_xml and is_json(media_type(response))

    def response(self, body: bytes) -> tuple[bytes, str | None] | None:
        return self.to_xml(body, 502, "the upstream's answer"), XML


class XmlUpstream(_Xml):
    """JSON clients of an XML service."""

    noun = "a JSON body"

    def request_headers(self, headers: Headers) -> list[tuple[str, str]]:
        return [("accept", XML)]

    def takes_request(self, headers: Headers) -> bool:
        return is_json(media_type(headers))

    def request(self, body: bytes) -> tuple[bytes, str | None]:
        return self.to_xml(body, 400, "the request body"), XML

    def takes_response(self, request: Headers, response: Headers) -> bool:
        return is_xml(media_type(response))

    def response(self, body: bytes) -> tuple[bytes, str | None] | None:
        return self.to_json(body, 502, "bad_upstream_body", "the upstream's answer"), JSON


def xml_strategy(api: str, spec: Translation) -> Strategy:
    kind = XmlClient if spec.xml == "client" else XmlUpstream
    return kind(api, spec.root, spec.item, spec.infer_types, spec.max_body_bytes)


def strategies(gateway: Gateway) -> dict[str, Strategy]:
    """Every body-translating route, keyed as the compiler names it in the stream metadata."""
    out: dict[str, Strategy] = {key: Versions(chain) for key, chain in chains(gateway).items()}
    for api in gateway.apis:
        if api.translate is not None and api.translate.xml is not None:
            out[route_key(api.name)] = xml_strategy(api.name, api.translate)
    return out
