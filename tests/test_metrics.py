"""Prometheus metrics after real jobs on real servers: parsed with prometheus_client's own parser and held
against what mcp_jobs and mcp_server_health recorded for the same jobs. Also across processes (the way a
LiveKit worker serves its job processes' metrics) and on the voice path (fillers, release, late answers)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, SERVERS, stdio_demo
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import ToolCallError
from mcp_integration.fillers import FillerPolicy
from mcp_integration.health import Health
from mcp_integration.jobs import Job
from mcp_integration.livekit_text import ScriptedLLM, TextCall
from mcp_integration.livekit_tools import VoiceOptions
from mcp_integration.metrics import HEALTH_STATES, Metrics
from mcp_integration.registry import Registry, ServerConfig

Labels = tuple[str, ...]


def parse(body: bytes) -> dict[str, dict[Labels, float]]:
    """Sample name -> {label values in label-name order: value}, through prometheus_client's parser."""
    out: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = tuple(v for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                key = (*key, s.labels["le"])
            out[s.name][key] = s.value
    return out


def by(sample: dict[Labels, float], *keep: int) -> dict[Labels, float]:
    """Sum a sample's values over the label positions not kept."""
    out: dict[Labels, float] = defaultdict(float)
    for labels, value in sample.items():
        out[tuple(labels[i] for i in keep)] += value
    return dict(out)


async def table(registry: Registry, sql: str) -> list[dict[str, Any]]:
    async with registry.pool.connection() as conn:
        return await (await conn.execute(sql)).fetchall()


async def job_counts(registry: Registry) -> dict[Labels, float]:
    # Label names sort as kind, server, state, tool: the parsed key order.
    rows = await table(
        registry, "SELECT kind, server_name, state, tool, count(*) AS n FROM mcp_jobs GROUP BY 1, 2, 3, 4"
    )
    return {(r["kind"], r["server_name"], r["state"], r["tool"]): float(r["n"]) for r in rows}


async def settle(*jobs: Job) -> None:
    """Each job done and its final row written (settled never raises, a failed job included)."""
    await asyncio.wait_for(asyncio.gather(*(job.settled() for job in jobs)), 20)


async def test_metrics_after_real_jobs_match_mcp_jobs(registry: Registry, spawn: Callable[..., int]) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "300", script=str(SERVERS / "generic_receipt_server.py"))
    cfgs = [
        stdio_demo(),
        ServerConfig(name="gen", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", poll_interval=100),
        ServerConfig(
            name="tasks", transport="stdio", command=sys.executable, args=[str(SERVERS / "task_server_2026.py")]
        ),
        ServerConfig(name="dead", transport="streamable-http", url="http://127.0.0.1:9/mcp"),
    ]
    for cfg in cfgs:
        await registry.add_server(cfg)
    d = Dispatcher(registry, connect_timeout=15)
    health = Health(d)
    metrics = Metrics(CollectorRegistry())
    metrics.attach(d, health)
    await d.start(wait=True)
    try:
        jobs = [d.submit("echo", {"text": str(i)}) for i in range(3)]
        jobs.append(d.submit("fail", {"reason": "no"}))
        jobs += [d.submit("submit_report", {"topic": t}) for t in ("a", "b")]
        jobs.append(d.submit("submit_report", {"topic": "c", "fail": True}))
        jobs.append(d.submit("report", {"seconds": 0.3}))
        late = d.submit("slow", {"seconds": 1.0, "steps": 1})
        with pytest.raises(ToolCallError):
            await late.wait(0.3)  # the caller stops waiting; the job goes on and completes late
        cancelled = d.submit("slow", {"seconds": 30, "steps": 1})
        await asyncio.sleep(0.2)
        assert parse(metrics.render()[0])["voice_mcp_jobs_running"][("demo",)] >= 1
        await cancelled.cancel()
        await settle(*jobs, late, cancelled)
        await health.check()
    finally:
        await d.aclose()

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    m = parse(body)
    recorded = await job_counts(registry)
    assert m["voice_mcp_jobs_total"] == recorded
    # The test covers what it claims to: every kind, and completed, failed, cancelled and late jobs.
    assert {k[0] for k in recorded} == {"plain", "receipt", "task"}
    assert {k[2] for k in recorded} == {"completed", "failed", "cancelled"}

    assert set(m["voice_mcp_jobs_running"].values()) == {0.0}
    durations = by(m["voice_mcp_job_duration_seconds_count"], 0, 2, 1)  # server, tool, state
    assert durations == by(recorded, 1, 3, 2)

    polled = await table(
        registry,
        "SELECT kind, server_name, count(*) AS n, sum(polls) AS polls FROM mcp_jobs"
        " WHERE kind <> 'plain' GROUP BY 1, 2",
    )
    assert m["voice_mcp_job_polls_sum"] == {(r["kind"], r["server_name"]): float(r["polls"]) for r in polled}
    assert m["voice_mcp_job_polls_count"] == {(r["kind"], r["server_name"]): float(r["n"]) for r in polled}
    assert all(r["polls"] > 0 for r in polled)

    # Receipts are always found by a poll: each completed one has a detection lag, under the poll interval.
    lag_count = m["voice_mcp_job_detection_lag_seconds_count"]
    assert lag_count[("receipt", "gen")] == recorded[("receipt", "gen", "completed", "submit_report")]
    assert 0 <= m["voice_mcp_job_detection_lag_seconds_sum"][("receipt", "gen")] / lag_count[("receipt", "gen")] < 1

    late_rows = await table(
        registry,
        "SELECT server_name, tool, count(*) AS n FROM mcp_jobs"
        " WHERE delivered_late AND state = 'completed' GROUP BY 1, 2",
    )
    assert m["voice_mcp_late_results_total"] == {(r["server_name"], r["tool"]): float(r["n"]) for r in late_rows}
    assert late.late and m["voice_mcp_late_results_total"][("demo", "slow")] >= 1

    health = {
        r["name"]: r
        for r in await table(
            registry, "SELECT s.name, h.* FROM mcp_server_health h JOIN mcp_servers s ON s.id = h.server_id"
        )
    }
    status = m["voice_mcp_server_status"]
    for name, row in health.items():
        assert {s: v for (srv, s), v in status.items() if srv == name} == {
            s: float(s == row["status"]) for s in HEALTH_STATES
        }
        assert m["voice_mcp_server_consecutive_failures"][(name,)] == row["consecutive_failures"]
    assert health["demo"]["status"] in ("up", "degraded") and health["dead"]["status"] in ("degraded", "down")
    assert m["voice_mcp_server_latency_seconds"][("demo",)] == pytest.approx(health["demo"]["latency_ms"] / 1000)
    assert ("dead",) not in m["voice_mcp_server_latency_seconds"]
    assert m["voice_mcp_health_checks_total"][("failed", "dead")] >= 1

    # A process that runs no calls shows the same counts from the tables, beside the live ones.
    await metrics.refresh_from_table(registry)
    m = parse(metrics.render()[0])
    assert m["voice_mcp_recorded_jobs"] == recorded == m["voice_mcp_jobs_total"]
    assert {k: v for k, v in m["voice_mcp_recorded_late_results"].items() if v} == m["voice_mcp_late_results_total"]
    assert by(m["voice_mcp_recorded_job_polls"], 0, 1) == m["voice_mcp_job_polls_sum"]
    assert m["voice_mcp_recorded_server_status"] == status


CHILD = """
import asyncio, os
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.health import Health
from mcp_integration.metrics import process_metrics
from mcp_integration.registry import Registry

async def main():
    reg = await Registry.open(os.environ["DATABASE_URL"])
    d = Dispatcher(reg, connect_timeout=15)
    health = Health(d)
    process_metrics(os.environ.get("PROMETHEUS_MULTIPROC_DIR")).attach(d, health)
    await d.start(wait=True)
    jobs = [d.submit("echo", {"text": str(i)}) for i in range(int(os.environ["ECHOES"]))] + [d.submit("fail", {})]
    # settled(): each job done and its final row written (a failed one too: settled never raises).
    await asyncio.wait_for(asyncio.gather(*(job.settled() for job in jobs)), 20)
    await health.check()
    await d.aclose()
    await reg.close()

asyncio.run(main())
"""


async def test_job_processes_metrics_reach_the_parent_in_multiprocess_mode(
    registry: Registry, pg_url: str, tmp_path: Path
) -> None:
    """LiveKit runs each call in a child process; its worker serves them all through prometheus_client's
    multiprocess mode (PROMETHEUS_MULTIPROC_DIR, MultiProcessCollector). Two real child processes here."""
    await registry.add_server(stdio_demo())
    env = dict(os.environ, DATABASE_URL=pg_url, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    children = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, cwd=ROOT, env=dict(env, ECHOES=str(n)))
        for n in (2, 3)
    ]
    assert [await asyncio.wait_for(c.wait(), 60) for c in children] == [0, 0]

    collected = CollectorRegistry()
    MultiProcessCollector(collected, path=str(tmp_path))
    m = parse(generate_latest(collected))
    recorded = await job_counts(registry)
    assert m["voice_mcp_jobs_total"] == recorded
    assert recorded[("plain", "demo", "completed", "echo")] == 5
    assert set(m["voice_mcp_jobs_running"].values()) == {0.0}
    assert m["voice_mcp_server_status"][("demo", "up")] == 1.0
    assert m["voice_mcp_health_checks_total"][("ok", "demo")] == 2


