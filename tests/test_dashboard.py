"""The status page against real MCP servers and a real PostgreSQL, in a real browser (Debian's chromium driven by
Playwright), plus its HTTP surface: token, same-origin actions, the shared live feed, /healthz and /metrics."""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import psycopg
import pytest
from conftest import ROOT, SERVERS, stdio_demo
from playwright.async_api import Page, async_playwright
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from starlette.applications import Starlette

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.web import BindingError, Services, build_app, check_binding, listening, services
from mcp_integration.web.guard import COOKIE
from mcp_integration.web.views import safe_target, scrub

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
assert os.path.exists(CHROMIUM), "chromium is missing: apt-get install -y chromium chromium-driver"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
TOKEN = "t0ken-" + uuid.uuid4().hex
# Values that must never reach the page: a literal header, a literal env value, what an env: reference resolves
# to, and credentials in a URL.
SECRETS = ("hdr-s3cret-literal", "env-s3cret-literal", "resolved-s3cret-value", "url-s3cret-pass", "qs-s3cret-key")


@asynccontextmanager
async def dashboard(
    registry: Registry, *, token: str | None = None, check_interval_s: float = 0.5, period_s: float = 0.25
) -> AsyncIterator[tuple[str, Services, Starlette]]:
    async with services(registry, check_interval_s=check_interval_s) as svc:
        app = build_app(svc, token=token, bind_host="127.0.0.1", period_s=period_s, history_max_age_s=period_s)
        async with listening(app) as (url, _task):
            yield url, svc, app


@asynccontextmanager
async def browser_page() -> AsyncIterator[Page]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1500, "height": 900})
            yield await context.new_page()
        finally:
            await browser.close()


