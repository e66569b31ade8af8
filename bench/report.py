"""The report of a ``sidegate bench`` run: ratios, the issue's targets, a table, JSON and a PNG chart.

Input is the plain dict ``bench.harness.run`` builds (also what ``results.json`` holds), so a
saved run can be re-rendered: ``python -m bench.report .sidegate/bench/results.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASELINE, NATIVE, FULL_CHAIN, ONE_CALL = "envoy", "native", "full-chain", "full-chain-1call"
EAST_WEST, EAST_WEST_DIRECT = "east-west", "east-west-direct"
_layouts = {
    "workers": "one TCP port, SO_REUSEPORT",
    "replicas": "one server and port each, Envoy balances",
    "uds": "a Unix socket each, Envoy balances",
}
LAYOUT_LABEL = {"workers": "tcp", "replicas": "replicas", "uds": "uds"}  # a row's tag when layouts are compared
CPU_COLUMNS = (("envoy", "Envoy"), ("sidecars", "sidecars"), ("redis", "Redis"), ("upstream", "upstream"))
LOADGEN = ("loadgen", "h2load")


def _ran(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each scenario that ran, by name; under several layouts, its run under the first one."""
    ran: dict[str, dict[str, Any]] = {}
    for s in doc["scenarios"]:
        if not s.get("skipped"):
            ran.setdefault(s["name"], s)
    return ran


