"""The status page as HTML: the whole page for a first load, and its live parts (table bodies, a status line).

Every value from the database passes through `escape` (text and attributes alike); the only markup is ours.
Times are rendered as absolute instants (UTC) and shown by the page's script as "12 s ago", kept fresh there:
a part's text then changes only when its data does, and the live feed resends nothing else.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from html import escape

from mcp_integration.jobs import FINAL_STATES
from mcp_integration.web.views import HISTORY_MINUTES, JobView, Minute, ServerView, Snapshot

__all__ = [
    "jobs_part",
    "page",
    "parts",
    "servers_part",
    "sparkline",
    "status_part",
]


CHART_W, CHART_H = 120, 28


def page(snapshot: Snapshot, *, monitor_running: bool, asset_version: str) -> str:
    status = status_part(snapshot, monitor_running=monitor_running, database=True)
    v = escape(asset_version)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>voice-mcp · status</title>
<link rel="stylesheet" href="/static/dashboard.css?v={v}">
<script src="/static/dashboard.js?v={v}" defer></script>
</head>
<body data-now="{_iso(snapshot.taken_at)}" data-status="{escape(status)}">
<header>
  <h1>voice-mcp <span>status</span></h1>
  <p id="summary">{escape(_summary(snapshot))}</p>
  <p class="indicators">
    <span id="live" data-state="off">connecting…</span>
    <span id="monitor" data-state="{"on" if monitor_running else "off"}">{_monitor_text(monitor_running)}</span>
    <span id="database" data-state="on">database reachable</span>
  </p>
</header>
<p id="notice" role="status" aria-live="polite" hidden></p>
<main>
<section aria-labelledby="servers-title">
  <h2 id="servers-title">Servers</h2>
  <div class="scroll">
  <table id="servers">
    <thead><tr>
      <th scope="col">Server</th><th scope="col">Transport</th><th scope="col">Enabled</th>
      <th scope="col">Health</th><th scope="col">Latency, last hour</th><th scope="col" class="num">Failures</th>
      <th scope="col">Last error</th><th scope="col" class="num">Tools</th><th scope="col">Last discovery</th>
      <th scope="col">Actions</th>
    </tr></thead>
    <tbody id="servers-body">{servers_part(snapshot)}</tbody>
  </table>
  </div>
</section>
<section aria-labelledby="jobs-title">
  <h2 id="jobs-title">Recent jobs</h2>
  <div class="scroll">
  <table id="jobs">
    <thead><tr>
      <th scope="col">Submitted</th><th scope="col">Server</th><th scope="col">Tool</th><th scope="col">State</th>
      <th scope="col">Kind</th><th scope="col" class="num">Duration</th><th scope="col" class="num">Polls</th>
      <th scope="col">Delivered late</th>
    </tr></thead>
    <tbody id="jobs-body">{jobs_part(snapshot)}</tbody>
  </table>
  </div>
</section>
</main>
</body>
</html>
"""


def parts(snapshot: Snapshot, *, servers: bool, jobs: bool, monitor_running: bool) -> dict[str, str]:
    """What the live feed sends: a table body, or both, and with the servers the status line (JSON)."""
    out: dict[str, str] = {}
    if servers:
        out["servers"] = servers_part(snapshot)
        out["status"] = status_part(snapshot, monitor_running=monitor_running, database=True)
    if jobs:
        out["jobs"] = jobs_part(snapshot)
    return out


def status_part(snapshot: Snapshot | None, *, monitor_running: bool, database: bool) -> str:
    # No clock in it: the status line is resent only when it changes.
    body: dict[str, object] = {"database": database, "monitor": monitor_running}
    if snapshot is not None:
        body["summary"] = _summary(snapshot)
    return json.dumps(body)


def servers_part(snapshot: Snapshot) -> str:
    if not snapshot.servers:
        return (
            '<tr class="empty"><td colspan="10">No servers registered. Add one with '
            "<code>python -m mcp_integration servers add NAME --transport …</code></td></tr>"
        )
    return "\n".join(_server_row(s) for s in snapshot.servers)


def jobs_part(snapshot: Snapshot) -> str:
    if not snapshot.jobs:
        return '<tr class="empty"><td colspan="8">No jobs yet.</td></tr>'
    return "\n".join(_job_row(j) for j in snapshot.jobs)


