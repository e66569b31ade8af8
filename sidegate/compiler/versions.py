"""API versions compiled into native Envoy routes: zero Python for choosing a version.

For a versioned API the compiler emits, in the API's precedence order, one route per (way of
asking, version): a path prefix (``/v2/orders``), a header (``Api-Version: v2``), a query
parameter, a media type (``application/vnd.acme.v2+json`` or ``…; version=2``), and the
consumer's pin (``x-sidegate-version``, set only by authz, which clears the route cache). A
version the client names but the API does not have is a 400 listing the supported ones; a
request naming none gets the default. Each version route rewrites the path to its upstream's
prefix, adds ``Deprecation``/``Sunset``/``Link`` response headers, tells the upstream which
version the client speaks (``x-sidegate-version``), and answers 410 itself once the sunset has
passed at compile time (authz answers 410 for a sunset that passes while the config runs).
Only a version served by a newer one through body ``changes`` turns ext_proc on, for its
routes alone.

Asking for the default version by header or pin is the same as not asking, so those routes are
left out (``SAME_AS_DEFAULT``): a request naming the default that way falls through to the
default route. So that it does not match a later way of asking on the way, each later route on
the API's own prefix (and each unknown-version answer) also requires that the header does not
name a version (``names_none``). The default's routes on a path form (``/v1/orders`` with an
``Api-Version: v2`` header) stay: there the fall-through would be the path's version.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
from collections.abc import Sequence
from typing import Any

from sidegate.compiler.envoy import match
from sidegate.compiler.specs import Answer, Reach, RouteSpec, Target
from sidegate.config import Api, Gateway
from sidegate.contract import PIN_HEADER, route_key


def pin_routes(gateway: Gateway) -> bool:
    """Whether some route matches the pin header: every versioned API that takes credentials has
    them (``routes`` skips them on anonymous ones), and authz then sets or strips that header."""
    return any(
        api.versioning is not None and not api.auth.anonymous and "pin" in api.versioning.enabled()
        for api in gateway.apis
    )


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


def deprecation_value(day: dt.date) -> str:
    """RFC 9745: a structured-field Date, ``@<unix seconds>``."""
    return f"@{int(_midnight(day).timestamp())}"


def sunset_value(day: dt.date) -> str:
    """RFC 8594: an HTTP-date."""
    return email.utils.format_datetime(_midnight(day), usegmt=True)


def _re(text: str) -> str:
    return re.escape(text)


def _number(version: str) -> str:
    """``v2`` → ``2``, for ``version=2`` media-type parameters; other names stay."""
    return version[1:] if re.fullmatch(r"v\d+", version) else version


# Ways of asking that name one version in one exact header value: the default's route there
# does what the default route does.
SAME_AS_DEFAULT = ("header", "pin")


class _Api:
    """One versioned API and the helpers its routes share."""

    def __init__(self, api: Api, today: dt.date) -> None:
        assert api.versioning is not None
        self.api = api
        self.today = today
        self.how = api.versioning
        self.names = list(api.versions)
        self.prefix = api.match.prefix.rstrip("/") or "/"

    # -- matching ------------------------------------------------------------------------

    def _path_form(self, version: str) -> str:
        return f"/{version}{self.prefix}"

    def forms(self, selector: str) -> list[tuple[str, str | None]]:
        """Path prefixes a selector applies to; path versions only where the path does not win."""
        forms: list[tuple[str, str | None]] = [(self.api.match.prefix, None)]
        enabled = self.how.enabled()
        if self.how.path and enabled.index("path") > enabled.index(selector):
            forms += [(self._path_form(n), n) for n in self.names]
        return forms

    def match(
        self, prefix: str, headers: Sequence[dict[str, Any]] = (), query: Sequence[dict[str, Any]] = ()
    ) -> dict[str, Any]:
        return match(prefix, self.api.match.methods, headers, query)

    def _accept(self, version: str) -> str:
        vendor = _re(self.how.media_type or "")
        names = "|".join(sorted({_re(version), _re(_number(version))}))
        return rf"(?i).*(application/vnd\.{vendor}\.{_re(version)}\+json|;\s*version=\"?({names})\"?\s*(;|,|$)).*"

    def _accept_any(self) -> str:
        vendor = _re(self.how.media_type or "")
        return rf"(?i).*(application/vnd\.{vendor}\.[^+;,]*\+json|;\s*version=).*"

    def selector_matches(self, selector: str, version: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(header matchers, query matchers) for "the client asks for ``version`` this way"."""
        if selector == "header":
            return [{"name": self.how.header, "string_match": {"exact": version}}], []
        if selector == "pin":
            return [{"name": PIN_HEADER, "string_match": {"exact": version}}], []
        if selector == "query":
            return [], [{"name": self.how.query, "string_match": {"exact": version}}]
        return [{"name": "accept", "string_match": {"safe_regex": {"regex": self._accept(version)}}}], []

    def names_none(self, selector: str) -> dict[str, Any]:
        """A header matcher for "the client does not name a version of this API this way"
        (absent, or a value that is no version). Only for ``SAME_AS_DEFAULT`` selectors."""
        name = self.how.header if selector == "header" else PIN_HEADER
        assert name is not None
        versions = "|".join(_re(n) for n in self.names)
        return {
            "name": name,
            "string_match": {"safe_regex": {"regex": f"^({versions})$"}},
            "invert_match": True,
            "treat_missing_header_as_empty": True,
        }

    def present(self, selector: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Matchers for "the client names some version this way"."""
        if selector == "header":
            return [{"name": self.how.header, "present_match": True}], []
        if selector == "query":
            return [], [{"name": self.how.query, "present_match": True}]
        return [{"name": "accept", "string_match": {"safe_regex": {"regex": self._accept_any()}}}], []

    # -- what a version's route does -------------------------------------------------------

    def upstream(self, version: str) -> str:
        return self.api.versions[version].served_by or version

    def successor(self, version: str) -> str | None:
        spec = self.api.versions[version]
        newer = self.api.newer(version)
        return spec.successor or (newer[0] if newer else None)

    def lifecycle_headers(self, version: str) -> list[tuple[str, str]]:
        spec = self.api.versions[version]
        headers: list[tuple[str, str]] = []
        links = []
        if spec.deprecated is not None:
            headers.append(("deprecation", deprecation_value(spec.deprecated)))
            if spec.link:
                links.append(f'<{spec.link}>; rel="deprecation"; type="text/html"')
        if spec.sunset is not None:
            headers.append(("sunset", sunset_value(spec.sunset)))
        successor = self.successor(version)
        if successor and (spec.deprecated is not None or spec.sunset is not None):
            target = self._path_form(successor) if self.how.path else self.prefix
            links.append(f'<{target}>; rel="successor-version"')
        if links:
            headers.append(("link", ", ".join(links)))
        return headers

    def gone(self, name: str, match: dict[str, Any], version: str) -> Answer:
        successor = self.successor(version)
        body = {
            "error": "api_version_gone",
            "message": f"version {version} of {self.api.name} was retired on {self.api.versions[version].sunset}",
            "version": version,
            "successor": successor,
        }
        return Answer(name, match, 410, json.dumps(body) + "\n")

    def target(self, name: str, prefix: str, version: str, match: dict[str, Any]) -> RouteSpec:
        spec = self.api.versions[version]
        if spec.sunset is not None and spec.sunset <= self.today:
            return self.gone(name, match, version)
        served = self.api.versions[self.upstream(version)]
        upstream_prefix = served.prefix or self.api.match.prefix
        context = {"version": version}
        if spec.sunset is not None:  # authz answers 410 when the sunset passes while this runs
            context["sunset"] = _midnight(spec.sunset).isoformat()
            context["successor"] = self.successor(version) or ""
        return Target(
            name=name,
            match=match,
            service=served.service or self.api.service,
            rewrite=upstream_prefix if upstream_prefix != prefix else None,
            authz_context=context if (not self.api.auth.anonymous or spec.sunset is not None) else None,
            extproc_route=route_key(self.api.name, version) if self.upstream(version) != version else None,
            version=version,
            response_headers=tuple(self.lifecycle_headers(version)),
        )

    def unknown(self, name: str, match: dict[str, Any], reach: Reach | None = None) -> Answer:
        body = {
            "error": "unknown_api_version",
            "message": f"{self.api.name} has no such version",
            "supported": self.names,
            "default": self.how.default,
        }
        return Answer(name, match, 400, json.dumps(body) + "\n", reach)

    # -- all routes, in order ----------------------------------------------------------------

    def specs(self) -> list[RouteSpec]:
        out: list[RouteSpec] = []
        api = self.api.name
        own = self.api.match.prefix
        skipped: list[str] = []  # SAME_AS_DEFAULT selectors so far, whose default route is left out
        for selector in self.how.enabled():
            if selector == "pin" and self.api.auth.anonymous:
                continue  # no consumer, no pin
            for version in self.names:
                if selector == "path":
                    form = self._path_form(version)
                    out.append(self.target(f"{api}:{version}:path", form, version, self.match(form)))
                    continue
                headers, query = self.selector_matches(selector, version)
                for prefix, _ in self.forms(selector):
                    if prefix == own and selector in SAME_AS_DEFAULT and version == self.how.default:
                        continue  # the default route does the same
                    name = f"{api}:{version}:{selector}" + ("" if prefix == own else f"@{prefix}")
                    extra = [self.names_none(s) for s in skipped] if prefix == own else []
                    out.append(self.target(name, prefix, version, self.match(prefix, [*headers, *extra], query)))
            if selector in SAME_AS_DEFAULT:
                skipped.append(selector)
        for selector in ("header", "query", "media_type"):
            if selector in self.how.enabled():
                headers, query = self.present(selector)
                for prefix, _ in self.forms(selector):
                    extra = [self.names_none(s) for s in skipped] if prefix == own else []
                    match = self.match(prefix, [*headers, *extra], query)
                    out.append(self.unknown(f"{api}:unknown:{selector}@{prefix}", match))
        if self.how.path:
            numbered = all(re.fullmatch(r"v\d+", n) for n in self.names)
            pattern = r"v\d+" if numbered else r"[^/]+"
            regex = f"^/{pattern}{_re(self.prefix)}(/.*)?$"
            reach = Reach("/v" if numbered else "/", pattern, self.prefix)
            out.append(self.unknown(f"{api}:unknown:path", {"safe_regex": {"regex": regex}}, reach))
        default = self.how.default
        out.append(
            self.target(f"{api}:{default}:default", self.api.match.prefix, default, self.match(self.api.match.prefix))
        )
        return out


def specs(api: Api, today: dt.date) -> list[RouteSpec]:
    """Every route of a versioned API, most specific way of asking first."""
    return _Api(api, today).specs()