def voice_route(text: str) -> tuple[str, dict[str, Any]] | None:
    if m := re.match(r"^wait ([\d.]+)", text.strip()):
        return "slow", {"seconds": float(m[1]), "steps": 1}
    return None


async def test_voice_path_counts_fillers_releases_and_late_answers(registry: Registry) -> None:
    cfg = stdio_demo()
    cfg.release_after_ms = 1000
    await registry.add_server(cfg)
    d = Dispatcher(registry, connect_timeout=15)
    metrics = Metrics(CollectorRegistry())
    metrics.attach(d)
    await d.start(wait=True)
    policy = FillerPolicy.load()
    policy.threshold_s, policy.interval_s = 0.4, (6.0, 8.0)
    call = await TextCall(d, ScriptedLLM(voice_route), options=VoiceOptions(policy=policy)).start()
    call.toolbox.voice_observers.append(metrics.observe_voice)
    try:
        await call.say("wait 2")  # a filler line, released at 1 s, answered late
        job = call.toolbox.jobs[-1]
        await job.settled()
        for _ in range(100):
            if any(line.text.startswith("About your earlier question") for line in call.lines):
                break
            await asyncio.sleep(0.05)
    finally:
        await call.aclose()
        await d.aclose()
    m = parse(metrics.render()[0])
    fillers = call.spoken("filler")
    assert fillers and m["voice_mcp_filler_lines_total"] == {("demo",): float(len(fillers))}
    assert m["voice_mcp_jobs_released_total"] == {("demo",): 1.0}
    row = await registry.get_job(job.id)
    assert row is not None and row["delivered_late"] and row["state"] == "completed"
    assert m["voice_mcp_late_results_total"] == {("demo", "slow"): 1.0}


