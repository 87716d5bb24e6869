"""OAuth 2.1 for hosted servers, end to end: a real authorization server and protected MCP server on 127.0.0.1
(tests/servers/oauth_server.py, on the SDK's own authorization-server machinery), the CLI as a person uses it
(`servers add` detecting OAuth, `servers login` with the browser step done headlessly, `logout`), tokens sealed in
PostgreSQL and shared by several worker processes, refresh once per expiry, a refresh refused, and no token in
any output. The maintainers' conformance scenarios (tests/test_conformance.py) cover the rest of the spec.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest
from conftest import ROOT, SERVERS

from mcp_integration.auth_config import OAuthSettings
from mcp_integration.config import Settings
from mcp_integration.errors import NeedsLogin, ToolCallError
from mcp_integration.oauth_store import OAuthStore
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.runtime import open_runtime
from mcp_integration.speech import error_sentence
from mcp_integration.vault import Vault, VaultError, new_key
from mcp_integration.web import build_app, services

WORKER = ROOT / "tests" / "oauth_worker.py"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    value = new_key()
    monkeypatch.setenv("VOICE_MCP_SECRET_KEY", value)
    return value


@pytest.fixture
def env(pg_url: str, key: str) -> dict[str, str]:
    """The environment of a CLI or worker process: the test's registry and key."""
    return {**os.environ, "DATABASE_URL": pg_url, "VOICE_MCP_SECRET_KEY": key}


@pytest.fixture
def oauth_server(spawn: Callable[..., int]) -> Callable[..., str]:
    def start(*args: str) -> str:
        port = spawn("--port", "0", *args, script=str(SERVERS / "oauth_server.py"))
        return f"http://127.0.0.1:{port}"

    return start


