"""Structured logs: every line logged while a job runs names the job, its server, its tool and the room, in our
JSON format, in the plain one, and in LiveKit's own JSON format (the worker owns its handlers); real jobs on a
real server, and the CLI as a real subprocess."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, stdio_demo

from mcp_integration.cli import main
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.jobs import JobEvent
from mcp_integration.logs import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    install_context_filter,
    log_context,
    setup_logging,
    use_json_on,
)
from mcp_integration.registry import Registry

test_log = logging.getLogger("voice_mcp.test")


@pytest.fixture
def root_stream() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """A real handler on the root logger, as a host would install it; removed afterwards."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler, stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def run_jobs(registry: Registry) -> list[str]:
    """Two real jobs, submitted inside a room's log context; a listener that logs and one that raises make the
    job's own task write lines (jobs.py logs the failing listener with its traceback). Returns the job ids."""
    await registry.add_server(stdio_demo())
    d = Dispatcher(registry, connect_timeout=15)
    await d.start(wait=True)

    def observe(job) -> None:  # type: ignore[no-untyped-def]
        def on_event(event: JobEvent) -> None:
            if event.kind == "accepted":
                test_log.info("job accepted")
            if event.kind == "done":
                raise RuntimeError("a listener that breaks")

        job.add_listener(on_event)

    d.job_observers.append(observe)
    try:
        with log_context(room="room-7"):
            jobs = [d.submit("echo", {"text": "hi"}), d.submit("add", {"a": 1, "b": 2})]
        test_log.info("outside any call")
        for job in jobs:
            await job.wait(15)
            await job.settled()
    finally:
        await d.aclose()
    return [str(j.id) for j in jobs]


async def test_json_lines_carry_job_server_tool_and_room(registry: Registry, root_stream) -> None:
    handler, stream = root_stream
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    ids = await run_jobs(registry)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is one JSON object
    about_jobs = [r for r in lines if r.get("job_id")]
    assert {r["job_id"] for r in about_jobs} == set(ids)
    for r in about_jobs:
        assert r["room"] == "room-7" and r["server"] == "demo" and r["tool"] in ("echo", "add")
        assert r["level"] and r["name"] and r["timestamp"].endswith("+00:00")
    by_job = {r["job_id"]: r for r in about_jobs if r["message"] == "job accepted"}
    assert set(by_job) == set(ids)
    assert {by_job[i]["tool"] for i in ids} == {"echo", "add"}
    failures = [r for r in about_jobs if "event listener failed" in r["message"]]
    assert len(failures) == 2 and all("RuntimeError: a listener that breaks" in r["exc_info"] for r in failures)
    outside = [r for r in lines if r["message"] == "outside any call"]
    assert outside and not {"job_id", "server", "tool", "room"} & set(outside[0])


async def test_text_lines_end_with_the_context(registry: Registry, root_stream) -> None:
    handler, stream = root_stream
    handler.setFormatter(TextFormatter())
    handler.addFilter(ContextFilter())
    ids = await run_jobs(registry)
    text = stream.getvalue()
    assert "INFO voice_mcp.test: outside any call\n" in text  # the plain format, unchanged outside a call
    accepted = [line for line in text.splitlines() if "job accepted" in line]
    assert len(accepted) == 2
    for line in accepted:
        assert line.startswith("INFO voice_mcp.test: job accepted [job_id=")
        assert "server=demo" in line and "room=room-7" in line and any(i in line for i in ids)
    # A traceback stays below its line; the context sits on the line itself.
    failed = text.split("event listener failed", 1)[1].splitlines()
    assert failed[0].endswith("room=room-7]") and failed[1].startswith("Traceback")