def test_the_worker_serves_our_metrics_beside_livekits(tmp_path: Path, pg_base_url: str) -> None:
    """The real worker (`agent.py start`) with METRICS_PORT: LiveKit's own metrics server answers, and carries
    ours from its job processes (prewarmed, no LiveKit server needed: it keeps retrying to connect)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "METRICS_PORT": str(port),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "LIVEKIT_URL": "ws://127.0.0.1:9",  # nothing listens: the worker retries, its processes still start
        "LIVEKIT_API_KEY": "test-key",
        "LIVEKIT_API_SECRET": "test-secret",
        "DATABASE_URL": pg_base_url,
        "OPENAI_API_KEY": "unused",
        "DEEPGRAM_API_KEY": "unused",
    }
    worker = subprocess.Popen(
        [sys.executable, "agent.py", "start"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # LiveKit's job processes go with the group at the end
    )
    try:
        families: dict[str, Any] = {}
        deadline = time.monotonic() + 90
        # Both, not ours alone: ours is written in the job process's prewarm, LiveKit's by the worker itself (a
        # process's initialize time once it reports ready, the load on a timer), which can come a moment later (CI
        # once read the endpoint in between).
        while time.monotonic() < deadline and not (
            "voice_mcp_sessions_running" in families and any(n.startswith("lk_agents_") for n in families)
        ):
            time.sleep(0.5)
            assert worker.poll() is None, "the worker exited"
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                continue
            families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "voice_mcp_sessions_running" in families, sorted(families)
        assert [s.value for s in families["voice_mcp_sessions_running"].samples] == [0.0]
        assert any(name.startswith("lk_agents_") for name in families)  # LiveKit's, from the same endpoint
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