def run_cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_integration", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def login(env: dict[str, str], name: str) -> tuple[int, str, str]:
    """`servers login NAME`, the person's part done as a browser would: open the printed address, follow the
    authorization server's redirect to the CLI's loopback listener."""
    cmd = [sys.executable, "-m", "mcp_integration", "servers", "login", name, "--no-browser"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        address = line.strip()
        if address.startswith("http") and "response_type=code" in address:
            answer = httpx.get(address, follow_redirects=True, timeout=30)
            assert answer.status_code == 200 and "voice-mcp is authorized" in answer.text
    _, err = proc.communicate(timeout=60)
    return proc.returncode, "".join(lines), err


@pytest.fixture
def logged_in(env: dict[str, str], oauth_server: Callable[..., str]) -> Iterator[Callable[..., str]]:
    """Add an OAuth server through the CLI and log in; returns its base URL."""

    def make(name: str = "hosted", *server_args: str) -> str:
        base = oauth_server(*server_args)
        added = run_cli(env, "servers", "add", name, "--url", f"{base}/mcp")
        assert added.returncode == 0, added.stderr
        code, out, err = login(env, name)
        assert code == 0, out + err
        return base

    yield make


# -- the vault ----------------------------------------------------------------------------------------------------


def test_sealed_values_open_only_for_their_purpose_and_with_a_key_in_the_list() -> None:
    old, new = new_key(), new_key()
    sealed = Vault([old]).seal("s1/tokens", {"access_token": "at-1"})
    assert b"at-1" not in sealed
    assert Vault([new, old]).open("s1/tokens", sealed) == {"access_token": "at-1"}  # rotation: old still opens
    with pytest.raises(VaultError, match="another server"):
        Vault([old]).open("s2/tokens", sealed)  # a row copied onto another server's
    with pytest.raises(VaultError, match="does not open"):
        Vault([new]).open("s1/tokens", sealed)
    with pytest.raises(VaultError, match="Fernet keys"):
        Vault(["not a key"])


# -- the CLI as a person uses it ------------------------------------------------------------------------------------


def test_add_detects_oauth_login_stores_sealed_tokens_and_calls_work(
    env: dict[str, str], oauth_server: Callable[..., str], pg_url: str
) -> None:
    base = oauth_server()
    added = run_cli(env, "servers", "add", "hosted", "--url", f"{base}/mcp")
    assert added.returncode == 0, added.stderr
    assert f"asks for OAuth (authorization server {base})" in added.stdout
    assert "servers login hosted" in added.stdout

    before = run_cli(env, "tools", "--server", "hosted")
    assert before.returncode == 1 and "needs a login" in before.stderr and "Traceback" not in before.stderr

    code, out, err = login(env, "hosted")
    assert code == 0, out + err
    assert "logged in to hosted: scopes 'mcp:tools'" in out and f"authorization server {base}" in out
    assert err == ""

    called = run_cli(env, "call", "whoami", "--server", "hosted")
    assert called.returncode == 0 and called.stdout.strip() == "ada@example.com", called.stderr
    listed = run_cli(env, "servers", "list")
    assert "oauth: token" in listed.stdout and "left" in listed.stdout

    with psycopg.connect(pg_url) as conn:
        sealed = conn.execute("SELECT tokens, client FROM mcp_oauth").fetchone()
    assert sealed is not None and sealed[0].startswith(b"gAAAA") and sealed[1].startswith(b"gAAAA")
    # The tokens the server issued are in the row only sealed. (Not a search for their "at-" prefix: Fernet's
    # base64 holds those three characters by chance, as one CI run found.)
    token = Vault([env["VOICE_MCP_SECRET_KEY"]]).open("hosted/tokens", sealed[0])
    issued = [token["access_token"], token["refresh_token"]]
    assert all(t.startswith(("at-", "rt-")) and t.encode() not in sealed[0] for t in issued), issued

    out_ = run_cli(env, "servers", "logout", "hosted")
    assert out_.returncode == 0 and "logged out of hosted" in out_.stdout
    after = run_cli(env, "call", "whoami", "--server", "hosted")
    assert after.returncode == 1 and "needs a login" in after.stderr


def test_without_the_key_the_cli_says_how_to_make_one(env: dict[str, str], oauth_server: Callable[..., str]) -> None:
    base = oauth_server()
    assert run_cli(env, "servers", "add", "hosted", "--url", f"{base}/mcp").returncode == 0
    keyless = {k: v for k, v in env.items() if k != "VOICE_MCP_SECRET_KEY"}
    code = run_cli(keyless, "servers", "login", "hosted", "--no-browser")
    assert code.returncode == 1
    assert "set VOICE_MCP_SECRET_KEY" in code.stderr and "secret-key" in code.stderr
    made = run_cli(keyless, "secret-key")
    assert made.returncode == 0 and Vault([made.stdout.strip()])


def test_oauth_settings_are_checked_at_the_door(env: dict[str, str]) -> None:
    url = ("--url", "https://mcp.example.com/mcp")
    cases = {
        ("--oauth-client-secret", "s3cret-literal"): "must be an env:NAME reference",
        ("--oauth-grant", "client_credentials"): "needs: client id, client secret",
        ("--oauth-client-metadata-url", "http://x/doc"): "https:// with a path",
        ("--oauth-scope", 'a"b'): "not a valid OAuth scope",
    }
    for flags, message in cases.items():
        done = run_cli(env, "servers", "add", "x", *url, *flags)
        assert done.returncode == 1 and message in done.stderr, (flags, done.stderr)
    stdio = run_cli(env, "servers", "add", "x", "--auth", "oauth", "--", "npx", "server")
    assert stdio.returncode == 1 and "OAuth is for HTTP servers" in stdio.stderr
    assert "x " not in run_cli(env, "servers", "list").stdout


# -- step-up -----------------------------------------------------------------------------------------------------


def test_step_up_for_a_person_marks_needs_login_with_the_scope_and_the_next_login_grants_it(
    env: dict[str, str], logged_in: Callable[..., str]
) -> None:
    """`admin_report` needs `mcp:admin`, which the first login did not ask for: the server's 403
    insufficient_scope cannot be answered without a person, so the call fails naming the scope, the server is
    marked needs_login with it, and the next `servers login` asks for both scopes (registering the client anew,
    since the authorization server holds clients to their registered scope)."""
    base = logged_in("hosted")
    assert run_cli(env, "call", "whoami", "--server", "hosted").returncode == 0
    stepped = run_cli(env, "call", "admin_report", "--server", "hosted")
    assert stepped.returncode == 1
    assert "needs a login with scope 'mcp:tools mcp:admin'" in stepped.stderr, stepped.stderr
    assert "oauth: needs login (scope mcp:tools mcp:admin)" in run_cli(env, "servers", "list").stdout
    # The tokens still serve what they were granted for.
    assert run_cli(env, "call", "whoami", "--server", "hosted").returncode == 0

    code, out, err = login(env, "hosted")
    assert code == 0, out + err
    assert "scopes 'mcp:tools mcp:admin'" in out
    done = run_cli(env, "call", "admin_report", "--server", "hosted")
    assert done.returncode == 0 and "3 open incidents" in done.stdout, done.stderr
    stats = httpx.get(f"{base}/stats").json()
    assert stats["registrations"] == 2 and stats["logins"] == 2


def test_a_login_the_person_denies_keeps_the_tokens_the_fleet_had(
    env: dict[str, str], logged_in: Callable[..., str]
) -> None:
    logged_in("hosted")
    assert run_cli(env, "call", "admin_report", "--server", "hosted").returncode == 1  # marked needs_login
    cmd = [sys.executable, "-m", "mcp_integration", "servers", "login", "hosted", "--no-browser"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        address = line.strip()
        if address.startswith("http") and "response_type=code" in address:
            # The person presses "Deny": the authorization server redirects with an error instead of a code.
            redirect = httpx.get(address, follow_redirects=False, timeout=30).headers["location"]
            callback = redirect.split("?", 1)[0] + "?" + urlencode({"error": "access_denied", "state": "x"})
            assert httpx.get(callback, timeout=30).status_code == 400
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "refused: access_denied" in err, err
    assert run_cli(env, "call", "whoami", "--server", "hosted").returncode == 0
    assert "oauth: needs login (scope mcp:tools mcp:admin)" in run_cli(env, "servers", "list").stdout


def test_step_up_with_client_credentials_reauthorises_by_itself(
    env: dict[str, str], oauth_server: Callable[..., str]
) -> None:
    base = oauth_server("--client", "voice-agent:cc-s3cret-value")
    env = {**env, "CC_SECRET": "cc-s3cret-value"}
    added = run_cli(
        env,
        *("servers", "add", "machine", "--url", f"{base}/mcp", "--auth", "oauth"),
        *("--oauth-grant", "client_credentials", "--oauth-client-id", "voice-agent"),
        *("--oauth-client-secret", "env:CC_SECRET"),
    )
    assert added.returncode == 0 and "no login needed" in added.stdout, added.stderr
    assert run_cli(env, "call", "whoami", "--server", "machine").returncode == 0
    done = run_cli(env, "call", "admin_report", "--server", "machine")
    assert done.returncode == 0 and "3 open incidents" in done.stdout, done.stderr
    stats = httpx.get(f"{base}/stats").json()
    assert stats["step_up_403"] == 1 and stats["client_credentials"] == 2, stats
    assert stats.get("client_credentials_refused", 0) == 0
    listed = run_cli(env, "servers", "list")
    assert "needs login" not in listed.stdout and "cc-s3cret-value" not in listed.stdout + done.stderr


# -- workers ------------------------------------------------------------------------------------------------------


def _workers(env: dict[str, str], n: int, seconds: float) -> list[dict[str, Any]]:
    start_at = time.time() + 3
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--server", "hosted", "--seconds", str(seconds), "--start-at", str(start_at)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_workers_sharing_the_registry_refresh_once_per_expiry_and_never_fail(
    env: dict[str, str], logged_in: Callable[..., str]
) -> None:
    """Three processes, tokens living 3 s, calls every 0.2 s for 10 s: every expiry is refreshed by exactly one
    worker (the authorization server rotates refresh tokens and would revoke the whole family on a reuse), the
    others pick the new token up, and no call fails."""
    base = logged_in("hosted", "--token-ttl", "3")
    reports = _workers(env, 3, 10.0)
    stats = httpx.get(f"{base}/stats").json()
    failed = [f for r in reports for f in r["failed"]]
    assert failed == []
    assert sum(r["calls"] for r in reports) >= 60
    assert stats.get("refresh_reuse", 0) == 0 and stats.get("refresh_refused", 0) == 0
    ours = sum(r["refreshes"] for r in reports)
    assert ours == stats["refreshes"]
    # A 3 s token is refreshed in its last 0.6 s: about one refresh per 2.4 s over 10 s (plus the wait to start).
    assert 3 <= stats["refreshes"] <= 8, stats


async def test_a_refused_refresh_marks_needs_login_and_the_caller_hears_it(
    registry: Registry, env: dict[str, str], logged_in: Callable[..., str]
) -> None:
    logged_in("hosted", "--token-ttl", "2", "--no-refresh")
    settings = Settings.from_env(dotenv=False)
    cfg = await registry.get_server("hosted")
    assert cfg is not None
    async with open_runtime(registry, settings, servers=[cfg], wait=True) as rt:
        assert (await rt.dispatcher.call("whoami", {}, server="hosted", timeout=10)).text == "ada@example.com"
        await asyncio.sleep(2.5)  # the token has expired; the authorization server will not refresh it
        with pytest.raises(ToolCallError) as failed:
            await rt.dispatcher.call("whoami", {}, server="hosted", timeout=10)
        assert failed.value.kind == "needs_login"
        assert "servers login hosted" in failed.value.reason
        assert "sign" in error_sentence(failed.value) and "hosted" in error_sentence(failed.value).lower()
        reports = await rt.health.check("hosted")
        assert reports["hosted"].status == "needs_login"
    state = await OAuthStore(registry, Vault.from_setting(settings.secret_key)).state("hosted")
    assert state is not None and state.needs_login and "refused the refresh token" in (state.reason or "")
    listed = run_cli(env, "servers", "list")
    assert "oauth: needs login" in listed.stdout
    async with services(registry, check_interval_s=60) as svc:
        app = build_app(svc, token=None, bind_host="127.0.0.1")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            page = (await http.get("/")).text
    assert 'data-server="hosted" data-health="needs_login"' in page
    assert '<span class="badge needs_login">needs_login</span>' in page and "servers login hosted" in page

    # A person logs in again: the mark goes, calls work.
    code, out, err = login(env, "hosted")
    assert code == 0, out + err
    assert "oauth: token" in run_cli(env, "servers", "list").stdout


async def test_a_worker_never_prompts(registry: Registry, oauth_server: Callable[..., str], key: str) -> None:
    base = oauth_server()
    cfg = ServerConfig(
        name="fresh", transport="streamable-http", url=f"{base}/mcp", auth="oauth", oauth=OAuthSettings()
    )
    await registry.add_server(cfg)
    async with open_runtime(registry, Settings.from_env(dotenv=False), servers=[cfg], wait=True) as rt:
        state = rt.dispatcher.servers["fresh"]
        assert state.error is not None and "needs a login (not logged in yet)" in state.error
        with pytest.raises(NeedsLogin):
            await state.conn.open(force=True)
    async with httpx.AsyncClient() as http:
        stats = (await http.get(f"{base}/stats")).json()
    assert stats.get("registrations", 0) == 0  # no client registered by a worker that cannot finish a login


# -- nothing leaks -----------------------------------------------------------------------------------------------


async def test_no_token_leaves_by_any_path(
    registry: Registry,
    env: dict[str, str],
    logged_in: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
    pg_url: str,
) -> None:
    """After a login, calls, refreshes and a refused refresh: the access and refresh tokens, the client secret
    the server minted and the authorization code appear in no log record, CLI output, `servers list --json`,
    `jobs --json`, mcp_jobs row, status page or /metrics."""
    caplog.set_level(logging.DEBUG)
    logged_in("hosted", "--token-ttl", "2")
    settings = Settings.from_env(dotenv=False)
    store = OAuthStore(registry, Vault.from_setting(settings.secret_key))
    seen: list[str] = []
    cfg = await registry.get_server("hosted")
    assert cfg is not None
    async with open_runtime(registry, settings, servers=[cfg], wait=True) as rt:
        for _ in range(3):
            await rt.dispatcher.call("whoami", {}, server="hosted", timeout=10)
            stored = await store.tokens("hosted")
            assert stored is not None
            seen += [stored.token["access_token"], stored.token["refresh_token"]]
            await asyncio.sleep(1.8)
    client = await store.client("hosted")
    secrets_ = {s for s in seen if s} | ({client["client_secret"]} if client and client.get("client_secret") else set())
    assert len(secrets_) >= 4

    outputs = [
        run_cli(env, "servers", "list", "--json").stdout,
        run_cli(env, "servers", "list").stdout,
        run_cli(env, "jobs", "--json").stdout,
        run_cli(env, "-v", "call", "whoami", "--server", "hosted").stderr,
    ]
    with psycopg.connect(pg_url) as conn:
        outputs += [json.dumps(row, default=str) for row in conn.execute("SELECT * FROM mcp_jobs").fetchall()]
        outputs += [repr(row) for row in conn.execute("SELECT * FROM mcp_oauth").fetchall()]
    async with services(registry, check_interval_s=60) as svc:
        app = build_app(svc, token=None, bind_host="127.0.0.1")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            outputs += [(await http.get("/")).text, (await http.get("/metrics")).text]
    outputs += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    leaks = [s[:8] for s in secrets_ if any(s in text for text in outputs)]
    assert leaks == []
