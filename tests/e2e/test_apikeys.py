"""API keys through real Envoy: issue, use, scope, rotate, revoke, expire; nothing leaks.

Keys are created the way a security team does it, with ``sidegate keys`` on the stack's own key
store (SQLite under its state dir, the embedded default of ``sidegate up``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from authz.apikeys import digest
from tests.e2e.conftest import TEMPLATE, Gateway, new_gateway, start

# Every key and digest the tests create, to prove none reaches a log.
SECRETS: list[str] = []


def keys(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "sidegate",
        "keys",
        "--config",
        str(gateway.stack.config_path),
        "--state-dir",
        str(gateway.stack.state_dir),
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def create(gateway: Gateway, *args: str) -> tuple[str, str]:
    """A new key through the CLI: ``(key, key_id)``."""
    result = keys(gateway, "--json", "create", *args)
    assert result.returncode == 0, result.stderr
    issued = json.loads(result.stdout)
    SECRETS.append(issued["key"])
    return issued["key"], issued["record"]["key_id"]


def eventually(check: object, within: float = 1.0) -> float:
    """Poll ``check()`` until true; the seconds it took (fails after ``within``)."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - start > within:
            pytest.fail(f"not true within {within}s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_new_key_reaches_the_upstream_as_an_identity(gateway: Gateway, https: httpx.Client) -> None:
    key, key_id = create(gateway, "--consumer", "acme", "--scopes", "orders:read", "--plan", "gold")
    reply = https.get("/orders/7", headers={"x-api-key": key})
    assert reply.status_code == 200, reply.text
    seen = reply.json()["headers"]
    assert seen["x-consumer-id"] == "acme"
    assert seen["x-consumer-plan"] == "gold"
    assert seen["x-auth-method"] == "api_key"
    assert seen["x-auth-scopes"] == "orders:read"
    assert seen["x-auth-key-id"] == key_id
    assert "x-api-key" not in seen  # the credential never goes upstream


def test_authorization_apikey_scheme_and_query_parameter(gateway: Gateway, https: httpx.Client) -> None:
    key, _ = create(gateway, "--consumer", "acme", "--scopes", "orders:read")
    by_header = https.get("/orders/1", headers={"authorization": f"ApiKey {key}"})
    assert by_header.status_code == 200
    assert "authorization" not in by_header.json()["headers"]
    by_query = https.get("/orders/1", params={"api_key": key, "page": "2"})
    assert by_query.status_code == 200
    echoed = by_query.json()
    assert echoed["query"] == {"page": "2"}  # the key is removed from the query upstream
    assert key not in json.dumps(echoed)


def test_a_key_in_a_query_parameter_the_api_does_not_read_never_reaches_the_upstream(
    gateway: Gateway, https: httpx.Client
) -> None:
    """/orders reads keys from ``api_key`` only, and /public reads none: a key sent in another
    parameter (by mistake, or by a client library's habit) is stripped all the same."""
    key, _ = create(gateway, "--consumer", "acme", "--scopes", "orders:read")
    other, _ = create(gateway, "--consumer", "acme", "--scopes", "orders:read")
    for path, headers in (("/orders/1", {"x-api-key": key}), ("/public/hello", {})):
        reply = https.get(path, headers=headers, params={"token": other, "apikey": other, "page": "2"})
        assert reply.status_code == 200, reply.text
        echoed = reply.json()
        assert echoed["query"] == {"page": "2"}, (path, echoed["query"])
        assert other not in json.dumps(echoed)
        assert key not in json.dumps(echoed)
    # A value that is no key of ours stays, and an anonymous request without one skips authz.
    plain = https.get("/public/hello", params={"token": "sg_live_abc_def", "page": "2"})
    assert plain.json()["query"] == {"token": "sg_live_abc_def", "page": "2"}


@pytest.mark.parametrize(
    ("presented", "reason"),
    [
        (None, "api_key_missing"),
        ("not-a-key", "api_key_malformed"),
        ("sg_test_aaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "api_key_wrong_environment"),
        ("sg_live_aaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "api_key_unknown"),
    ],
)
def test_bad_keys_get_401_with_a_reason(https: httpx.Client, presented: str | None, reason: str) -> None:
    headers = {"x-api-key": presented} if presented else {}
    reply = https.get("/orders/1", headers=headers)
    assert reply.status_code == 401
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["error"] == "invalid_api_key"
    assert body["reason"] == reason
    challenge = reply.headers["www-authenticate"]
    assert challenge.startswith('ApiKey realm="sidegate"')
    assert ('error="invalid_api_key"' in challenge) == (presented is not None)


def test_right_key_wrong_secret_is_unknown(gateway: Gateway, https: httpx.Client) -> None:
    key, _ = create(gateway, "--consumer", "acme", "--scopes", "orders:read")
    forged = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
    reply = https.get("/orders/1", headers={"x-api-key": forged})
    assert reply.status_code == 401
    assert reply.json()["reason"] == "api_key_unknown"


def test_missing_scope_is_403_naming_it(gateway: Gateway, https: httpx.Client) -> None:
    key, _ = create(gateway, "--consumer", "reader", "--scopes", "orders:read")
    assert https.get("/orders/1", headers={"x-api-key": key}).status_code == 200
    reply = https.post("/orders", headers={"x-api-key": key}, json={"item": 1})
    assert reply.status_code == 403
    assert reply.json()["error"] == "insufficient_scope"
    assert reply.json()["scope"] == "orders:write"
    assert 'error="insufficient_scope"' in reply.headers["www-authenticate"]
    assert 'scope="orders:write"' in reply.headers["www-authenticate"]


def test_revoked_key_stops_within_a_second(gateway: Gateway, https: httpx.Client) -> None:
    key, key_id = create(gateway, "--consumer", "acme", "--scopes", "orders:read")
    assert https.get("/orders/1", headers={"x-api-key": key}).status_code == 200  # now cached in authz
    assert keys(gateway, "revoke", key_id, "--reason", "leaked").returncode == 0
    took = eventually(lambda: https.get("/orders/1", headers={"x-api-key": key}).status_code == 401)
    assert took < 1.0
    assert https.get("/orders/1", headers={"x-api-key": key}).json()["reason"] == "api_key_revoked"


def test_expired_key_is_refused(gateway: Gateway, https: httpx.Client) -> None:
    # 5 s: long enough for the CLI and the first request on a busy machine, short for a test. The
    # key expires 5 s after the CLI made it, some time before ``made``.
    key, _ = create(gateway, "--consumer", "acme", "--scopes", "orders:read", "--expires", "5s")
    made = time.monotonic()
    assert https.get("/orders/1", headers={"x-api-key": key}).status_code == 200
    time.sleep(max(0.0, made + 5.2 - time.monotonic()))
    reply = https.get("/orders/1", headers={"x-api-key": key})
    assert reply.status_code == 401
    assert reply.json()["reason"] == "api_key_expired"


def test_rotation_keeps_the_old_key_for_the_grace_then_stops_it(gateway: Gateway, https: httpx.Client) -> None:
    old, old_id = create(gateway, "--consumer", "acme", "--scopes", "orders:read")
    rotated = keys(gateway, "--json", "rotate", old_id, "--grace", "2s")
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)["key"]
    SECRETS.append(new)
    assert https.get("/orders/1", headers={"x-api-key": new}).status_code == 200
    assert https.get("/orders/1", headers={"x-api-key": old}).status_code == 200  # grace
    eventually(lambda: https.get("/orders/1", headers={"x-api-key": old}).status_code == 401, within=3.0)
    assert https.get("/orders/1", headers={"x-api-key": old}).json()["reason"] == "api_key_expired"
    assert https.get("/orders/1", headers={"x-api-key": new}).status_code == 200


def test_spoofed_identity_headers_never_reach_the_upstream(gateway: Gateway, https: httpx.Client) -> None:
    key, _ = create(gateway, "--consumer", "honest", "--scopes", "orders:read")
    forged = {
        "x-consumer-id": "admin",
        "x-consumer-plan": "platinum",
        "x-auth-scopes": "orders:admin",
        "x-auth-key-id": "other",
        "x-api-key": key,
    }
    seen = https.get("/orders/1", headers=forged).json()["headers"]
    assert seen["x-consumer-id"] == "honest"
    assert "x-consumer-plan" not in seen  # this key has no plan: the forged one is removed
    assert seen["x-auth-scopes"] == "orders:read"
    assert seen["x-auth-key-id"] != "other"


def test_cli_errors_are_one_line(gateway: Gateway) -> None:
    unknown = keys(gateway, "show", "nosuchkey")
    assert (unknown.returncode, unknown.stderr.strip()) == (1, "sidegate: no key with id 'nosuchkey'")
    bad = keys(gateway, "rotate", "x", "--grace", "soon")
    assert (bad.returncode, bad.stderr.strip()) == (
        2,
        "sidegate: --grace: not a duration: 'soon' (use e.g. 30m, 24h, 90d)",
    )


def test_audit_trail_records_every_change_and_no_secret(gateway: Gateway) -> None:
    result = keys(gateway, "--json", "audit")
    events = json.loads(result.stdout)
    actions = {event["action"] for event in events}
    assert {"create", "rotate", "revoke"} <= actions
    text = result.stdout
    assert not [s for s in SECRETS if s in text]


def test_plaintext_keys_from_another_gateway_are_imported_hashed_and_authenticate(tmp_path: Path) -> None:
    """A migration keeps its keys: CSV and JSON lines from another gateway, hashed on import; the
    keys never appear in the CLI's output, the store or a log, and they work through Envoy."""
    template = tmp_path / "template.yaml"
    template.write_text(TEMPLATE.read_text() + "api_keys: {imported: true}\n")
    other = new_gateway(tmp_path, template)
    legacy = ["kong-3f9a1c77e2b84d0f9b6e", "Zx81_legacy.Key/with+odd=chars", "tyk-expired-0001", "tyk-dup-0002"]
    (tmp_path / "keys.csv").write_text(
        "key,consumer,scopes,plan,expires\n"
        f"{legacy[0]},acme,orders:read orders:write,gold,\n"
        f"{legacy[2]},old-co,orders:read,,2001-01-01T00:00:00Z\n"
    )
    rows = [{"key": legacy[1], "consumer": "globex", "scopes": ["orders:read"]}, {"key": legacy[3], "consumer": "x"}]
    (tmp_path / "keys.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    printed = ""
    for name in ("keys.csv", "keys.jsonl", "keys.csv"):  # the second CSV import changes nothing
        result = keys(other, "import", "--plaintext", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        printed += result.stdout + result.stderr
    assert "imported 0 keys (2 already present)" in printed
    bad = tmp_path / "bad.csv"
    bad.write_text(f"key,consumer\n{legacy[0]},\n")
    refused = keys(other, "import", "--plaintext", str(bad))
    assert (refused.returncode, refused.stderr.strip()) == (2, f"sidegate: {bad}: entry 1: consumer must not be empty")
    printed += refused.stdout + refused.stderr
    printed += keys(other, "--json", "list").stdout + keys(other, "export").stdout + keys(other, "audit").stdout
    start(other.stack)
    try:
        with other.https() as client:
            reply = client.get("/orders/1", headers={"x-api-key": legacy[0]})
            assert reply.status_code == 200, reply.text
            seen = reply.json()["headers"]
            assert (seen["x-consumer-id"], seen["x-consumer-plan"], seen["x-auth-scopes"]) == (
                "acme",
                "gold",
                "orders:read orders:write",
            )
            assert client.get("/orders/1", params={"api_key": legacy[1]}).status_code == 200
            expired = client.get("/orders/1", headers={"x-api-key": legacy[2]})
            assert (expired.status_code, expired.json()["reason"]) == (401, "api_key_expired")
            wrong = client.get("/orders/1", headers={"x-api-key": legacy[0] + "x"})
            assert (wrong.status_code, wrong.json()["reason"]) == (401, "api_key_unknown")
            assert client.post("/orders", headers={"x-api-key": legacy[1]}).status_code == 403  # orders:read only
            own, _ = create(other, "--consumer", "native", "--scopes", "orders:read")
            assert client.get("/orders/1", headers={"x-api-key": own}).status_code == 200  # its own keys still work
    finally:
        other.stack.stop()
    store = b"".join(path.read_bytes() for path in (other.stack.state_dir).rglob("*") if path.is_file())
    logs = "".join(c.log_path.read_text(errors="replace") for c in other.stack.children if c.log_path)
    for key in legacy:
        assert key not in printed
        assert key.encode() not in store
        assert key not in logs


def test_no_key_or_digest_in_any_log(gateway: Gateway) -> None:
    """Last on purpose: it reads the logs of everything the tests above did."""
    assert SECRETS, "the tests above created keys"
    pepper = gateway.stack.settings.pepper()
    needles = SECRETS + [digest(pepper, s) for s in SECRETS] + [pepper.decode()]
    logs = {c.name: c.log_path.read_text(errors="replace") for c in gateway.stack.children if c.log_path}
    assert any("denied" in text for text in logs.values())  # the logs are really there
    leaks = [(name, n[:12]) for name, text in logs.items() for n in needles if n in text]
    assert not leaks
