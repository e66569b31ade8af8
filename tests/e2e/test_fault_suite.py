"""The fault suite: each fault of issue 21 replayed against the whole stack under bounded load.

Every scenario runs a few lanes of traffic (anonymous, API keys, a bearer JWT; HTTP/1.1, and
HTTPS with HTTP/2) at a fixed rate for about six seconds, injects its fault on a timeline, counts
every answer by lane, status and JSON ``error``, and asserts the documented outcome: no 500 and
no answer without a status, no request lost on a lane the fault leaves a way through, the
documented status and error where it does not, and recovery within a stated bound. The stack
runs twice: with the rate-limit service, and with ``ratelimit.in_authz`` (authz decides limits
in-process). Keys and counters live in a Redis of the suite's own, with an append-only file so
that it comes back from a SIGKILL with its data, as a production Redis would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest

from tests.conftest import LOGS, RedisServer, wait_until
from tests.e2e.conftest import Gateway, new_gateway, start
from tests.e2e.test_ratelimit import new_key

TEMPLATE = Path(__file__).with_name("faults.yaml")
SECRET = "fault-suite-hs256-secret-of-at-least-32-bytes"
RATE = 25.0  # requests per second on each lane
RECOVERY = 1.0  # seconds from Redis answering again to rate limits counted in it again
KEY_RECOVERY = 2.0  # seconds from Redis answering again to a key never seen being accepted
JSON_ERRORS_503 = {"sidecar_unavailable", "temporarily_unavailable"}
# Calls that can fail when a worker is killed: those in flight on its connections (two per
# request: authz, ratelimit) and the three refused connections after which Envoy ejects it.
IN_FLIGHT = 12


class DurableRedis(RedisServer):
    """A redis-server on a free port whose data survives a SIGKILL (append-only, fsync always)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is missing: install it (make test does this as root)")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir)]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--logfile", str(self.log)]
        self.proc = subprocess.Popen(argv)
        LOGS.append(self.log)
        wait_until(self.ping, what=f"redis on {self.port}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


@dataclass(frozen=True)
class Reply:
    lane: str
    at: float  # seconds since the load started
    status: int  # 0: no HTTP answer at all
    error: str  # the JSON body's "error" ("" for none)


@dataclass(frozen=True)
class Mark:
    """When a fault's action began and when it returned (seconds since the load started): a
    restart returns once the process answers again."""

    begun: float
    done: float


@dataclass
class Lane:
    """One stream of requests: a client of its own and the request it sends."""

    client: httpx.Client
    send: Callable[[httpx.Client], httpx.Response]
    starts: float = 0.0  # seconds into the run it begins


def _error(reply: httpx.Response) -> str:
    if reply.headers.get("content-type", "").startswith("application/json"):
        try:
            body = reply.json()
        except ValueError:
            return "not-json"
        return str(body.get("error", "")) if isinstance(body, dict) else ""
    return "" if reply.status_code < 400 else "not-json"


def run_load(
    lanes: dict[str, Lane], seconds: float, faults: list[tuple[float, Callable[[], None]]]
) -> tuple[list[Reply], list[Mark]]:
    """Every lane at ``RATE`` for ``seconds``, each fault run at its time; the replies and the
    time each fault's action returned (seconds since the start)."""
    replies: list[Reply] = []
    lock = threading.Lock()
    started = time.monotonic()

    def drive(name: str, lane: Lane) -> None:
        count = 0
        while True:
            due = lane.starts + count / RATE
            if due >= seconds:
                return
            delay = started + due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            count += 1
            sent = time.monotonic() - started
            try:
                reply = lane.send(lane.client)
                outcome = Reply(name, sent, reply.status_code, _error(reply))
            except httpx.HTTPError as exc:
                outcome = Reply(name, sent, 0, type(exc).__name__)
            with lock:
                replies.append(outcome)

    threads = [threading.Thread(target=drive, args=item, daemon=True) for item in lanes.items()]
    for thread in threads:
        thread.start()
    marks = []
    for at, action in faults:
        delay = started + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        begun = time.monotonic() - started
        action()
        marks.append(Mark(begun, time.monotonic() - started))
    for thread in threads:
        thread.join(seconds + 30)
    print(summary(replies))  # shown when a test fails, and with -s
    return sorted(replies, key=lambda r: r.at), marks


def summary(replies: list[Reply]) -> str:
    counts = Counter((r.lane, r.status, r.error) for r in replies)
    return "\n".join(f"{lane:>10} {status} {error or '-'}: {n}" for (lane, status, error), n in sorted(counts.items()))


def assert_no_500(replies: list[Reply]) -> None:
    """Every request answered, never 500; every 5xx is a 503 with a JSON error body."""
    bad = [r for r in replies if r.status == 0 or (r.status >= 500 and r.status != 503)]
    assert not bad, bad[:5]
    unexplained = [r for r in replies if r.status == 503 and r.error not in JSON_ERRORS_503]
    assert not unexplained, unexplained[:5]


def statuses(replies: list[Reply], lane: str, start: float = 0.0, end: float = 1e9) -> Counter[tuple[int, str]]:
    return Counter((r.status, r.error) for r in replies if r.lane == lane and start <= r.at < end)


def first_ok_after(replies: list[Reply], lane: str, at: float) -> float:
    """Seconds from ``at`` until the lane's answers are 200 from then on."""
    after = [r for r in replies if r.lane == lane and r.at >= at]
    last_bad = max((r.at for r in after if r.status != 200), default=at)
    assert any(r.status == 200 and r.at > last_bad for r in after), "the lane never recovered"
    return last_bad - at


# --- the stack -------------------------------------------------------------------------------


@dataclass
class Faulty:
    gateway: Gateway
    redis: DurableRedis
    keys: dict[str, str]
    token: str

    @property
    def in_authz(self) -> bool:
        return self.gateway.stack.gateway.ratelimit.in_authz

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.gateway.ports['http']}", timeout=10)

    def h2(self) -> httpx.Client:
        """HTTPS with HTTP/2 (by ALPN), trusting the stack's development CA."""
        return self.gateway.https(timeout=10)

    def sidecars(self) -> int:
        [child] = [c for c in self.gateway.stack.children if c.name.startswith("sidecars@")]
        assert child.proc is not None
        return child.proc.pid


