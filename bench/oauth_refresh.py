"""OAuth refresh benchmark: a fleet of workers shares one registry's tokens, which expire every few seconds.

    python bench/oauth_refresh.py [--processes 8] [--ttl 4] [--seconds 60] [--interval 0.2]

An authorization server and a protected MCP server (tests/servers/oauth_server.py, built on the `mcp` SDK's
auth server) issue access tokens living --ttl seconds and rotate refresh tokens: presenting a refresh token twice
revokes the whole family, as OAuth 2.1 asks, so two workers refreshing the same expiry would log everyone out.
One headless login (the CLI's `servers login`, its browser step done by fetching the printed address) stores the
tokens; then --processes worker processes (tests/oauth_worker.py, each its own `open_runtime` as a LiveKit job
process has) call the server's `whoami` tool every --interval seconds for --seconds.

Printed:
- refreshes the authorization server performed, beside the token lifetimes that ended in the window (expected:
  one refresh per lifetime; a lifetime is --ttl less the refresh margin, since we refresh before expiry);
- refresh-token reuse detected and rejected access tokens (expected 0: no worker ever invalidates another);
- calls made and calls failed for auth (expected 0);
- the median latency of a call that refreshed, beside a plain call measured in the same run (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import bench_database, bench_registry, bench_schema, die_with_parent, spawn, stop  # noqa: E402

from mcp_integration.auth_config import OAuthSettings  # noqa: E402
from mcp_integration.oauth import refresh_margin  # noqa: E402
from mcp_integration.oauth_login import login  # noqa: E402
from mcp_integration.oauth_store import OAuthStore  # noqa: E402
from mcp_integration.registry import ServerConfig  # noqa: E402
from mcp_integration.vault import Vault, new_key  # noqa: E402

WORKER = ROOT / "tests" / "oauth_worker.py"


async def headless_login(cfg: ServerConfig, store: OAuthStore) -> None:
    """`servers login` with the person's part done as a browser would: open the address, follow the redirects
    to the loopback listener."""
    pending: list[asyncio.Task[httpx.Response]] = []

    async def browse(url: str) -> httpx.Response:
        async with httpx.AsyncClient(follow_redirects=True, timeout=30) as http:
            return await http.get(url)

    def announce(text: str) -> None:
        for line in text.split():
            if line.startswith("http") and "response_type=code" in line:
                pending.append(asyncio.get_running_loop().create_task(browse(line)))

    outcome = await login(cfg, store, announce, open_browser=False)
    for task in pending:
        answer = await task
        if answer.status_code != 200:
            raise RuntimeError(f"the authorization step answered {answer.status_code}")
    if outcome.state is None or not outcome.state.has_tokens:
        raise RuntimeError("login stored no tokens")


def run_workers(env: dict[str, str], n: int, seconds: float, interval: float) -> list[dict[str, object]]:
    start_at = time.time() + 4  # every worker connected before the first call, so their refreshes fall due together
    argv = ["--server", "hosted", "--seconds", str(seconds), "--interval", str(interval), "--start-at", str(start_at)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *argv],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )
        for _ in range(n)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"a worker failed (exit {proc.returncode}): {err.strip()[-2000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--ttl", type=int, default=4, help="access-token lifetime, seconds")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between one worker's calls")
    args = parser.parse_args()

    key = new_key()
    os.environ["VOICE_MCP_SECRET_KEY"] = key
    procs: list[subprocess.Popen[str]] = []
    try:
        port = spawn("oauth_server.py", ["--token-ttl", str(args.ttl)], procs)
        base = f"http://127.0.0.1:{port}"
        async with bench_database() as url, bench_schema(url) as conninfo, bench_registry(conninfo) as registry:
            cfg = await registry.add_server(
                ServerConfig(
                    name="hosted", transport="streamable-http", url=f"{base}/mcp", auth="oauth", oauth=OAuthSettings()
                )
            )
            began = time.perf_counter()
            await headless_login(cfg, OAuthStore(registry, Vault.from_setting(key)))
            print(f"login (dynamic registration, PKCE, loopback redirect): {time.perf_counter() - began:.2f} s")
            print(
                f"{args.processes} worker processes, tokens living {args.ttl} s, "
                f"a call every {args.interval} s each, for {args.seconds:.0f} s"
            )
            env = {**os.environ, "DATABASE_URL": conninfo, "VOICE_MCP_SECRET_KEY": key}
            logged_in = time.monotonic()
            reports = await asyncio.to_thread(run_workers, env, args.processes, args.seconds, args.interval)
            window = time.monotonic() - logged_in
            async with httpx.AsyncClient() as http:
                stats = (await http.get(f"{base}/stats")).json()
    finally:
        stop(procs)

    calls = sum(int(r["calls"]) for r in reports)  # type: ignore[call-overload]
    failed = [f for r in reports for f in r["failed"]]  # type: ignore[attr-defined]
    ours = sum(int(r["refreshes"]) for r in reports)  # type: ignore[call-overload]
    per_worker = sorted(int(r["refreshes"]) for r in reports)  # type: ignore[call-overload]
    plain = [x for r in reports for x in r["latency_ms"]]  # type: ignore[attr-defined]
    refreshing = [x for r in reports for x in r["refresh_latency_ms"]]  # type: ignore[attr-defined]
    # The window runs from the login's token to the last call (the workers' start-up included). Each token
    # serves from its issue to its refresh point, plus on average half a call interval until a call notices.
    lifetime = args.ttl - refresh_margin(args.ttl) + args.interval / 2
    expected = window / lifetime
    refreshes = int(stats.get("refreshes", 0))
    reuse = int(stats.get("refresh_reuse", 0))
    refused = int(stats.get("refresh_refused", 0))
    rejected = int(stats.get("rejected_tokens", 0))

    print()
    print(f"calls made: {calls}; failed: {len(failed)} (expected 0)")
    for reason in sorted(set(failed))[:5]:
        print(f"  {failed.count(reason)} x {reason}")
    print(
        f"refreshes at the authorization server: {refreshes}; token lifetimes in the {window:.1f} s window: "
        f"~{expected:.1f} (each {lifetime:.2f} s); ratio {refreshes / expected:.2f} (expected ~1.00)"
    )
    print(
        f"refreshes the workers performed: {ours} (per worker {per_worker}); same as the server's: {ours == refreshes}"
    )
    print(f"refresh-token reuse detected: {reuse}; refreshes refused: {refused}; access tokens rejected: {rejected}")
    if plain and refreshing:
        p50, r50 = statistics.median(plain), statistics.median(refreshing)
        print(
            f"call latency p50: plain {p50:.1f} ms (baseline, n={len(plain)}), "
            f"refreshing {r50:.1f} ms (n={len(refreshing)}); extra {r50 - p50:.1f} ms, ratio {r50 / p50:.2f}"
        )
    print()
    checks = [
        ("no call failed", not failed),
        ("one refresh per token lifetime (within 25%)", abs(refreshes / expected - 1) <= 0.25),
        ("every refresh counted by exactly one worker", ours == refreshes),
        ("no refresh-token reuse, no refused refresh, no rejected token", reuse == refused == rejected == 0),
    ]
    for name, ok in checks:
        print(f"{'MET' if ok else 'NOT MET'}: {name}")


if __name__ == "__main__":
    asyncio.run(main())