def _server_row(s: ServerView) -> str:
    name = escape(s.name)
    status = escape(s.status)
    latency = f" · {s.latency_ms:.0f} ms" if s.latency_ms is not None and s.status == "up" else ""
    checked = f" · {_time(s.checked_at)}" if s.checked_at else ""
    toggle = "disable" if s.enabled else "enable"
    check_attrs = "" if s.enabled else ' disabled title="Enable the server to check it"'
    error = f'<span title="{escape(s.last_error)}">{escape(s.last_error)}</span>' if s.last_error else "—"
    discovered = _time(s.discovered_at) if s.discovered_at else "never"
    enabled = "yes" if s.enabled else "no"
    row_class = "" if s.enabled else ' class="off"'
    return (
        f'<tr id="server-{name}" data-server="{name}" data-health="{status}" data-enabled="{enabled}"{row_class}>'
        f'<th scope="row">{name}<div class="target">{escape(s.target)}</div></th>'
        f"<td>{escape(s.transport)}</td>"
        f'<td class="enabled">{enabled}</td>'
        f'<td class="health"><span class="badge {status}">{status}</span>{latency}{checked}</td>'
        f'<td class="chart">{sparkline(s.name, s.history)}</td>'
        f'<td class="num failures">{s.consecutive_failures}</td>'
        f'<td class="error">{error}</td>'
        f'<td class="num tools">{s.tools}</td>'
        f'<td class="discovered">{discovered}</td>'
        f'<td class="actions"><button type="button" data-action="{toggle}" data-server="{name}">'
        f"{toggle.capitalize()}</button>"
        f' <button type="button" data-action="check" data-server="{name}"{check_attrs}>Check now</button></td>'
        "</tr>"
    )


def _job_row(j: JobView) -> str:
    state = escape(j.state)
    if j.state in FINAL_STATES:
        duration = _seconds(j.seconds)
    else:
        duration = f'<time datetime="{_iso(j.submitted_at)}" data-since>running</time>'
    return (
        f'<tr data-job="{escape(j.id)}" data-state="{state}">'
        f"<td>{_time(j.submitted_at)}</td>"
        f"<td>{escape(j.server)}</td><td>{escape(j.tool)}</td>"
        f'<td><span class="state {state}">{state.replace("_", " ")}</span></td>'
        f"<td>{escape(j.kind)}</td>"
        f'<td class="num">{duration}</td>'
        f'<td class="num">{j.polls}</td>'
        f'<td class="late">{"late" if j.late else "no"}</td>'
        "</tr>"
    )


@functools.lru_cache(maxsize=1024)
def sparkline(server: str, minutes: tuple[Minute, ...]) -> str:
    """Mean latency per minute over the last hour (newest on the right), and a red tick for a minute with a
    failed check; a gap where no check ran."""
    step = CHART_W / HISTORY_MINUTES
    answered = [m for m in minutes if m.latency_ms is not None]
    top = max((m.latency_ms or 0.0 for m in answered), default=0.0) or 1.0
    segments: list[list[tuple[float, float]]] = []
    last: int | None = None
    for m in sorted(answered, key=lambda m: -m.minutes_ago):
        x = CHART_W - (m.minutes_ago + 0.5) * step
        y = CHART_H - 3 - (m.latency_ms or 0.0) / top * (CHART_H - 7)
        if last is None or last - m.minutes_ago > 1:
            segments.append([])
        segments[-1].append((x, y))
        last = m.minutes_ago
    shapes: list[str] = []
    for seg in segments:
        if len(seg) == 1:
            shapes.append(f'<circle class="line" cx="{seg[0][0]:.1f}" cy="{seg[0][1]:.1f}" r="1.5"/>')
        else:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
            shapes.append(f'<polyline class="line" points="{points}"/>')
    for m in minutes:
        if m.failed:
            x = CHART_W - (m.minutes_ago + 1) * step
            shapes.append(f'<rect class="fail" x="{x:.1f}" y="{CHART_H - 4}" width="{step:.1f}" height="4"/>')
    failed = sum(m.failed for m in minutes)
    checks = sum(m.checks for m in minutes)
    if answered:
        ordered = sorted(m.latency_ms or 0.0 for m in answered)
        label = (
            f"{server}: median {ordered[len(ordered) // 2]:.0f} ms, max {ordered[-1]:.0f} ms,"
            f" {failed} of {checks} checks failed in the last hour"
        )
    elif checks:
        label = f"{server}: all {checks} checks failed in the last hour"
    else:
        label = f"{server}: no checks in the last hour"
    return (
        f'<svg class="spark" viewBox="0 0 {CHART_W} {CHART_H}" width="{CHART_W}" height="{CHART_H}"'
        f' role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>'
        f'<line class="axis" x1="0" y1="{CHART_H - 0.5}" x2="{CHART_W}" y2="{CHART_H - 0.5}"/>'
        f"{''.join(shapes)}</svg>"
    )


def _summary(snapshot: Snapshot) -> str:
    enabled = [s for s in snapshot.servers if s.enabled]
    counts: dict[str, int] = {}
    for s in enabled:
        counts[s.status] = counts.get(s.status, 0) + 1
    detail = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    off = len(snapshot.servers) - len(enabled)
    text = f"{len(enabled)} enabled server{'s' if len(enabled) != 1 else ''}"
    if detail:
        text += f": {detail}"
    if off:
        text += f"; {off} disabled"
    return text


def _monitor_text(running: bool) -> str:
    return "health monitor running" if running else "health monitor stopped"


def _iso(at: datetime) -> str:
    return at.isoformat()


def _time(at: datetime) -> str:
    # Absolute here, so a part's text changes only when its data does (the feed resends nothing else); the
    # page's script shows it as "12 s ago" and keeps that fresh.
    return f'<time datetime="{_iso(at)}" data-rel>{at.astimezone(UTC):%H:%M:%S} UTC</time>'


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.0f} s"
    return f"{value / 60:.0f} min"
