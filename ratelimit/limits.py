"""The limits in force, and which of them a request's descriptors hit. Pure: no I/O, no grpc.

Limits come from two places:

* **gateway.yaml** — ``plans`` and each API's ``limits``, under the domain the compiler gives
  Envoy (``sidegate``). Envoy sends one descriptor per kind of count on a route:
  ``(api, NAME)`` then ``(consumer, C)`` or ``(remote_address, IP)`` or nothing (global), and
  ``(plan, P), (consumer, C)`` for plan limits; each ends with ``(method, M)``.
* **the mesh** — ``mesh.limits``, in the same domain: a callee's sidecar sends
  ``(mesh_service, CALLEE), (mesh_caller, spiffe://…/CALLER), (method, M)``, and each calling
  service is counted apart.
* **reference configs** — files in the format of Envoy's reference rate-limit service, for any
  other domain (``reference.py`` parses them into ``Node`` trees). Their matching follows the
  reference: per entry the exact ``key_value``, else the first wildcard value in file order
  (``foo*``, ``*bar``, ``a*b*c``), else the bare ``key``; a rule applies only at the depth of the
  descriptor's last entry. A domain that no file names answers OK with no limit, whatever limit
  override Envoy sends, as the reference does. Their hits count every hit (``COUNTED``).

``Limits.match`` turns a request into ``Hit``s: a rule, the partition it is counted in (its
Redis hash tag: every counter of one consumer lives on one Cluster shard), the counter key and
the cost (``hits_addend``). Limits that another hit ``replaces`` are dropped, as in the reference.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ratelimit.algorithms import COUNTED, FIXED
from sidegate.config import Gateway, RateLimitRule
from sidegate.contract import (
    RATELIMIT_DOMAIN,
    RL_API,
    RL_CONSUMER,
    RL_DEFAULT_CONSUMER,
    RL_IP,
    RL_MESH_CALLER,
    RL_MESH_SERVICE,
    RL_METHOD,
    RL_PLAN,
)

KEY_PREFIX = "sg:rl:"
MAX_COST = 2**32  # hits_addend beyond any limit the formats allow
UNIT_MS = {
    "second": 1_000,
    "minute": 60_000,
    "hour": 3_600_000,
    "day": 86_400_000,
    "week": 7 * 86_400_000,
    "month": 30 * 86_400_000,  # the reference counts calendar-free months and years too
    "year": 365 * 86_400_000,
}
_SAFE = re.compile(r"[!#-$&-<>-z~]{1,128}")  # printable ASCII without space % = { | }
_MAX_TAG = 200
GATEWAY_HITS_CACHED = 100_000


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit: ``limit`` requests per ``window_ms``, counted by ``algorithm``."""

    id: str  # stable: part of the counter key and of the stats
    policy: str  # the name clients see in RateLimit-Policy
    limit: int
    window_ms: int
    algorithm: str = FIXED  # one of algorithms.CODE
    shadow: bool = False
    on_store_error: str = "allow"
    methods: frozenset[str] = frozenset()
    unlimited: bool = False
    name: str = ""  # reference ``rate_limit.name``: what another rule's ``replaces`` names
    replaces: frozenset[str] = frozenset()
    detailed_metric: bool = False
    reference: bool = False  # answered as envoyproxy/ratelimit answers (name, whole-second reset)


@dataclass(frozen=True, slots=True)
class Descriptor:
    entries: tuple[tuple[str, str], ...]
    hits_addend: int | None = None  # per descriptor (Envoy ≥ 1.34); else the request's
    override: tuple[int, str] | None = None  # Envoy's per-descriptor limit: (requests_per_unit, unit)


@dataclass(frozen=True, slots=True)
class Request:
    domain: str
    descriptors: tuple[Descriptor, ...]
    hits_addend: int = 0  # 0 means 1, as in Envoy


@dataclass(frozen=True, slots=True)
class Hit:
    """A rule one descriptor hit: counted under ``key`` in partition ``tag`` at ``cost``."""

    index: int  # of the descriptor in the request
    rule: Rule
    tag: str
    key: str
    cost: int
    stat: str  # the stats name: the rule, or the rule and the value with detailed_metric