def _layout_names(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    return list(s.get("sidecar_layouts") or [s.get("sidecar_layout", "workers")])


def row_name(doc: dict[str, Any], scenario: dict[str, Any]) -> str:
    """A scenario's name, tagged with its layout when the run compares layouts."""
    layout = scenario.get("layout")
    if layout is None or len(_layout_names(doc)) < 2:
        return str(scenario["name"])
    return f"{scenario['name']} [{LAYOUT_LABEL[layout]}]"


def busiest_worker(phase: dict[str, Any]) -> str:
    """The busiest sidecar worker's share of the workers' CPU, and of Envoy's calls where Envoy
    sees each worker (a socket each); "—" with fewer than two workers."""
    cpu, calls = phase.get("busiest_worker_cpu_share"), phase.get("busiest_endpoint_calls_share")
    if cpu is None:
        return "—"
    return f"{100 * cpu:.0f} %" + ("" if calls is None else f" (calls {100 * calls:.0f} %)")


def add_ratios(doc: dict[str, Any]) -> None:
    """Each scenario's saturation throughput as a fraction of bare Envoy's and of native filters'."""
    ran = _ran(doc)
    for scenario in (s for s in doc["scenarios"] if not s.get("skipped")):  # every layout's row
        rps = scenario["saturation"]["rps"]
        for key, base in (("ratio_to_bare", BASELINE), ("ratio_to_native", NATIVE)):
            base_rps = ran[base]["saturation"]["rps"] if base in ran else 0
            scenario[key] = round(rps / base_rps, 3) if base_rps else None
    if EAST_WEST in ran:
        direct = ran[EAST_WEST_DIRECT]["saturation"]["rps"] if EAST_WEST_DIRECT in ran else 0
        ran[EAST_WEST]["ratio_to_direct"] = round(ran[EAST_WEST]["saturation"]["rps"] / direct, 3) if direct else None


def east_west_text(doc: dict[str, Any]) -> str | None:
    """The mesh's cost on a call between services, next to the direct call; None unless both ran."""
    ran = _ran(doc)
    if EAST_WEST not in ran or EAST_WEST_DIRECT not in ran:
        return None
    mesh, direct = ran[EAST_WEST], ran[EAST_WEST_DIRECT]
    rate = doc["settings"]["fixed_rate_rps"]
    added = {
        q: mesh["fixed_rate"]["latency_ms"].get(q, 0.0) - direct["fixed_rate"]["latency_ms"].get(q, 0.0)
        for q in ("p50", "p99")
    }
    envoy = mesh["saturation"]["cpu_us_per_request"].get("envoy", 0.0)
    ratio = mesh.get("ratio_to_direct")
    return (
        f"East-west (issue 22): {_num(mesh['saturation']['rps'])} req/s through two sidecar Envoys with mTLS,"
        f" {_num(ratio, 2)} of the direct call's {_num(direct['saturation']['rps'])} req/s;"
        f" at {rate} req/s p50 +{added['p50']:.2f} ms, p99 +{added['p99']:.2f} ms;"
        f" both sidecar Envoys together {_num(envoy)} µs CPU per call."
    )


def _sidecar_us(ran: dict[str, dict[str, Any]], name: str) -> float | None:
    if name not in ran:
        return None
    return float(ran[name]["saturation"]["cpu_us_per_request"].get("sidecars", 0.0))


def _delta(ran: dict[str, dict[str, Any]], name: str, base: str) -> float | None:
    a, b = _sidecar_us(ran, name), _sidecar_us(ran, base)
    return None if a is None or b is None else round(a - b, 1)


def _met(value: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if value is None else ok(value)


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured).

    The full chain is the faster of its two forms: two callouts (authz, then ratelimit) or one
    (``full-chain-1call``: authz takes the rate-limit decision in-process).
    """
    ran = _ran(doc)
    chains = [ran[n] for n in (FULL_CHAIN, ONE_CALL) if n in ran]
    full = max(chains, key=lambda s: float(s["saturation"]["rps"])) if chains else None
    name = full["name"] if full else FULL_CHAIN
    bare = ran.get(BASELINE)
    rate = doc["settings"]["fixed_rate_rps"]
    rps = full["saturation"]["rps"] if full else None
    ratio = full.get("ratio_to_bare") if full else None
    share = None if ratio is None else round(100 * ratio, 1)
    added = None
    if full and bare and "p99" in full["fixed_rate"]["latency_ms"] and "p99" in bare["fixed_rate"]["latency_ms"]:
        added = round(full["fixed_rate"]["latency_ms"]["p99"] - bare["fixed_rate"]["latency_ms"]["p99"], 2)
    authz = _sidecar_us(ran, "authz")
    limits = [
        (d, how)
        for d, how in (
            (_delta(ran, "authz-rl", "authz"), "authz-rl - authz"),
            (_delta(ran, ONE_CALL, "authz"), f"{ONE_CALL} - authz"),
        )
        if d is not None
    ]
    limit, limit_how = min(limits) if limits else (None, "authz-rl - authz")
    version = _delta(ran, FULL_CHAIN, "authz-rl")
    calls = ran[FULL_CHAIN]["saturation"]["callouts_per_request"].get("extproc") if FULL_CHAIN in ran else None
    transform = _delta(ran, "transform", FULL_CHAIN)
    rows: list[tuple[str, str, float | None, str, bool | None, str]] = [
        ("full chain throughput", ">= 3000", rps, "req/s", _met(rps, lambda v: v >= 3000), name),
        ("full chain vs bare Envoy", ">= 20", share, "%", _met(share, lambda v: v >= 20), f"{name} / {BASELINE}"),
        (
            f"added p99 at {rate} req/s",
            "<= 3",
            added,
            "ms",
            _met(added, lambda v: v <= 3),
            f"{name} p99 - {BASELINE} p99",
        ),
        ("authz Python CPU (cache hit)", "<= 40", authz, "µs/req", _met(authz, lambda v: v <= 40), "authz"),
        ("ratelimit Python CPU", "<= 60", limit, "µs/req", _met(limit, lambda v: v <= 60), limit_how),
        (
            "versioning by header Python CPU",
            "0 (no ext_proc call)",
            version,
            "µs/req",
            _met(calls, lambda v: v == 0),
            f"{FULL_CHAIN} - authz-rl; ext_proc calls per request: {calls}",
        ),
        (
            "body transform Python CPU (1 KB)",
            "<= 150",
            transform,
            "µs/req",
            _met(transform, lambda v: v <= 150),
            f"transform - {FULL_CHAIN}",
        ),
    ]
    keys = ("target", "goal", "value", "unit", "met", "how")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def targets_text(doc: dict[str, Any]) -> str:
    lines = ["Targets (issue 9):"]
    for t in doc.get("targets", []):
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
        value = "—" if t["value"] is None else f"{t['value']:,} {t['unit']}"
        lines.append(f"  {mark} {t['target']}: {value} (goal {t['goal']} {t['unit']}; {t['how']})")
    return "\n".join(lines)


def lopsided(phase: dict[str, Any]) -> bool:
    """Whether one sidecar process did at least 80 % of the sidecars' work while two or more ran."""
    spread = [v for v in phase.get("sidecar_processes_cpu_seconds", []) if v > 0.05]
    return len(phase.get("sidecar_processes_cpu_seconds", [])) > 1 and bool(spread) and spread[0] >= 0.8 * sum(spread)


def kept_up(fixed: dict[str, Any]) -> bool:
    """Whether the fixed-rate phase served at least 95 % of the rate it was offered."""
    return bool(fixed["rps"] >= 0.95 * fixed["offered_rps"])


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _errors(scenario: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for phase in ("saturation", "fixed_rate"):
        for status, n in scenario[phase]["errors"].items():
            counts[status] = counts.get(status, 0) + n
    return ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())) or "0"