async def test_livekit_json_format_shows_our_fields_through_one_handler(registry: Registry, root_stream) -> None:
    """The worker installs its own handler (LiveKit's JsonFormatter under `start`); the agent adds only our
    filter to it, so our fields appear in LiveKit's lines and nothing is logged twice."""
    from livekit.agents.cli.log import ColoredFormatter
    from livekit.agents.cli.log import JsonFormatter as LiveKitJson

    handler, stream = root_stream
    handler.setFormatter(LiveKitJson())
    install_context_filter()
    install_context_filter()  # idempotent
    assert sum(isinstance(f, ContextFilter) for f in handler.filters) == 1
    ids = await run_jobs(registry)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    accepted = [r for r in lines if r["message"] == "job accepted"]
    assert len(accepted) == 2 and {r["job_id"] for r in accepted} == set(ids)
    assert all(r["room"] == "room-7" and r["server"] == "demo" and r["name"] == "voice_mcp.test" for r in accepted)

    # LOG_FORMAT=json in the worker: a handler already writing JSON keeps LiveKit's format (same keys as ours);
    # a coloured one (`dev`) is switched to ours, on that same handler.
    assert use_json_on() == 0 and isinstance(handler.formatter, LiveKitJson)
    handler.setFormatter(ColoredFormatter("%(levelname)s %(name)s %(message)s %(extra)s"))
    assert use_json_on() == 1 and isinstance(handler.formatter, JsonFormatter)
    stream.truncate(0)
    stream.seek(0)
    with log_context(job_id="j-1", server="demo", tool="echo", room="room-7"):
        test_log.info("after the swap")
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["name"] == "voice_mcp.test" and line["job_id"] == "j-1" and line["room"] == "room-7"
    assert sum(isinstance(f, ContextFilter) for f in handler.filters) == 1


def test_setup_logging_replaces_its_own_handler_and_respects_a_configured_root() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        # pytest's capture handlers are on the root: like basicConfig, leave them alone unless forced.
        assert setup_logging("json") is False
        first, second = io.StringIO(), io.StringIO()
        assert setup_logging("json", stream=first, force=True)
        root.handlers = [h for h in root.handlers if getattr(h, "stream", None) is first]
        assert setup_logging("text", stream=second)  # only our own handler there: replaced, not added
        assert len(root.handlers) == 1
        with log_context(job_id="j-2", server="s", tool="t"):
            test_log.info("one line")
        assert first.getvalue() == ""
        assert second.getvalue() == "INFO voice_mcp.test: one line [job_id=j-2 server=s tool=t]\n"
        with pytest.raises(ValueError, match="LOG_FORMAT must be one of text, json, not 'xml'"):
            setup_logging("xml")
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


def test_cli_log_format_json_and_a_bad_value(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = dict(os.environ, DATABASE_URL=pg_url, LOG_FORMAT="json")
    done = subprocess.run(
        [sys.executable, "-m", "mcp_integration", "-v", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and any(r["message"].startswith("applied migration 001") for r in records)
    assert "schema up to date" in done.stdout

    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    assert main(["migrate"]) == 1
    assert capsys.readouterr().err == "error: LOG_FORMAT must be one of text, json, not 'yaml'\n"


async def test_a_connection_a_job_reopened_does_not_log_as_that_job(
    registry: Registry, root_stream, tmp_path: Path
) -> None:
    """The connection's runner outlives the job that happened to reopen it: its lines are about the server."""
    handler, stream = root_stream
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    pidfile = tmp_path / "pid"
    await registry.add_server(stdio_demo("demo", "--pid-file", str(pidfile)))
    d = Dispatcher(registry, connect_timeout=15)
    await d.start(wait=True)
    try:
        await d.servers["demo"].conn.close()  # the next call, inside its job, opens a new connection
        with log_context(room="room-9"):
            job = d.submit("echo", {"text": "hi"})
            assert (await job.wait(20)).text == "echo: hi"
        conn = d.servers["demo"].conn
        os.kill(int(pidfile.read_text()), signal.SIGKILL)  # the runner notices and logs, after the job ended
        await asyncio.wait_for(conn.lost.wait(), 20)
    finally:
        await d.aclose()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    lost = [line for line in lines if "connection lost" in line.get("message", "")]
    assert lost, lines
    for line in lost:
        assert "job_id" not in line and "tool" not in line, line
        # room-9 was bound only around the job: the runner did start from the job's context, less its fields.
        assert line.get("room") == "room-9" and line.get("server") == "demo"
