"""Prometheus metrics of tool calls and server health, through `prometheus_client`.

A process that runs calls counts them from each job's events (`Metrics.attach(dispatcher)`); a process that
only reads the database (the status page) shows what `mcp_jobs` and `mcp_server_health` record
(`await metrics.refresh_from_table(registry)`), under names of their own so both can share one registry.

Labels are bounded: server and tool names come from the registry, kind and state from fixed lists; job ids
never become labels. Every gauge names a multiprocess mode, so the metrics also work where each call runs in
its own process and a parent serves them all (LiveKit's worker with `PROMETHEUS_MULTIPROC_DIR`).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from mcp_integration.dispatcher import Dispatcher
    from mcp_integration.health import Health, HealthReport
    from mcp_integration.jobs import Job, JobEvent
    from mcp_integration.registry import HealthRow, Registry

HEALTH_STATES = ("up", "degraded", "down", "unknown", "needs_login")
# A voice call waits seconds, a background job minutes (bounded at 10 by default).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
POLL_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """The metrics of one process. Collectors can be registered once per registry: use `process_metrics()` for
    the default registry, and a fresh `CollectorRegistry` per instance anywhere else (tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        # Every metric on this registry; gauges say how job processes' values combine in multiprocess mode.
        counter = functools.partial(Counter, registry=self.registry)
        gauge = functools.partial(Gauge, registry=self.registry)
        histogram = functools.partial(Histogram, registry=self.registry)
        self.jobs = counter("voice_mcp_jobs", "Tool-call jobs by final state.", ["server", "tool", "kind", "state"])
        self.running = gauge(
            "voice_mcp_jobs_running", "Jobs not yet in a final state.", ["server"], multiprocess_mode="livesum"
        )
        # Unlabelled, so it exists (at 0) from the first moment: a worker's /metrics shows its job processes
        # are reporting before any call has been made.
        self.sessions = gauge("voice_mcp_sessions_running", "Voice sessions in progress.", multiprocess_mode="livesum")
        self.duration = histogram(
            "voice_mcp_job_duration_seconds", "From submit to final state.", ["server", "tool", "state"],
            buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.lag = histogram(
            "voice_mcp_job_detection_lag_seconds",
            "How long after the server finished a polled job we noticed: half the gap between the last "
            "'not yet' and the poll that found it done (jobs found done by a push are not counted).",
            ["server", "kind"], buckets=LAG_BUCKETS,
        )  # fmt: skip
        self.polls = histogram(
            "voice_mcp_job_polls", "Polls per task or receipt job.", ["server", "kind"], buckets=POLL_BUCKETS
        )
        self.fillers = counter("voice_mcp_filler_lines", "Filler lines spoken while a job ran.", ["server"])
        self.released = counter(
            "voice_mcp_jobs_released", "Calls released to run on while the caller talks.", ["server"]
        )
        self.late = counter(
            "voice_mcp_late_results", "Results delivered after the caller stopped waiting.", ["server", "tool"]
        )
        self.server_status = gauge(
            "voice_mcp_server_status",
            "1 for a server's status after its last health check, 0 for the other statuses.",
            ["server", "status"], multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.server_latency = gauge(
            "voice_mcp_server_latency_seconds", "Latency of a server's last successful health check.", ["server"],
            multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.server_failures = gauge(
            "voice_mcp_server_consecutive_failures", "Failed health checks or unreachable calls in a row.",
            ["server"], multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.health_checks = counter("voice_mcp_health_checks", "Health checks by result.", ["server", "result"])
        self._table: _TableCollector | None = None
        self._table_lock = threading.Lock()

    # -- live: from a dispatcher's jobs and health checks ---------------------------------------------------

    def attach(self, dispatcher: Dispatcher, health: Health | None = None) -> None:
        dispatcher.job_observers.append(self.observe_job)
        if health is not None:
            health.observers.append(self.observe_health)

    def observe_voice(self, job: Job, kind: str, data: dict[str, Any]) -> None:
        """A voice-side event of a job (the toolbox's `voice_observers`): a filler line spoken, a call released."""
        if kind == "filler":
            self.fillers.labels(job.server).inc()
        elif kind == "released":
            self.released.labels(job.server).inc()

    def observe_job(self, job: Job) -> None:
        """Count a new job; called before it starts, so no event is missed."""
        self.running.labels(job.server).inc()
        self._watch(job)

    def _watch(self, job: Job) -> None:
        last_poll_at: list[float] = []

        def on_event(event: JobEvent) -> None:
            if event.kind == "poll":
                last_poll_at[:] = [event.at]
            elif event.kind == "done":
                self._finished(job, event.data, last_poll_at[0] if last_poll_at else None)

        job.add_listener(on_event)

    def _finished(self, job: Job, data: dict[str, Any], last_poll_at: float | None) -> None:
        state = data.get("state", job.state)
        self.running.labels(job.server).dec()
        self.jobs.labels(job.server, job.tool, job.kind, state).inc()
        self.duration.labels(job.server, job.tool, state).observe(job.duration)
        if job.kind != "plain":
            self.polls.labels(job.server, job.kind).observe(job.polls)
            # Found by a poll when no "not yet" came after the last poll; otherwise a push brought the answer
            # (its lag is the push's, not the schedule's) and the midpoint estimate would not apply.
            found_by_poll = last_poll_at is not None and (
                job.last_pending_at is None or last_poll_at >= job.last_pending_at
            )
            if state == "completed" and found_by_poll:
                self.lag.labels(job.server, job.kind).observe(max(0.0, job.duration - job.estimated_duration))
        if data.get("late") and state == "completed":
            self.late.labels(job.server, job.tool).inc()

    def observe_health(self, report: HealthReport) -> None:
        status = report.status if report.status in HEALTH_STATES else "unknown"
        if status == "unknown":
            status = "up" if report.ok else "down"
        for name in HEALTH_STATES:
            self.server_status.labels(report.server, name).set(1.0 if name == status else 0.0)
        if report.latency_ms is not None:
            self.server_latency.labels(report.server).set(report.latency_ms / 1000)
        self.server_failures.labels(report.server).set(report.consecutive_failures)
        if report.source == "check":  # a call's outcome moving the breaker is not a check
            self.health_checks.labels(report.server, "ok" if report.ok else "failed").inc()

    # -- recorded: from the database, for a process that runs no calls --------------------------------------

    async def refresh_from_table(self, registry: Registry, *, max_age_s: float = 5.0) -> None:
        """Read job counts and server health from the database (two GROUP BY queries) for the next `render()`.
        Scrapes arriving within `max_age_s` of the last read reuse it."""
        table = self._table_collector()
        await table.refresh(registry, max_age_s=max_age_s)

    def _table_collector(self) -> _TableCollector:
        with self._table_lock:
            if self._table is None:
                self._table = _TableCollector()
                self.registry.register(self._table)
            return self._table

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_process_metrics: Metrics | None = None
_process_lock = threading.Lock()


def process_metrics(multiproc_dir: str | None = None) -> Metrics:
    """The process's one `Metrics` on prometheus_client's default registry (what LiveKit's worker serves).
    `multiproc_dir`: Settings.prometheus_multiproc_dir (prometheus_client itself reads PROMETHEUS_MULTIPROC_DIR
    from the environment at import; this only makes sure the directory exists)."""
    global _process_metrics
    with _process_lock:
        if _process_metrics is None:
            # Multiprocess mode writes files there on first use; a process other than LiveKit's worker (the
            # status page, the CLI) in an image that sets it would otherwise fail on a missing directory.
            if multiproc_dir:
                os.makedirs(multiproc_dir, exist_ok=True)
            _process_metrics = Metrics()
        return _process_metrics


@dataclass
class _Snapshot:
    jobs: list[dict[str, Any]] = field(default_factory=list)
    health: list[HealthRow] = field(default_factory=list)
    read_at: float | None = None
    source: int | None = None  # which Registry it was read from: another database is never served stale


_RECORDED = {
    "jobs": (
        "voice_mcp_recorded_jobs",
        "Jobs in mcp_jobs by server, tool, kind and state.",
        ["server", "tool", "kind", "state"],
    ),
    "late": ("voice_mcp_recorded_late_results", "Completed jobs in mcp_jobs delivered late.", ["server", "tool"]),
    "polls": (
        "voice_mcp_recorded_job_polls",
        "Polls made, summed over the jobs in mcp_jobs.",
        ["server", "tool", "kind"],
    ),
    "status": ("voice_mcp_recorded_server_status", "1 for each server's recorded status.", ["server", "status"]),
    "latency": ("voice_mcp_recorded_server_latency_seconds", "Each server's last recorded check latency.", ["server"]),
}


class _TableCollector:
    """A prometheus collector over the last read of the database; reading is async, collecting is not."""

    def __init__(self) -> None:
        self._snapshot = _Snapshot()

    async def refresh(self, registry: Registry, *, max_age_s: float) -> None:
        # No lock: an asyncio lock binds to one event loop, and two overlapping scrapes reading twice is harmless.
        snap = self._snapshot
        if snap.source == id(registry) and snap.read_at is not None and time.monotonic() - snap.read_at < max_age_s:
            return
        jobs = await registry.job_totals()
        health = list((await registry.health()).values())
        self._snapshot = _Snapshot(jobs, health, time.monotonic(), id(registry))

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(name, doc, labels=labels) for name, doc, labels in _RECORDED.values()]

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        fam = {key: GaugeMetricFamily(name, doc, labels=labels) for key, (name, doc, labels) in _RECORDED.items()}
        late: dict[tuple[str, str], int] = {}
        polls: dict[tuple[str, str, str], int] = {}
        for r in snap.jobs:
            fam["jobs"].add_metric([r["server_name"], r["tool"], r["kind"], r["state"]], r["n"])
            key = (r["server_name"], r["tool"])
            late[key] = late.get(key, 0) + r["late"]
            if r["kind"] != "plain":
                pkey = (r["server_name"], r["tool"], r["kind"])
                polls[pkey] = polls.get(pkey, 0) + r["polls"]
        for key, n in late.items():
            fam["late"].add_metric(list(key), n)
        for pkey, n in polls.items():
            fam["polls"].add_metric(list(pkey), n)
        for h in snap.health:
            for name in HEALTH_STATES:
                fam["status"].add_metric([h.server, name], 1.0 if h.status == name else 0.0)
            if h.latency_ms is not None:
                fam["latency"].add_metric([h.server], h.latency_ms / 1000)
        yield from fam.values()


__all__ = ["HEALTH_STATES", "Metrics", "process_metrics"]