def table(doc: dict[str, Any]) -> str:
    """A Markdown table: throughput, ratios, latency at the fixed rate, errors, CPU µs per request."""
    s = doc["settings"]
    rate = s["fixed_rate_rps"]
    cpu_heads = " | ".join(label for _, label in (*CPU_COLUMNS, LOADGEN))
    lines = [
        f"| scenario | req/s | vs bare | vs native | p50 ms @{rate} | p99 ms @{rate} | errors"
        f" | {cpu_heads} | busiest worker | other CPU |",
        "|---|--:|--:|--:|--:|--:|--:|" + "--:|" * (len(CPU_COLUMNS) + 3),
    ]
    for scenario in doc["scenarios"]:
        if scenario.get("skipped"):
            lines.append(f"| {scenario['name']} | skipped: {scenario['skipped']} |" + " |" * (6 + len(CPU_COLUMNS) + 3))
            continue
        sat, fixed = scenario["saturation"], scenario["fixed_rate"]
        cpu = sat["cpu_us_per_request"]
        used = [_num(cpu.get(group), 0) if cpu.get(group) else "—" for group, _ in CPU_COLUMNS]
        if lopsided(sat):
            used[1] += " †"
        used.append(_num(cpu.get(LOADGEN[0]), 0))
        latency = fixed["latency_ms"]
        mark = "" if kept_up(fixed) else " *"
        used.append(busiest_worker(sat))
        lines.append(
            f"| {row_name(doc, scenario)} | {_num(sat['rps'])} | {_num(scenario.get('ratio_to_bare'), 2)} |"
            f" {_num(scenario.get('ratio_to_native'), 2)} | {_num(latency.get('p50'), 2)}{mark} |"
            f" {_num(latency.get('p99'), 2)}{mark} | {_errors(scenario)} | {' | '.join(used)} |"
            f" {sat['background_cpu_percent']:.0f} % |"
        )
    m = doc["machine"]
    lines += [
        "",
        f"req/s: saturation, {s['saturation_connections']} connections for {s['phase_seconds']:g} s."
        f" p50/p99: at {rate} req/s offered ({s['fixed_rate_connections']} connections)."
        " CPU: µs per request at saturation, per process (sidecars = the server and all its workers).",
        f"\\* served less than 95 % of the offered {rate} req/s: overloaded, its latency is mostly queueing."
        " other CPU: the share of the machine that processes outside the run used during saturation"
        " (it slows what it overlaps).",
        "† one sidecar worker did at least 80 % of the sidecars' work: Envoy's few HTTP/2 connections"
        " to the sidecars all landed on one worker of the shared port."
        " busiest worker: its share of the sidecar workers' CPU at saturation, and of Envoy's calls"
        " where Envoy has an endpoint per worker (a socket each).",
        f"{m['cpus']} cores, Envoy {m['envoy']} --concurrency {s['envoy_concurrency']},"
        f" {s['sidecar_workers']} sidecar workers ("
        + "; ".join(f"{LAYOUT_LABEL[name]}: {_layouts[name]}" for name in _layout_names(doc))
        + "),"
        f" {s['load_generator'].splitlines()[0]}, {s['protocol']}.",
        f"Upstream: {s['upstream']}. vs bare: throughput relative to `{s['baseline']}`.",
    ]
    return "\n".join(lines)


def describe(doc: dict[str, Any]) -> str:
    """One line per scenario: what it runs."""
    return "\n".join(f"- `{s['name']}`: {s['title']}" for s in doc["scenarios"])


