"""The observability files, checked without Prometheus, Grafana or a collector running.

This module owns the metric contract: the Prometheus names and labels the sidecars expose
(``CONTRACT``; README, "Observability"), and the agreement of everything in ops/ with it. The
Grafana dashboard and the alert rules may name only Envoy's stat families (as Envoy 1.40 exposes
them: envoy_stat_families.txt beside this file) and the contract's metrics, with the labels
those have; their matchers must match clusters and listeners the compiler makes. The compose
``observability`` profile must mount files that exist, and Prometheus, the collector and Grafana
must point at each other and at the ports Envoy and the sidecars serve.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from sidegate import config, telemetry
from sidegate.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = OPS / "grafana" / "sidegate-dashboard.json"
ALERTS = OPS / "prometheus" / "alerts.yaml"
PROMETHEUS = OPS / "prometheus" / "prometheus.yml"
COLLECTOR = OPS / "otel" / "collector.yaml"
ENVOY_FAMILIES = Path(__file__).with_name("envoy_stat_families.txt")
BOOTSTRAPS = (ROOT / "envoy" / "compose.yaml", ROOT / "deploy" / "envoy.yaml")
PROFILE = "observability"
PROFILE_SERVICES = {"otel-collector", "prometheus", "grafana"}
POD = "pod"  # the compose service whose network namespace the sidecars share
SIDECARS_SERVICE = "sidecars"  # the compose service running `sidegate serve`
SIDECAR_METRICS_PORT = 9464
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
REQUIRED_ALERTS = {  # what each must watch: a metric it reads
    "SidegateSidecarDown": "envoy_cluster_membership_healthy",
    "SidegateRedisDegraded": "sidegate_store_degraded",
    "SidegateErrorBudgetFastBurn": "envoy_http_downstream_rq_xx",
    "SidegateDecisionP99OverBudget": "sidegate_decision_duration_seconds_bucket",
}


@dataclass(frozen=True)
class Metric:
    kind: str  # counter | gauge | histogram
    labels: frozenset[str]
    values: dict[str, frozenset[str]] = field(default_factory=dict)  # labels with a closed set of values


def _metric(kind: str, labels: str, **values: str) -> Metric:
    return Metric(kind, frozenset(labels.split()), {k: frozenset(v.split("|")) for k, v in values.items()})


# The sidecars' metrics: a contract between sidegate/telemetry.py, ops/ and whoever scrapes them.
CONTRACT = {
    "sidegate_decisions_total": _metric("counter", "sidecar outcome reason"),
    "sidegate_decision_duration_seconds": _metric("histogram", "sidecar"),
    "sidegate_cache_requests_total": _metric("counter", "sidecar cache result", result="hit|miss"),
    "sidegate_store_errors_total": _metric("counter", "sidecar store"),
    "sidegate_store_duration_seconds": _metric("histogram", "sidecar store"),
    "sidegate_store_degraded": _metric("gauge", "sidecar store"),
    "sidegate_ratelimit_hits_total": _metric("counter", "rule result", result="ok|over_limit|near_limit|shadow"),
    "sidegate_transforms_total": _metric("counter", "api outcome"),
    "sidegate_config_reloads_total": _metric("counter", "sidecar outcome", outcome="ok|error"),
}


def _envoy_families() -> dict[str, Metric]:
    families = {}
    for line in ENVOY_FAMILIES.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, kind, labels = line.split()
        families[name] = Metric(kind, frozenset() if labels == "-" else frozenset(labels.split(",")))
    return families


KNOWN = {**_envoy_families(), **CONTRACT}


# --- a small PromQL reader ----------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{?\w+\}?)
    | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?[smhdwy]*)
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>{}()\[\],])
    )""",
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile"}
_KEYWORDS = {*_GROUPING, *_AGGREGATIONS, "count_values", "bool", "and", "or", "unless", "offset", "inf", "nan"}


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels named by by/without/on/ignoring/group_*
    made: set[str] = field(default_factory=set)  # labels label_replace writes


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(expr.rstrip()):
        match = _TOKEN.match(expr, at)
        assert match is not None, f"cannot read PromQL at {expr[at : at + 30]!r} in {expr!r}"
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        at = match.end()
    return out


