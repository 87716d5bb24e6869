"""One worker process of a fleet sharing one registry: it calls an OAuth server's tool for a while and reports.

    DATABASE_URL=... VOICE_MCP_SECRET_KEY=... python tests/oauth_worker.py --server NAME --seconds 10

Opens the registry and the runtime as the voice worker does (`open_runtime`), so its tokens come from, and its
refreshes go to, the shared `mcp_oauth` row. Calls `whoami` every `--interval` seconds; prints one JSON line:
calls made, failed (and why), refreshes this process performed, and each call's latency, marked when the call
was the one that refreshed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcp_integration.config import Settings
from mcp_integration.errors import ToolCallError
from mcp_integration.registry import Registry
from mcp_integration.runtime import open_runtime


async def work(server: str, seconds: float, interval: float, start_at: float) -> dict[str, object]:
    settings = Settings.from_env(dotenv=False)
    assert settings.database_url
    registry = await Registry.open(settings.database_url, max_size=4)
    out: dict[str, object] = {"calls": 0, "failed": [], "latency_ms": [], "refresh_latency_ms": []}
    try:
        cfg = await registry.get_server(server)
        assert cfg is not None
        async with open_runtime(registry, settings, servers=[cfg], wait=True) as rt:
            assert rt.oauth is not None
            provider = rt.oauth.auth_for(cfg)
            # Every worker starts calling at the same moment, so their refreshes are due together.
            await asyncio.sleep(max(0.0, start_at - time.time()))
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                before = getattr(provider, "refreshes", 0)
                began = time.perf_counter()
                try:
                    result = await rt.dispatcher.call("whoami", {}, server=server, timeout=30)
                    assert "ada@example.com" in result.text
                except ToolCallError as exc:
                    out["failed"].append(f"{exc.kind}: {exc.reason}")  # type: ignore[union-attr]
                took = (time.perf_counter() - began) * 1000
                refreshed = getattr(provider, "refreshes", 0) > before
                out["refresh_latency_ms" if refreshed else "latency_ms"].append(round(took, 2))  # type: ignore[union-attr]
                out["calls"] = int(out["calls"]) + 1  # type: ignore[call-overload]
                await asyncio.sleep(interval)
            out["refreshes"] = getattr(provider, "refreshes", 0)
    finally:
        await registry.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--start-at", type=float, default=0.0, help="epoch seconds: begin calling then")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(work(args.server, args.seconds, args.interval, args.start_at))), flush=True)


if __name__ == "__main__":
    main()