def chart(doc: dict[str, Any], path: Path) -> None:
    """Throughput, latency percentiles at the fixed rate, and CPU per request per process, per scenario."""
    import matplotlib  # noqa: PLC0415 - an optional dependency (the `bench` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ran = [s for s in doc["scenarios"] if not s.get("skipped")]
    names = [row_name(doc, s) for s in ran]
    x = list(range(len(ran)))
    rate = doc["settings"]["fixed_rate_rps"]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(12, 13), sharex=True)
    m, s = doc["machine"], doc["settings"]
    fig.suptitle(
        f"sidegate bench — {m['cpus']} cores, Envoy {m['envoy']} (--concurrency {s['envoy_concurrency']}),"
        f" {s['sidecar_workers']} sidecar workers, {s['phase_seconds']:g} s per phase",
        fontsize=12,
    )

    rps = [sc["saturation"]["rps"] for sc in ran]
    bars = top.bar(x, rps, color="#4C72B0")
    other = [sc["saturation"]["background_cpu_percent"] for sc in ran]
    top.bar_label(bars, labels=[f"{v:,.0f}\nother {o:.0f} %" for v, o in zip(rps, other, strict=True)], fontsize=7)
    top.axhline(3000, color="#C44E52", linestyle="--", linewidth=1, label="full-chain target 3,000 req/s")
    bare = next((sc["saturation"]["rps"] for sc in ran if sc["name"] == BASELINE), None)
    if bare:
        top.axhline(0.2 * bare, color="#8172B2", linestyle=":", linewidth=1, label=f"20 % of {BASELINE} (target)")
    top.set_yscale("log")  # bare Envoy and the Python chains differ by 10-100x
    if rps:
        top.set_ylim(max(1.0, min(rps) / 2), max(rps) * 4)
    top.set_ylabel("requests/s at saturation (log)")
    top.set_title("other: CPU share used by processes outside the run meanwhile", fontsize=8, loc="left")
    top.legend(loc="upper right", fontsize=8)
    top.grid(axis="y", alpha=0.3)

    quantiles = (("p50", "#55A868"), ("p90", "#8172B2"), ("p99", "#DD8452"), ("p99_9", "#C44E52"))
    width = 0.2
    for i, (q, color) in enumerate(quantiles):
        values = [sc["fixed_rate"]["latency_ms"].get(q, 0.0) for sc in ran]
        middle.bar([v + (i - 1.5) * width for v in x], values, width, label=q.replace("_", "."), color=color)
    middle.set_yscale("log")
    middle.set_ylabel(f"latency ms at {rate} req/s (log)")
    middle.legend(loc="upper left", fontsize=8, ncols=4)
    middle.grid(axis="y", alpha=0.3, which="both")

    bottom_acc = [0.0] * len(ran)
    colors = ("#4C72B0", "#DD8452", "#C44E52", "#8C8C8C", "#CCB974")
    for (group, label), color in zip((*CPU_COLUMNS, LOADGEN), colors, strict=True):
        values = [sc["saturation"]["cpu_us_per_request"].get(group, 0.0) for sc in ran]
        bottom.bar(x, values, 0.6, bottom=bottom_acc, label=label, color=color)
        bottom_acc = [a + v for a, v in zip(bottom_acc, values, strict=True)]
    bottom.set_ylabel("CPU µs per request (saturation)")
    bottom.legend(loc="upper left", fontsize=8, ncols=5)
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(x, names, rotation=20, ha="right")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(doc: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"`{doc['command']}` ({doc['started_at']}, {doc['seconds']:g} s)",
            "",
            table(doc),
            "",
            describe(doc),
            "",
            "```",
            targets_text(doc),
            "```",
            "",
            east_west_text(doc) or "",
        ]
    )


def write(doc: dict[str, Any], output: Path) -> None:
    """results.json, results.md and results.png in ``output``."""
    (output / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (output / "results.md").write_text(markdown(doc))
    chart(doc, output / "results.png")


if __name__ == "__main__":
    saved = Path(sys.argv[1] if len(sys.argv) > 1 else ".sidegate/bench/results.json")
    loaded = json.loads(saved.read_text())
    add_ratios(loaded)
    write(loaded, saved.parent)
    print(table(loaded))
    print()
    print(targets_text(loaded))