def _token() -> str:
    now = int(time.time())
    claims = {"iss": "https://issuer.faults.test", "aud": "faults", "sub": "robot", "iat": now, "exp": now + 3600}
    claims["email"] = "robot@faults.test"
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module", params=["service", "in_authz"])
def faulty(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    workdir = tmp_path_factory.mktemp(f"faults-{request.param}")
    template = TEMPLATE
    if request.param == "in_authz":
        template = workdir / "template.yaml"
        template.write_text(TEMPLATE.read_text().replace("ratelimit:\n", "ratelimit:\n  in_authz: true\n", 1))
    redis = DurableRedis(workdir)
    redis.start()
    running = new_gateway(workdir, template=template, redis_url=redis.url)
    try:
        running.stack.env["SIDEGATE_FAULTS_SECRET"] = SECRET
        start(running.stack)
        keys = {name: new_key(running, name) for name in ("warm", "strict", "cold", "cold2")}
        suite = Faulty(running, redis, keys, _token())
        with suite.h2() as h2:
            assert h2.get("/open/a").http_version == "HTTP/2"  # the lanes that say so speak it
        with suite.http() as client:  # every key but the cold ones is seen once, so cached
            for path, key in (("/orders/1", keys["warm"]), ("/strict/1", keys["strict"])):
                wait_until(lambda p=path, k=key: client.get(p, headers={"x-api-key": k}).status_code == 200)
        yield suite
    finally:
        running.stack.stop()
        if redis.proc is not None and redis.proc.poll() is None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


def _lanes(suite: Faulty, cold: str, cold_starts: float) -> dict[str, Lane]:
    keys, token = suite.keys, suite.token
    return {
        "open": Lane(suite.http(), lambda c: c.get("/open/a")),
        "orders": Lane(suite.h2(), lambda c: c.get("/orders/1", headers={"x-api-key": keys["warm"]})),
        "strict": Lane(suite.http(), lambda c: c.get("/strict/1", headers={"x-api-key": keys["strict"]})),
        "jwt": Lane(suite.h2(), lambda c: c.get("/tokens/1", headers={"authorization": f"Bearer {token}"})),
        "cold": Lane(suite.http(), lambda c: c.get("/orders/2", headers={"x-api-key": cold}), cold_starts),
    }


def _close(lanes: dict[str, Lane]) -> None:
    for lane in lanes.values():
        lane.client.close()


# --- Redis ------------------------------------------------------------------------------------


def test_redis_killed_under_load(faulty: Faulty) -> None:
    """Redis dies for 2.5 s and comes back with its data. Known keys and tokens keep working,
    limits with ``on_store_error: local`` keep admitting, ``deny`` limits refuse with 429
    ``rate_limit_store_unavailable``, a key never seen is 503 ``temporarily_unavailable``
    (``key_store_unavailable``); all of it back within the stated bounds."""
    redis = faulty.redis
    lanes = _lanes(faulty, faulty.keys["cold"], cold_starts=1.2)
    try:
        replies, (down, up) = run_load(lanes, 6.0, [(1.0, redis.kill), (3.5, redis.start)])
    finally:
        _close(lanes)
    assert_no_500(replies)
    for lane in ("open", "orders", "jwt"):  # a way through remains: nothing lost
        assert statuses(replies, lane) == Counter({(200, ""): len([r for r in replies if r.lane == lane])}), lane
    during = statuses(replies, "strict", down.done + 0.3, up.begun)
    assert set(during) == {(429, "rate_limit_store_unavailable")}, during
    assert (429, "rate_limited") not in statuses(replies, "strict")
    cold = statuses(replies, "cold", down.done + 0.3, up.begun)
    assert set(cold) == {(503, "temporarily_unavailable")}, cold
    assert first_ok_after(replies, "strict", up.done) < RECOVERY
    assert first_ok_after(replies, "cold", up.done) < KEY_RECOVERY


def test_redis_hung_under_load(faulty: Faulty) -> None:
    """Redis stops answering (SIGSTOP) for longer than the key cache's TTL: cached keys answer
    from the stale cache within authz's wait, a key never seen is 503 from authz (not Envoy's
    timeout), ``deny`` limits refuse with their own reason; recovery within the bounds."""
    redis = faulty.redis
    assert redis.proc is not None
    proc = redis.proc
    lanes = _lanes(faulty, faulty.keys["cold2"], cold_starts=1.2)
    try:
        replies, (stopped, resumed) = run_load(
            lanes,
            6.0,
            [(1.0, lambda: proc.send_signal(signal.SIGSTOP)), (3.5, lambda: proc.send_signal(signal.SIGCONT))],
        )
    finally:
        proc.send_signal(signal.SIGCONT)
        _close(lanes)
    assert_no_500(replies)
    for lane in ("open", "orders", "jwt"):
        assert statuses(replies, lane) == Counter({(200, ""): len([r for r in replies if r.lane == lane])}), lane
    # A request sent less than authz's wait (0.3 s) before Redis resumed may get its answer: the
    # key's lookup (stale, when the store does not answer) comes before the rate-limit decision.
    during = statuses(replies, "strict", stopped.done + 0.5, resumed.begun - 0.5)
    assert set(during) == {(429, "rate_limit_store_unavailable")}, during
    cold = statuses(replies, "cold", stopped.done + 0.5, resumed.begun - 0.5)
    assert set(cold) == {(503, "temporarily_unavailable")}, cold
    assert first_ok_after(replies, "strict", resumed.done) < RECOVERY
    assert first_ok_after(replies, "cold", resumed.done) < KEY_RECOVERY


# --- sidecars ----------------------------------------------------------------------------------


def _workers(server: int) -> list[int]:
    """The worker processes of a sidecar server (spawned children of any of its threads)."""
    children = [
        pid for task in Path(f"/proc/{server}/task").iterdir() for pid in (task / "children").read_text().split()
    ]
    return sorted(int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text())


def test_a_sidecar_worker_killed_under_load(faulty: Faulty) -> None:
    """One of two workers is killed: the kernel starts another, and Envoy ejects the dead one
    after three refused connections and sends the calls to the one that remains until the new
    one is up. Only the calls in flight on the dead worker's connections and those few fail,
    closed, with 503 JSON (before the ejection: every call routed to the dead socket for ~1.3 s,
    a fifth of them)."""
    server = faulty.sidecars()
    workers = _workers(server)
    assert len(workers) == 2, workers
    lanes = _lanes(faulty, faulty.keys["warm"], cold_starts=0.0)
    try:
        replies, (killed,) = run_load(lanes, 5.0, [(1.0, lambda: os.kill(workers[0], signal.SIGKILL))])
    finally:
        _close(lanes)
    assert_no_500(replies)
    assert statuses(replies, "open") == Counter({(200, ""): len([r for r in replies if r.lane == "open"])})
    # A deny limit may also refuse a call whose Redis round trip missed redis_timeout while the
    # new worker warms up on a busy host: its own documented answer, never a 503 or a 500.
    failed = [r for r in replies if (r.status, r.error) not in ((200, ""), (429, "rate_limit_store_unavailable"))]
    assert all((r.status, r.error) == (503, "sidecar_unavailable") for r in failed), failed[:5]
    assert len(failed) <= IN_FLIGHT, " ".join(f"{r.at:.2f}" for r in failed)
    assert all(r.lane == "strict" for r in replies if r.status == 429)
    assert max((r.at for r in failed), default=killed.done) - killed.done < 2.0  # and none after
    wait_until(lambda: len(_workers(server)) == 2, timeout=10, what="a replacement worker")


def test_the_sidecar_server_hung_fails_closed_with_503_json(faulty: Faulty) -> None:
    """Every sidecar hangs (SIGSTOP) for 2 s: routes that need one answer 503
    ``sidecar_unavailable`` (the rate-limit service failing closed too, once a 500), routes that
    need none keep answering, and everything is back within 2 s of SIGCONT."""
    group = faulty.sidecars()
    lanes = _lanes(faulty, faulty.keys["warm"], cold_starts=0.0)
    lanes["counted"] = Lane(faulty.http(), lambda c: c.get("/counted/a"))
    try:
        replies, (stopped, resumed) = run_load(
            lanes,
            6.0,
            [(1.0, lambda: os.killpg(group, signal.SIGSTOP)), (3.0, lambda: os.killpg(group, signal.SIGCONT))],
        )
    finally:
        os.killpg(group, signal.SIGCONT)
        _close(lanes)
    assert_no_500(replies)
    assert statuses(replies, "open") == Counter({(200, ""): len([r for r in replies if r.lane == "open"])})
    for lane in ("orders", "strict", "jwt", "counted"):
        # A call sent less than the sidecar timeout (0.5 s) before SIGCONT may still be answered.
        during = statuses(replies, lane, stopped.done + 0.6, resumed.begun - 0.6)
        assert set(during) == {(503, "sidecar_unavailable")}, (lane, during)
        assert first_ok_after(replies, lane, resumed.done) < 2.0, lane