def _unquote(token: str) -> str:
    return token[1:-1].encode().decode("unicode_escape") if token[0] in "\"'" else token[1:-1]


def _read(expr: str) -> Query:
    """The metric selectors and the grouping labels of a PromQL expression."""
    tokens, query, i = _tokens(expr), Query(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and text in _GROUPING and following == "(":
            end = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")")
            query.grouping |= {t for k, t in tokens[i + 2 : end] if k == "name"}
            i = end + 1
        elif kind == "name" and text == "label_replace" and following == "(":
            # label_replace(v, "dst", "replacement", "src", "regex"): the first string names the new label.
            query.made.add(_unquote(next(t for k, t in tokens[i + 2 :] if k == "string")))
            i += 2
        elif kind == "name" and (following == "(" or text in _KEYWORDS):
            i += 1
        elif kind == "name":
            matchers: list[tuple[str, str, str]] = []
            i += 1
            if following == "{":
                end = next(j for j in range(i + 1, len(tokens)) if tokens[j][1] == "}")
                body = [t for t in tokens[i + 1 : end] if t[1] != ","]
                assert len(body) % 3 == 0, f"cannot read the matchers of {text} in {expr!r}"
                for at in range(0, len(body), 3):
                    (_k, label), (_o, op), (value_kind, value) = body[at : at + 3]
                    assert value_kind == "string", f"{text}: matcher value {value} is not a string"
                    matchers.append((label, op, _unquote(value)))
                i = end + 1
            query.selectors.append(Selector(text, tuple(matchers)))
        elif text == "{":
            pytest.fail(f"a selector without a metric name in {expr!r}")
        elif text == "[":  # a range: skip the duration (or a Grafana variable)
            i = next(j for j in range(i, len(tokens)) if tokens[j][1] == "]") + 1
        else:
            i += 1
    return query