def http_server(port: int, name: str) -> ServerConfig:
    return ServerConfig(name=name, transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")


def secret_server() -> ServerConfig:
    """Registered disabled: only its row (and its secrets, which must not show) matters."""
    return ServerConfig(
        name="vault",
        transport="streamable-http",
        url="http://admin:url-s3cret-pass@127.0.0.1:9/mcp?api_key=qs-s3cret-key",
        headers={"Authorization": "Bearer hdr-s3cret-literal", "X-Ref": "env:DASH_TEST_SECRET"},
        env={"TOKEN": "env-s3cret-literal"},
        enabled=False,
    )


async def wait_for(check: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await _call(check):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def _call(check: Callable[[], object]) -> object:
    value = check()
    return await value if asyncio.iscoroutine(value) else value


async def test_page_follows_servers_and_jobs_live_and_acts_on_postgres(
    registry: Registry, spawn: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASH_TEST_SECRET", "resolved-s3cret-value")
    port = spawn("--transport", "streamable-http", "--port", "0", "--name", "alpha")
    for cfg in (http_server(port, "alpha"), stdio_demo("beta"), secret_server()):
        await registry.add_server(cfg)
    agent = Dispatcher(registry)  # another process, as far as the page knows: it sees jobs through mcp_jobs
    await agent.start()
    try:
        async with dashboard(registry) as (url, _svc, _app), browser_page() as page:
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
            page.on(
                "console",
                lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
            )
            navigations: list[str] = []
            response = await page.goto(url)
            assert response is not None and response.status == 200
            page.on("framenavigated", lambda frame: navigations.append(frame.url))
            await page.evaluate("window.loadedOnce = 'still the same page'")

            await page.wait_for_selector("#live[data-state='on']")
            await page.wait_for_selector("#server-alpha[data-health='up']")
            await page.wait_for_selector("#server-beta[data-health='up']")
            alpha = page.locator("#server-alpha")
            assert await alpha.locator("td.tools").inner_text() == "5"
            assert await alpha.locator("td.discovered time").count() == 1
            assert await alpha.locator("svg.spark").get_attribute("aria-label") != "alpha: no checks in the last hour"
            assert await page.locator("#server-vault").get_attribute("data-enabled") == "no"

            # Jobs run elsewhere appear as they go: a slow one working, then completed.
            job = agent.submit("slow", {"seconds": 1.5}, server="alpha")
            row = f"#jobs-body tr[data-job='{job.id}']"
            await page.wait_for_selector(f"{row}[data-state='working']")
            await job.wait(10)
            await job.settled()
            await page.wait_for_selector(f"{row}[data-state='completed']")
            assert await page.locator(row).locator("td").nth(2).inner_text() == "slow"
            assert await page.locator(row).locator("td").nth(4).inner_text() == "plain"

            # The server's process dies: the row turns down with no reload.
            spawn.procs[0].kill()  # type: ignore[attr-defined]
            await page.wait_for_selector("#server-alpha[data-health='down']", timeout=20_000)
            assert int(await alpha.locator("td.failures").inner_text()) >= 3
            assert await alpha.locator("td.error").inner_text() != "—"

            # Actions: a check now reports the dead server; disabling beta reaches Postgres.
            await alpha.locator("button[data-action='check']").click()
            await page.wait_for_selector("#notice:not([hidden])")
            assert (await page.locator("#notice").inner_text()).startswith("alpha: down")
            await page.locator("#server-beta button[data-action='disable']").click()
            await page.wait_for_selector("#server-beta[data-enabled='no']")
            beta = await registry.get_server("beta")
            assert beta is not None and beta.enabled is False
            await page.locator("#server-beta button[data-action='enable']").click()
            await page.wait_for_selector("#server-beta[data-enabled='yes']")
            beta = await registry.get_server("beta")
            assert beta is not None and beta.enabled is True

            assert await page.evaluate("window.loadedOnce") == "still the same page"
            assert navigations == []
            assert problems == []
            html = await page.content()
            for secret in SECRETS:
                assert secret not in html
            assert "http://***@127.0.0.1:9/mcp?api_key=***" in html  # the target, stripped of its credentials
    finally:
        await agent.aclose()


def start_cli_dashboard(pg_url: str, *extra: str, token: str | None) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if k != "DASHBOARD_TOKEN"}
    env["DATABASE_URL"] = pg_url
    if token is not None:
        env["DASHBOARD_TOKEN"] = token
    cmd = [sys.executable, "-m", "mcp_integration", "dashboard", "--port", "0", "--check-interval", "0.5", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stderr.readline() if ready else ""
        found = re.search(r"dashboard on http://\S+:(\d+)", line)
        if found:
            return proc, int(found.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the dashboard did not start: {proc.stderr.read()}")


def stop_cli(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stderr is not None
        proc.stderr.close()


async def test_off_loopback_needs_the_token_on_every_request(registry: Registry, pg_url: str) -> None:
    await registry.add_server(stdio_demo("beta"))
    proc, port = start_cli_dashboard(pg_url, "--host", "0.0.0.0", token=TOKEN)
    base = f"http://127.0.0.1:{port}"
    try:
        async with browser_page() as page:
            refused = await page.goto(f"{base}/")
            assert refused is not None and refused.status == 401
            assert "DASHBOARD_TOKEN" in await page.inner_text("body")
            wrong = await page.goto(f"{base}/?token=not-the-token-at-all")
            assert wrong is not None and wrong.status == 401

            opened = await page.goto(f"{base}/?token={TOKEN}")
            assert opened is not None and opened.status == 200
            assert page.url == f"{base}/"  # the token left the address bar
            cookies = await page.context.cookies()
            assert [(c["name"], c["httpOnly"]) for c in cookies] == [(COOKIE, True)]
            assert TOKEN not in cookies[0]["value"]
            await page.wait_for_selector("#live[data-state='on']")  # the live feed passed the check too
            await page.wait_for_selector("#server-beta[data-health='up']")
            await page.locator("#server-beta button[data-action='disable']").click()
            await page.wait_for_selector("#server-beta[data-enabled='no']")
            beta = await registry.get_server("beta")
            assert beta is not None and beta.enabled is False

        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for method, path in (("GET", "/"), ("GET", "/events"), ("GET", "/healthz"), ("GET", "/metrics")):
                assert (await http.request(method, path)).status_code == 401, path
            action = await http.post("/servers/beta/enable", headers={"Origin": base})
            assert action.status_code == 401
            assert (await http.get("/static/dashboard.js")).status_code == 401
            assert (await http.get("/healthz", headers={"Authorization": "Bearer wrong"})).status_code == 401
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            # The token is accepted: 200 once the database ping answers (within its 2 s; on a machine busy with
            # other tests a ping can miss that, so this waits for "ok" rather than take the first answer).
            await wait_for(lambda: _status(http, "/healthz", 200, headers=bearer))
            assert (await http.get("/healthz", headers=bearer)).json()["status"] == "ok"
            enabled = await http.post("/servers/beta/enable", headers=bearer)
            assert enabled.status_code == 200 and enabled.json()["enabled"] is True
            # A cookie alone does not make a cross-site form post an action.
            http.cookies.set(COOKIE, (await http.get(f"/?token={TOKEN}")).cookies[COOKIE])
            assert (await http.get("/")).status_code == 200
            forged = await http.post("/servers/beta/disable", headers={"Origin": "http://evil.test"})
            assert forged.status_code == 403
        beta = await registry.get_server("beta")
        assert beta is not None and beta.enabled is True
    finally:
        assert stop_cli(proc) == 0  # SIGINT: a clean shutdown, exit code 0


def test_binding_off_loopback_without_a_token_is_refused(pg_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DASHBOARD_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "mcp_integration", "dashboard", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "DATABASE_URL": pg_url},
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: binding the dashboard to 0.0.0.0 needs a token: set DASHBOARD_TOKEN")
    assert len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(BindingError, match="DASHBOARD_TOKEN is too short"):
        check_binding("0.0.0.0", "short")
    for host in ("127.0.0.1", "localhost", "::1"):
        check_binding(host, None)
    for host in ("0.0.0.0", "192.168.1.10", "::", "dashboard.example.com"):
        with pytest.raises(BindingError):
            check_binding(host, None)


async def test_loopback_page_refuses_foreign_hosts_and_cross_site_actions(registry: Registry) -> None:
    await registry.add_server(stdio_demo("beta"))
    await registry.add_server(secret_server())
    async with dashboard(registry, check_interval_s=60) as (url, _svc, _app), httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(url)).status_code == 200
        # A DNS-rebinding page reaches 127.0.0.1 under its own name: refused.
        assert (await http.get(url, headers={"Host": "evil.test"})).status_code == 403
        origin = {"Origin": url}
        assert (await http.post(f"{url}/servers/beta/disable")).status_code == 403
        assert (
            await http.post(f"{url}/servers/beta/disable", headers={"Origin": "http://evil.test"})
        ).status_code == 403
        assert (await http.post(f"{url}/servers/nope/disable", headers=origin)).status_code == 404
        assert (await http.post(f"{url}/servers/beta/explode", headers=origin)).status_code == 404
        refused = await http.post(f"{url}/servers/vault/check", headers=origin)
        assert refused.status_code == 409 and "disabled" in refused.json()["message"]
        checked = await http.post(f"{url}/servers/beta/check", headers=origin)
        assert checked.status_code == 200 and checked.json()["ok"] is True
        assert checked.json()["message"].startswith("beta: up")
        beta = await registry.get_server("beta")
        assert beta is not None and beta.enabled is True
        page = await http.get(url)
        for header in ("content-security-policy", "x-content-type-options", "x-frame-options"):
            assert header in page.headers


async def read_events(http: httpx.AsyncClient, url: str, got: list[str], stop: asyncio.Event) -> None:
    async with http.stream("GET", f"{url}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                got.append(line[7:])
            if stop.is_set():
                return


async def test_ten_pages_share_one_change_detector(registry: Registry) -> None:
    await registry.add_server(stdio_demo("beta"))
    async with dashboard(registry, check_interval_s=3600) as (url, svc, app), httpx.AsyncClient(timeout=30) as http:
        feed = app.state.feed
        await wait_for(lambda: "beta" in svc.dispatcher.servers and svc.monitor.rounds >= 1)
        streams: list[list[str]] = [[] for _ in range(10)]
        stop = asyncio.Event()
        readers = [asyncio.create_task(read_events(http, url, got, stop)) for got in streams]
        try:
            await wait_for(lambda: all({"servers", "jobs", "status"} <= set(got) for got in streams))
            assert feed.listeners == 10
            # Settle: wait until nothing has been rebuilt for a while (the monitor's first records, cache writes).
            quiet_since, builds = time.monotonic(), feed.builds
            while time.monotonic() - quiet_since < 1.5:
                await asyncio.sleep(0.1)
                if feed.builds != builds:
                    quiet_since, builds = time.monotonic(), feed.builds
            before = [got.count("servers") for got in streams]
            await registry.add_server(ServerConfig(name="gamma", transport="stdio", command="gamma", enabled=False))
            await wait_for(lambda: all(got.count("servers") > n for got, n in zip(streams, before, strict=True)))
            # One change, one rebuild (two if a late write of this process lands too), ten deliveries of the
            # same text; a rebuild per page would be ten.
            assert 1 <= feed.builds - builds <= 2
        finally:
            stop.set()
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        await wait_for(lambda: feed.listeners == 0)


@asynccontextmanager
async def own_database(pg_base_url: str) -> AsyncIterator[tuple[str, str]]:
    """A database of its own, so this test can refuse connections to it without touching the others'."""
    name = f"dash_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_base_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(pg_base_url)
    params["dbname"] = name
    try:
        yield make_conninfo(**params), name
    finally:
        with psycopg.connect(pg_base_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_healthz_follows_the_database_and_the_monitor_and_metrics_render(pg_base_url: str) -> None:
    async with own_database(pg_base_url) as (url, name):
        registry = await Registry.open(url)
        try:
            await registry.migrate()
            await registry.add_server(stdio_demo("beta"))
            agent = Dispatcher(registry)
            await agent.start()
            job = agent.submit("echo", {"text": "hi"})
            await job.wait(10)
            await job.settled()
            await agent.aclose()
            async with dashboard(registry) as (base, svc, _app), httpx.AsyncClient(base_url=base, timeout=15) as http:
                await wait_for(lambda: _status(http, "/healthz", 200))  # its ping has 2 s: a busy machine can miss it
                ok = await http.get("/healthz")
                assert ok.status_code == 200 and ok.json() == {
                    "status": "ok",
                    "database": "reachable",
                    "monitor": "running",
                }
                await wait_for(lambda: svc.monitor.rounds >= 1)
                metrics = await http.get("/metrics")
                assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
                assert 'voice_mcp_recorded_jobs{kind="plain",server="beta",state="completed",tool="echo"} 1.0' in (
                    metrics.text
                )
                assert 'voice_mcp_server_status{server="beta",status="up"} 1.0' in metrics.text

                with psycopg.connect(pg_base_url, autocommit=True) as admin:
                    admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
                    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
                try:
                    down = await http.get("/healthz")
                    assert down.status_code == 503 and down.json()["database"] == "unreachable"
                    assert (await http.get("/")).status_code == 503
                finally:
                    with psycopg.connect(pg_base_url, autocommit=True) as admin:
                        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
                await wait_for(lambda: _status(http, "/healthz", 200), timeout=30)

                await svc.monitor.aclose()
                stopped = await http.get("/healthz")
                assert stopped.status_code == 503 and stopped.json()["monitor"] == "stopped"
        finally:
            await registry.close()


async def _status(http: httpx.AsyncClient, path: str, expected: int, headers: dict[str, str] | None = None) -> bool:
    return (await http.get(path, headers=headers)).status_code == expected


def test_targets_and_errors_lose_their_secrets() -> None:
    assert safe_target("streamable-http", "https://u:pw@api.example.com:8443/mcp?key=abc#x", None) == (
        "https://***@api.example.com:8443/mcp?key=***"
    )
    assert safe_target("stdio", None, "/usr/bin/node") == "node"
    text = "401 from https://h/mcp?api_key=abcd1234: Bearer zzzz9999 refused, password=hunter22"
    assert scrub(text, ["abcd1234"]) == "401 from https://h/mcp?api_key=***: Bearer *** refused, password=***"
    assert scrub("token expired", []) == "token expired"
    assert len(scrub("x" * 1000, [])) == 300


async def test_a_server_refusing_our_credentials_says_so_on_the_page(
    registry: Registry, spawn: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGE_GOOD_TOKEN", "pg-good-" + uuid.uuid4().hex)
    monkeypatch.setenv("PAGE_BAD_TOKEN", "pg-bad-" + uuid.uuid4().hex)
    port = spawn("--port", "0", "--token-env", "PAGE_GOOD_TOKEN", script=str(SERVERS / "auth_server.py"))
    cfg = ServerConfig(
        name="locked", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp",
        headers={"Authorization": "env:PAGE_BAD_TOKEN"},
    )  # fmt: skip
    await registry.add_server(cfg)
    async with dashboard(registry, check_interval_s=60) as (url, svc, _app), httpx.AsyncClient(timeout=10) as http:
        report = (await svc.monitor.check_now("locked"))["locked"]
        assert not report.ok and "needs authorization (HTTP 401)" in (report.error or "")
        page = (await http.get(url)).text
    assert "needs authorization (HTTP 401)" in page
    assert "pg-bad-" not in page
