"""One process of a voice fleet: several sessions on one registry, as a LiveKit job process runs them.

    python tests/fleet_worker.py --conninfo URL --sessions 25 --interval 2 [--relay PATH] [--no-lease]

Each session is what agent.py opens per call: a runtime (dispatcher, health, registry watcher, health monitor)
from the registry's servers, sharing the process's registry pool and its `Fleet` (signals and health leases), or,
with --no-lease, the way sessions ran before the fleet shared its work (each its own LISTEN connection and its
own monitor checking every server: the baseline). The pool is sized as agent.py sizes it (DB_POOL_MAX,
DB_POOL_IDLE_S from the environment).

Prints `READY <pid>` once every session is up. Then reads commands on stdin, answering each with one JSON line:
`stats` (health checks made per server by this process, each session's breaker status per server, CPU seconds
used, sessions) and `quit` (closes everything, answers, exits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcp_integration.config import Settings
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.fleet import Fleet
from mcp_integration.health import Health, HealthMonitor, HealthReport
from mcp_integration.registry import Registry
from mcp_integration.registry_watch import RegistryWatcher
from mcp_integration.runtime import open_runtime


class FleetProcess:
    """A running fleet_worker.py, driven from a test or a benchmark."""

    def __init__(
        self,
        conninfo: str,
        sessions: int,
        relay: Path | None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        ready_s: float = 60,
    ) -> None:
        cmd = [sys.executable, __file__, "--conninfo", conninfo, "--sessions", str(sessions), *args]
        if relay is not None:
            cmd += ["--relay", str(relay)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        line = self._line(ready_s)
        assert line.startswith("READY "), f"worker did not start: {line!r}"
        self.pid = int(line.split()[1])

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"worker {self.proc.pid} said nothing within {timeout:g} s")
        return self.proc.stdout.readline().strip()

    def ask(self, command: str = "stats") -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line(30))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit")
            except (AssertionError, OSError, ValueError):
                pass
        if self.proc.poll() is None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def old_session(stack: AsyncExitStack, registry: Registry, interval: float) -> Health:
    """A session as before leases: its own LISTEN connection, its own monitor of every server."""
    dispatcher = Dispatcher(registry)
    stack.push_async_callback(dispatcher.aclose)
    health = Health(dispatcher, record_every_check=False)
    stack.push_async_callback(health.aclose)
    await dispatcher.start(wait=False)
    watcher = RegistryWatcher(registry, dispatcher).start()
    stack.push_async_callback(watcher.aclose)
    monitor = HealthMonitor(health, interval_s=interval).start()
    stack.push_async_callback(monitor.aclose)
    return health


async def main(args: argparse.Namespace) -> None:
    settings = Settings.from_env(dotenv=False)
    if args.relay:
        os.environ["VOICE_MCP_RELAY"] = args.relay
        settings = Settings.from_env(dotenv=False)
    checks: Counter[str] = Counter()

    def counted(report: HealthReport) -> None:
        if report.source == "check":
            checks[report.server] += 1

    if args.no_lease:
        registry = await Registry.open(args.conninfo)  # the pool agent.py opened before: 1 to 10 connections
    else:
        registry = await Registry.open(
            args.conninfo, min_size=0, max_size=settings.db_pool_max, max_idle=settings.db_pool_idle_s
        )
    healths: list[Health] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(registry.close)
        fleet = None
        if not args.no_lease:
            fleet = Fleet.open(registry, settings)
            stack.push_async_callback(fleet.aclose)
        for _ in range(args.sessions):
            if fleet is None:
                health = await old_session(stack, registry, args.interval)
            else:
                rt = await stack.enter_async_context(
                    open_runtime(
                        registry, settings, watch=True, monitor=True, check_interval_s=args.interval, fleet=fleet
                    )
                )
                health = rt.health
            health.observers.append(counted)
            healths.append(health)
        print(f"READY {os.getpid()}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            out: dict[str, Any] = {"pid": os.getpid(), "at": time.time(), "cpu_s": cpu_s(), "sessions": len(healths)}
            out["checks"] = dict(checks)
            out["breakers"] = [{name: h.breaker(name).status for name in h.dispatcher.servers} for h in healths]
            if line == "quit":
                break
            print(json.dumps(out), flush=True)
    print(json.dumps({"pid": os.getpid(), "closed": True}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--conninfo", required=True)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--relay")
    parser.add_argument("--no-lease", action="store_true")
    asyncio.run(main(parser.parse_args()))