@dataclass(frozen=True, slots=True)
class Match:
    hits: tuple[Hit, ...]
    unlimited: frozenset[int] = frozenset()  # descriptors whose rule is ``unlimited``
    reference: bool = False  # a reference-format domain: its semantics, not gateway.yaml's


@dataclass
class Node:
    """One level of a reference config's descriptor tree."""

    path: str
    rule: Rule | None = None
    children: dict[tuple[str, str | None], Node] = field(default_factory=dict)
    wildcards: list[tuple[str, re.Pattern[str], Node]] = field(default_factory=list)  # (key, pattern, node), file order
    segment: str = ""  # this level's part of the stats name: ``key`` or ``key_value``
    value: str | None = None  # as written in the file (a wildcard keeps its ``*``)
    share: bool = False  # share_threshold on a wildcard: every matching value counts as one
    value_to_metric: bool = False  # the stats name carries the request's value


# --- naming ---------------------------------------------------------------------------------


def escape(value: str) -> str:
    """A value safe inside a counter key and a hash tag (no ``{ } | =``, no spaces)."""
    if _SAFE.fullmatch(value):
        return value
    return urllib.parse.quote(value, safe="")[:_MAX_TAG]


def tag_of(*parts: str) -> str:
    tag = ":".join(parts)
    if len(tag) <= _MAX_TAG:
        return tag
    return "h:" + hashlib.sha256(tag.encode()).hexdigest()[:32]


def counter_key(tag: str, rule: Rule) -> str:
    """``sg:rl:{tag}:rule:a60000``: the algorithm and window are part of the key, so a reloaded
    rule with a new window or algorithm never reads a counter of another shape."""
    return f"{KEY_PREFIX}{{{tag}}}{counter_suffix(rule)}"


def counter_suffix(rule: Rule) -> str:
    """How every counter key of ``rule`` ends (``:rule:a60000``), whatever its tag."""
    return f":{rule.id}:{rule.algorithm[0]}{rule.window_ms}"