def _family(name: str) -> tuple[str, Metric] | None:
    """The known family ``name`` belongs to (a histogram's series carry a suffix)."""
    if name in KNOWN:
        return name, KNOWN[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in KNOWN and KNOWN[base].kind == "histogram":
            return base, KNOWN[base]
    return None


def _simple_alternatives(regex: str) -> list[str] | None:
    """``a|b|c`` → the words; ``prefix_(a|b)`` → the expansions; anything richer → None."""
    match = re.fullmatch(r"([\w:.-]*)\(([\w:.|-]+)\)([\w:.-]*)", regex)
    if match:
        return [match.group(1) + alt + match.group(3) for alt in match.group(2).split("|")]
    return regex.split("|") if re.fullmatch(r"[\w:.|-]+", regex) else None


def _stat_names() -> dict[str, set[str]]:
    """What the compiler names in Envoy's stat labels: clusters and listener stat prefixes."""
    clusters, prefixes = set(), {"admin"}
    for path in BOOTSTRAPS:
        bootstrap = yaml.safe_load(path.read_text())
        clusters |= {c["name"] for c in bootstrap["static_resources"]["clusters"]}
        for listener in bootstrap["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                prefixes |= {f["typed_config"]["stat_prefix"] for f in chain["filters"]}
    return {"envoy_cluster_name": clusters, "envoy_http_conn_manager_prefix": prefixes}


def _check(expr: str, where: str, names: dict[str, set[str]]) -> Query:
    """Every metric known, every label one it has, every matcher able to match: else fail ``where``."""
    query = _read(expr)
    assert query.selectors, f"{where}: no metric in {expr!r}"
    available = set(TARGET_LABELS) | query.made
    for selector in query.selectors:
        found = _family(selector.name)
        assert found is not None, (
            f"{where}: {selector.name} is neither an Envoy stat family nor a sidegate_* contract name"
        )
        family, metric = found
        labels = metric.labels | TARGET_LABELS | ({"le"} if selector.name.endswith("_bucket") else set())
        available |= labels
        for label, op, value in selector.matchers:
            assert label in labels, f"{where}: {family} has no label {label!r} (it has {sorted(metric.labels)})"
            closed = metric.values.get(label) or names.get(label)
            if closed is None or op not in ("=", "=~"):
                continue
            options = [value] if op == "=" else _simple_alternatives(value)
            if options is None:  # a real regex: it must at least match something
                assert any(re.fullmatch(value, v) for v in closed), f"{where}: {label}=~{value!r} matches nothing"
                continue
            unknown = [v for v in options if v not in closed]
            assert not unknown, f"{where}: {family}{{{label}}} is never {unknown} (only {sorted(closed)})"
    missing = query.grouping - available
    assert not missing, f"{where}: groups by {sorted(missing)}, which no metric in {expr!r} has"
    return query


# --- the files ------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _mounts(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path → repository path, for every bind mount of the repository."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_mode = str(volume).split(":")
        if source.startswith("."):
            out[PurePosixPath(target)] = (COMPOSE.parent / source).resolve()
    return out


def _repo_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file or folder at ``container_path`` (inside a mounted folder, too)."""
    path = PurePosixPath(container_path)
    for target, source in _mounts(service).items():
        if path == target or path.is_relative_to(target):
            return source / path.relative_to(target)
    return None


def _flag(argv: list[str], name: str) -> str | None:
    for arg in argv:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return argv[argv.index(name) + 1] if name in argv else None


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


@pytest.fixture(scope="module")
def names() -> dict[str, set[str]]:
    return _stat_names()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose()


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(PROMETHEUS.read_text())
    return loaded


def _jobs(prometheus: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in prometheus["scrape_configs"]}


# --- the PromQL reader itself ---------------------------------------------------------------


def test_the_promql_reader_sees_names_labels_and_grouping() -> None:
    query = _read(
        "histogram_quantile(0.99, sum by (sidecar, le)"
        " (rate(sidegate_decision_duration_seconds_bucket[$__rate_interval])))"
        " / on (sidecar) group_left max without (instance)"
        ' (sidegate_store_degraded{store=~"redis|keys", job!="x"}) > 5m'
    )
    assert [s.name for s in query.selectors] == ["sidegate_decision_duration_seconds_bucket", "sidegate_store_degraded"]
    assert query.selectors[1].matchers == (("store", "=~", "redis|keys"), ("job", "!=", "x"))
    assert query.grouping == {"sidecar", "le", "instance"}
    names = _stat_names()
    for bad, message in [
        ("rate(sidegate_decision_total[5m])", "neither an Envoy stat family"),
        ("rate(envoy_cluster_upstream_rq_totl[5m])", "neither an Envoy stat family"),
        ('sidegate_cache_requests_total{result="hits"}', "never"),
        ('sidegate_ratelimit_hits_total{api="orders"}', "has no label"),
        ('envoy_cluster_membership_healthy{envoy_cluster_name="sidegate_authx"}', "never"),
        ("sum by (reason) (rate(sidegate_store_errors_total[5m]))", "groups by"),
        ("sum(rate(sidegate_transforms_total_sum[5m]))", "neither an Envoy stat family"),
    ]:
        with pytest.raises(AssertionError, match=message):
            _check(bad, "example", names)


# --- the contract against the implementation -----------------------------------------------


def test_the_sidecars_register_the_contract_metrics() -> None:

    registered = {}
    for value in vars(telemetry).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            registered[name] = Metric(value._type, frozenset(value._labelnames))
    for name, metric in CONTRACT.items():
        assert name in registered, f"sidegate/telemetry.py does not register {name}"
        assert registered[name].kind == metric.kind, (
            f"{name}: a {registered[name].kind}, the contract says {metric.kind}"
        )
        assert registered[name].labels == metric.labels, f"{name}: labels {sorted(registered[name].labels)}"


def test_the_readme_states_the_contract() -> None:
    readme = (ROOT / "docs" / "operations.md").read_text()
    for name, metric in CONTRACT.items():
        stated = re.findall(rf"`{name}\{{([^}}]*)\}}`", readme)
        assert stated, f"docs/operations.md: the metric contract does not name `{name}{{…}}`"
        assert {frozenset(label.strip() for label in s.split(",")) for s in stated} == {metric.labels}, name


# --- Grafana ----------------------------------------------------------------------------------


def test_dashboard_queries_name_only_envoy_stats_and_contract_metrics(names: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    ids = []
    for panel in _panels(dashboard):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r}: no query"
        for target in panel["targets"]:
            where = f"panel {panel['title']!r} {target['refId']}"
            query = _check(target["expr"], where, names)
            used |= {_family(s.name)[0] for s in query.selectors}  # type: ignore[index]
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            shown = query.grouping or {label for s in query.selectors for label, _op, _v in s.matchers}
            assert legend <= shown | query.made, f"{where}: legend shows {sorted(legend - shown)}, lost by the query"
    assert len(ids) == len(set(ids)), "panel ids repeat"
    unused = set(CONTRACT) - used
    assert not unused, f"the dashboard shows no {sorted(unused)}"


def test_dashboard_covers_traffic_latency_denials_rate_limits_and_health() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for what, pattern in {
        "traffic by route target and status": r"envoy_cluster_upstream_rq\{",
        "traffic by listener and status class": r"envoy_http_downstream_rq_xx",
        "latency percentiles": r"histogram_quantile\(0\.99, .*envoy_http_downstream_rq_time_bucket",
        "denials by reason": r"by \([^)]*reason[^)]*\) \(rate\(sidegate_decisions_total\{outcome=\"deny\"\}",
        "rate-limit pressure": r"sidegate_ratelimit_hits_total\{result=\"over_limit\"\}",
        "sidecar health": r"envoy_cluster_membership_healthy",
    }.items():
        assert any(re.search(pattern, e) for e in exprs), f"the dashboard has no panel for {what}"


def test_dashboard_panels_use_the_provisioned_datasource(compose: dict[str, Any]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        for source in [panel.get("datasource"), *(t.get("datasource") for t in panel["targets"])]:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, f"panel {panel['title']!r}: {source}"
    grafana = compose["services"]["grafana"]
    folder = _repo_path(grafana, "/etc/grafana/provisioning/datasources")
    assert folder is not None
    assert folder.is_dir()
    sources = [s for f in sorted(folder.glob("*.yaml")) for s in yaml.safe_load(f.read_text())["datasources"]]
    assert [s["type"] for s in sources if s.get("isDefault")] == ["prometheus"]


def test_grafana_loads_the_dashboard_and_reaches_prometheus(compose: dict[str, Any]) -> None:
    services = compose["services"]
    grafana = services["grafana"]
    folder = _repo_path(grafana, "/etc/grafana/provisioning/dashboards")
    assert folder is not None, "grafana: no dashboard provisioning mounted"
    assert folder.is_dir()
    providers = [p for f in sorted(folder.glob("*.yaml")) for p in yaml.safe_load(f.read_text())["providers"]]
    assert any(
        _repo_path(grafana, str(PurePosixPath(p["options"]["path"]) / DASHBOARD.name)) == DASHBOARD for p in providers
    ), f"no provider loads {DASHBOARD.relative_to(ROOT)}"
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or _repo_path(grafana, home) == DASHBOARD
    source_folder = _repo_path(grafana, "/etc/grafana/provisioning/datasources")
    assert source_folder is not None
    [source] = [s for f in source_folder.glob("*.yaml") for s in yaml.safe_load(f.read_text())["datasources"]]
    url = urlsplit(source["url"])
    prometheus = services["prometheus"]
    # Prometheus shares Envoy's network namespace: on the compose network it answers at Envoy's name.
    mode = prometheus.get("network_mode", "")
    expected_host = mode.removeprefix("service:") if mode.startswith("service:") else "prometheus"
    assert url.hostname == expected_host, f"Grafana looks for Prometheus at {url.hostname}, it is at {expected_host}"
    listen = _flag(prometheus["command"], "--web.listen-address") or ":9090"
    assert url.port == int(listen.rpartition(":")[2])


# --- Prometheus ------------------------------------------------------------------------------


def test_alert_rules_parse_and_name_only_envoy_stats_and_contract_metrics(names: dict[str, set[str]]) -> None:
    rules = _rules()
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts)), "alert names repeat"
    for rule in rules:
        where = f"alert {rule['alert']}"
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, where
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), where
        assert {"summary", "description"} <= set(rule["annotations"]), where
        if "for" in rule:
            assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), f"{where}: for {rule['for']!r}"
        query = _check(rule["expr"], where, names)
        templated = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
        assert templated <= query.grouping | query.made, f"{where}: annotations use {sorted(templated)}, lost by expr"
    for alert, metric in REQUIRED_ALERTS.items():
        found = [r for r in rules if r["alert"] == alert]
        assert len(found) == 1, f"no alert {alert}"
        [rule] = found
        assert metric in {s.name for s in _read(rule["expr"]).selectors}, f"{alert} does not read {metric}"


def test_prometheus_scrapes_envoy_the_sidecars_and_the_collector(
    prometheus: dict[str, Any], compose: dict[str, Any]
) -> None:
    services = compose["services"]
    # Envoy's admin and the sidecars listen on loopback: Prometheus must share their namespace.
    assert services["prometheus"].get("network_mode") == f"service:{POD}"
    assert services[SIDECARS_SERVICE].get("network_mode") == f"service:{POD}"
    jobs = _jobs(prometheus)
    [envoy_target] = jobs["envoy"]["static_configs"][0]["targets"]
    admin = config.load(ROOT / "examples" / "gateway.yaml").admin
    assert _host_port(envoy_target) == (admin.address, admin.port)
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    [sidecar_target] = jobs["sidegate"]["static_configs"][0]["targets"]
    env = {str(k): str(v) for k, v in services[SIDECARS_SERVICE].get("environment", {}).items()}
    settings = Settings.from_env(env)
    assert settings.metrics_port == SIDECAR_METRICS_PORT, "compose sidecars: SIDEGATE_METRICS_PORT is not 9464"
    assert _host_port(sidecar_target)[1] == settings.metrics_port
    assert jobs["sidegate"].get("metrics_path", "/metrics") == "/metrics"
    [collector_target] = jobs["otel-collector"]["static_configs"][0]["targets"]
    exporter = yaml.safe_load(COLLECTOR.read_text())["exporters"]["prometheus"]["endpoint"]
    assert _host_port(collector_target) == _host_port(exporter)
    assert services["otel-collector"].get("network_mode") == f"service:{POD}"


def test_prometheus_loads_the_alert_rules(prometheus: dict[str, Any], compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    config_path = _flag(service["command"], "--config.file")
    assert config_path is not None
    assert _repo_path(service, config_path) == PROMETHEUS
    loaded = [_repo_path(service, path) for path in prometheus["rule_files"]]
    assert loaded == [ALERTS], f"Prometheus loads {loaded}"


# --- the collector and the compose profile --------------------------------------------------


def test_collector_pipelines_use_only_defined_components(compose: dict[str, Any]) -> None:
    collector = yaml.safe_load(COLLECTOR.read_text())
    service = collector["service"]
    assert set(service.get("extensions", [])) <= set(collector.get("extensions", {}))
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(collector.get(kind, {})), f"pipeline {name}: unknown {kind}"
    assert {"traces", "metrics"} <= set(service["pipelines"])
    assert "prometheus" in service["pipelines"]["metrics"]["exporters"]
    assert "otlp" in service["pipelines"]["traces"]["receivers"]
    # Everything in Envoy's namespace sends OTLP to the SDKs' default endpoint, localhost:4317.
    assert _host_port(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]) == ("127.0.0.1", 4317)
    container = compose["services"]["otel-collector"]
    config_path = _flag(container["command"], "--config")
    assert config_path is not None
    assert _repo_path(container, config_path) == COLLECTOR


def test_the_profile_holds_its_services_and_mounts_files_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiled = {name for name, s in services.items() if PROFILE in s.get("profiles", [])}
    assert profiled == PROFILE_SERVICES
    mounted = 0
    for name in PROFILE_SERVICES:
        for volume in services[name].get("volumes", []):
            source, _target, *mode = str(volume).split(":")
            if not source.startswith("."):
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source} is not declared"
                continue
            assert (COMPOSE.parent / source).exists(), f"{name}: mounts {source}, which does not exist"
            assert mode == ["ro"], f"{name}: {source} is mounted writable"
            mounted += 1
        depends = services[name].get("depends_on", {})
        assert set(depends) <= set(services), f"{name}: depends on unknown services"
    assert mounted >= 6
    # The stack without the profile stays as it was: nothing outside the profile needs its services.
    for name, service in services.items():
        if name not in PROFILE_SERVICES:
            assert not set(service.get("depends_on", {})) & PROFILE_SERVICES, name
    for port in services["grafana"].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"grafana: {port} is published beyond this machine"