def window_text(window_ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if window_ms % size == 0:
            return f"{window_ms // size}{unit}"
    return f"{window_ms}ms"


# --- the limits in force --------------------------------------------------------------------


class Limits:
    """Every rule in force, indexed for matching; rebuilt (never changed) on reload."""

    def __init__(
        self,
        *,
        api_rules: Mapping[str, Mapping[str, tuple[Rule, ...]]] | None = None,
        plan_rules: Mapping[str, tuple[Rule, ...]] | None = None,
        default_plan: str | None = None,
        domains: Mapping[str, Node] | None = None,
        on_store_error: str = "allow",
        mesh_rules: Mapping[str, tuple[tuple[Rule, str | None], ...]] | None = None,
    ) -> None:
        self.api_rules = MappingProxyType(dict(api_rules or {}))
        # By called service: each rule, and the one caller identity it counts (None: every caller).
        self.mesh_rules = MappingProxyType(dict(mesh_rules or {}))
        self.plan_rules = MappingProxyType(dict(plan_rules or {}))
        self.default_plan = default_plan
        self.domains = MappingProxyType(dict(domains or {}))
        self.on_store_error = on_store_error
        # The hits of a gateway descriptor depend only on it: worked out once, not per request.
        self._gateway_hits: dict[tuple[int, tuple[tuple[str, str], ...], int], list[Hit]] = {}

    def rules(self) -> Iterable[Rule]:
        for by_kind in self.api_rules.values():
            for rules in by_kind.values():
                yield from rules
        for rules in self.plan_rules.values():
            yield from rules
        for pairs in self.mesh_rules.values():
            yield from (rule for rule, _ in pairs)
        for root in self.domains.values():
            yield from _tree_rules(root)

    def match(self, request: Request) -> Match:
        hits: list[Hit] = []
        unlimited: set[int] = set()
        gateway = request.domain == RATELIMIT_DOMAIN
        root = None if gateway else self.domains.get(request.domain)
        if not gateway and root is None:
            return Match(())  # an unknown domain: OK with no limit, before any override
        default_cost = request.hits_addend or 1
        for index, descriptor in enumerate(request.descriptors):
            cost = min(MAX_COST, default_cost if descriptor.hits_addend is None else descriptor.hits_addend)
            if descriptor.override is not None:
                hits.append(self._override(index, request.domain, descriptor, cost, reference=not gateway))
            elif gateway:
                hits.extend(self._gateway_cached(index, descriptor.entries, cost))
            elif root is not None:
                found = _walk(root, descriptor.entries)
                if found is None:
                    continue
                rule, counted, stat = found
                if rule.unlimited:
                    unlimited.add(index)
                    continue
                tag = _reference_tag(request.domain, counted)
                if rule.detailed_metric:
                    stat = rule.id + "_" + escape(descriptor.entries[-1][1])
                hits.append(Hit(index, rule, tag, counter_key(tag, rule), cost, stat))
        replaced = {name for hit in hits for name in hit.rule.replaces}
        if replaced:
            hits = [hit for hit in hits if not hit.rule.name or hit.rule.name not in replaced]
        return Match(tuple(hits), frozenset(unlimited), reference=not gateway)

    def _gateway_cached(self, index: int, entries: tuple[tuple[str, str], ...], cost: int) -> list[Hit]:
        memo = self._gateway_hits
        found = memo.get((index, entries, cost))
        if found is None:
            if len(memo) >= GATEWAY_HITS_CACHED:
                memo.clear()  # one entry per consumer and route: bounded, rebuilt as traffic comes
            found = memo[index, entries, cost] = self._gateway(index, entries, cost)
        return found

    def _gateway(self, index: int, entries: tuple[tuple[str, str], ...], cost: int) -> list[Hit]:
        if not entries:
            return []
        kind, value = entries[0]
        rest = dict(entries[1:])
        if kind == RL_API:
            by_kind = self.api_rules.get(value)
            if not by_kind:
                return []
            if RL_CONSUMER in rest:
                rules, tag = by_kind.get("consumer", ()), tag_of("c", escape(rest[RL_CONSUMER]))
            elif RL_IP in rest:
                rules, tag = by_kind.get("ip", ()), tag_of("ip", escape(rest[RL_IP]))
            else:
                rules, tag = by_kind.get("global", ()), tag_of("g", escape(value))
        elif kind == RL_MESH_SERVICE:
            caller = rest.get(RL_MESH_CALLER, "")
            rules = tuple(rule for rule, only in self.mesh_rules.get(value, ()) if only is None or only == caller)
            tag = tag_of("m", escape(value), escape(caller))  # every caller counted apart
        elif kind == RL_PLAN:
            plan = value if value in self.plan_rules else self.default_plan
            rules = self.plan_rules.get(plan, ()) if plan is not None else ()
            tag = tag_of("c", escape(rest.get(RL_CONSUMER, RL_DEFAULT_CONSUMER)))
        else:
            return []
        method = rest.get(RL_METHOD)
        return [
            Hit(index, rule, tag, counter_key(tag, rule), cost, rule.id)
            for rule in rules
            if not rule.methods or method in rule.methods
        ]

    def _override(self, index: int, domain: str, descriptor: Descriptor, cost: int, *, reference: bool) -> Hit:
        """Envoy's per-descriptor limit. On a reference domain it is answered as the reference
        answers it: counted like its own limits, with an empty name and never in shadow mode."""
        assert descriptor.override is not None
        requests, unit = descriptor.override
        tag = _reference_tag(domain, descriptor.entries)
        ident = f"{domain}.override"
        rule = Rule(
            id=ident,
            policy=_entries_text(descriptor.entries) or domain,
            limit=requests,
            window_ms=UNIT_MS.get(unit, 1_000),
            algorithm=COUNTED if reference else FIXED,
            on_store_error=self.on_store_error,
            reference=reference,
        )
        return Hit(index, rule, tag, counter_key(tag, rule), cost, ident)


def _reference_tag(domain: str, entries: tuple[tuple[str, str], ...]) -> str:
    return tag_of("r", escape(domain), *(f"{escape(k)}={escape(v)}" for k, v in entries))


def _entries_text(entries: tuple[tuple[str, str], ...]) -> str:
    return ".".join(f"{k}_{v}" if v else k for k, v in entries)


Entries = tuple[tuple[str, str], ...]


def _walk(root: Node, entries: Entries) -> tuple[Rule, Entries, str] | None:
    """The reference service's lookup: per level the exact value, else the first wildcard in
    file order, else the bare key; a rule only at the depth of the last entry.

    Returns the rule, the entries its counter is keyed by (a ``share_threshold`` wildcard puts
    its pattern in place of the value) and its stats name (``value_to_metric`` levels name the
    request's value).
    """
    level = root
    last = len(entries) - 1
    counted: list[tuple[str, str]] = []
    stat = [root.path]
    for i, (key, value) in enumerate(entries):
        node = level.children.get((key, value))
        if node is None:
            node = next((n for k, pattern, n in level.wildcards if k == key and pattern.fullmatch(value)), None)
        if node is None:
            node = level.children.get((key, None))
        if node is None:
            return None
        counted.append((key, node.value if node.share and node.value is not None else value))
        stat.append(f"{key}_{escape(value)}" if node.value_to_metric and value else node.segment)
        if i == last:
            return None if node.rule is None else (node.rule, tuple(counted), ".".join(stat))
        if not node.children:
            return None  # the request goes deeper than the config
        level = node
    return None


def _tree_rules(node: Node) -> Iterable[Rule]:
    if node.rule is not None:
        yield node.rule
    for child in node.children.values():
        yield from _tree_rules(child)


# --- from gateway.yaml ----------------------------------------------------------------------


def _rule(ident: str, policy: str, spec: RateLimitRule, gateway: Gateway) -> Rule:
    rl = gateway.ratelimit
    return Rule(
        id=ident,
        policy=policy,
        limit=spec.requests,
        window_ms=max(1, round(spec.window * 1000)),
        algorithm=spec.algorithm,
        shadow=spec.shadow_mode or rl.shadow_mode,
        on_store_error=spec.on_store_error or rl.on_store_error,
        methods=frozenset(spec.methods),
    )


def _policy(base: str, spec: RateLimitRule, taken: set[str], index: int) -> str:
    if spec.name:
        name = spec.name
    else:
        name = f"{base}-{window_text(max(1, round(spec.window * 1000)))}"
        if name in taken:
            name = f"{name}-{index}"
    taken.add(name)
    return name


def from_gateway(gateway: Gateway, domains: Mapping[str, Node] | None = None) -> Limits:
    """The limits of ``gateway`` (plans, per-API limits) plus reference-format ``domains``."""
    api_rules: dict[str, dict[str, tuple[Rule, ...]]] = {}
    for api in gateway.apis:
        by_kind: dict[str, list[Rule]] = {}
        taken: set[str] = set()
        for j, spec in enumerate(api.limits):
            base = api.name if spec.by == "global" else f"{api.name}-{spec.by}"
            ident = f"a.{api.name}.{spec.name or j}"
            by_kind.setdefault(spec.by, []).append(_rule(ident, _policy(base, spec, taken, j), spec, gateway))
        if by_kind:
            api_rules[api.name] = {by: tuple(rules) for by, rules in by_kind.items()}
    plan_rules: dict[str, tuple[Rule, ...]] = {}
    for plan_name, plan in gateway.plans.items():
        taken = set()
        plan_rules[plan_name] = tuple(
            _rule(f"p.{plan_name}.{spec.name or j}", _policy(plan_name, spec, taken, j), spec, gateway)
            for j, spec in enumerate(plan.limits)
        )
    mesh_rules: dict[str, list[tuple[Rule, str | None]]] = {}
    mesh = gateway.mesh
    taken_mesh: dict[str, set[str]] = {}
    for j, limit in enumerate(mesh.limits if mesh is not None else ()):
        base = f"mesh-{limit.to}" if limit.from_ is None else f"mesh-{limit.from_}-{limit.to}"
        policy = _policy(base, limit, taken_mesh.setdefault(limit.to, set()), j)
        rule = _rule(f"m.{limit.to}.{limit.name or j}", policy, limit, gateway)
        only = None if limit.from_ is None or mesh is None else mesh.identity(limit.from_)
        mesh_rules.setdefault(limit.to, []).append((rule, only))
    return Limits(
        api_rules=api_rules,
        mesh_rules={to: tuple(pairs) for to, pairs in mesh_rules.items()},
        plan_rules=plan_rules,
        default_plan=gateway.ratelimit.default_plan,
        domains=domains,
        on_store_error=gateway.ratelimit.on_store_error,
    )
