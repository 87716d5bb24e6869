"""Receipts: recognition (and what must never be taken for a receipt), where to poll, and one poll at a time
against real servers run as subprocesses: an n8n look-alike and a generic queue-style server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from conftest import SERVERS
from mcp import Client
from mcp.client.sse import sse_client

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.receipts import (
    PermanentPollError,
    PollOutcome,
    Receipt,
    ReceiptPoller,
    TransientPollError,
    default_http_client,
    endpoint_for,
    looks_like_unpollable_ack,
    parse_generic_status,
    parse_n8n_execution,
    recognise,
)
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.results import ToolResult

N8N_SCRIPT = str(SERVERS / "n8n_like_server.py")
GENERIC_SCRIPT = str(SERVERS / "generic_receipt_server.py")


def text(value: str) -> ToolResult:
    return ToolResult(text=value)


def as_json(value: Any, *, structured: bool = False) -> ToolResult:
    return ToolResult(text=json.dumps(value, indent=2), structured=value if structured else None)


def receipt(job_id: str, status: str | None = None, url: str | None = None, profile: str = "generic") -> Receipt:
    return Receipt(job_id, status, url, profile, raw=None)


def key(r: Receipt | None) -> tuple[str, str | None, str | None, str] | None:
    return None if r is None else (r.job_id, r.status, r.status_url, r.profile)


N8N_ITEMS = text('[{"status":"accepted","job_id":"4"}]')
QUEUED = as_json({"job_id": "rep-1", "status": "queued"}, structured=True)
EXEC_RUNNING = as_json({"executionId": "77", "status": "running"})
STARTED_WITH_ID = text('{"message": "Workflow was started", "executionId": "55"}')

# (id, result, profile, expected (job_id, status, status_url, profile) or None)
RECOGNITION: list[tuple[str, ToolResult, str, tuple[str, str | None, str | None, str] | None]] = [
    # n8n's one-item list of JSON, in text: generic under auto/http, polled at n8n's API under n8n.
    ("n8n-items-auto", N8N_ITEMS, "auto", ("4", "accepted", None, "generic")),
    ("n8n-items-n8n", N8N_ITEMS, "n8n", ("4", "accepted", None, "n8n")),
    ("n8n-items-http", N8N_ITEMS, "http", ("4", "accepted", None, "generic")),
    ("n8n-items-none", N8N_ITEMS, "none", None),
    ("n8n-items-mcp-task", N8N_ITEMS, "mcp-task", None),
    ("structured-queued", QUEUED, "auto", ("rep-1", "queued", None, "generic")),
    ("structured-queued-none", QUEUED, "none", None),
    ("structured-queued-mcp-task", QUEUED, "mcp-task", None),
    ("jobId-int-state", as_json({"jobId": 12, "state": "PENDING"}), "http", ("12", "pending", None, "generic")),
    ("executionId-auto", EXEC_RUNNING, "auto", ("77", "running", None, "n8n")),
    ("executionId-http", EXEC_RUNNING, "http", ("77", "running", None, "generic")),
    ("executionId-n8n", EXEC_RUNNING, "n8n", ("77", "running", None, "n8n")),
    ("execution_id", as_json({"execution_id": "8", "status": "new"}), "auto", ("8", "new", None, "n8n")),
    ("task_id", as_json({"task_id": "t-1", "status": "submitted"}), "auto", ("t-1", "submitted", None, "generic")),
    ("taskId-dashed", as_json({"taskId": "t-2", "status": "in-progress"}), "auto",
     ("t-2", "in_progress", None, "generic")),
    ("id-with-ack", as_json({"id": "abc", "status": "queued"}), "auto", ("abc", "queued", None, "generic")),
    ("id-with-ack-and-time", as_json({"id": "abc", "state": "scheduled", "created_at": "2025-01-01"}), "auto",
     ("abc", "scheduled", None, "generic")),
    ("job-with-extras", as_json({"job_id": "j", "status": "processing", "topic": "x", "eta_seconds": 30}), "auto",
     ("j", "processing", None, "generic")),
    ("status_url", as_json({"job_id": "9", "status_url": "/jobs/9"}), "auto", ("9", None, "/jobs/9", "generic")),
    ("statusUrl", as_json({"jobId": "9", "statusUrl": "https://h/jobs/9"}), "auto",
     ("9", None, "https://h/jobs/9", "generic")),
    ("result_url", as_json({"job_id": "9", "result_url": "/r/9"}), "auto", ("9", None, "/r/9", "generic")),
    ("resultUrl", as_json({"job_id": "9", "resultUrl": "/r/9"}), "auto", ("9", None, "/r/9", "generic")),
    ("poll_url", as_json({"task_id": "9", "poll_url": "/p/9"}), "auto", ("9", None, "/p/9", "generic")),
    ("location", as_json({"job_id": "9", "location": "/jobs/9", "status": "accepted"}), "auto",
     ("9", "accepted", "/jobs/9", "generic")),
    ("waiting", as_json({"job_id": "9", "status": "waiting"}), "auto", ("9", "waiting", None, "generic")),
    ("started", as_json({"job_id": "9", "status": "Started"}), "auto", ("9", "started", None, "generic")),
    ("json-text-padded", text('\n  {"job_id": "p", "status": "accepted"}  \n'), "auto",
     ("p", "accepted", None, "generic")),
    # n8n's webhook "respond immediately" answer: with an execution id it can be polled, but only as n8n.
    ("workflow-started-id-n8n", STARTED_WITH_ID, "n8n", ("55", "started", None, "n8n")),
    ("workflow-started-id-auto", STARTED_WITH_ID, "auto", ("55", "started", None, "n8n")),
    ("workflow-started-id-http", STARTED_WITH_ID, "http", None),
    ("workflow-started-text", text("Workflow was started"), "n8n", None),
    ("workflow-started-json", as_json({"message": "Workflow was started"}), "auto", None),
    # {"result": ...} wrappers: the MCP SDK's structured output of a string, n8n's item wrappers.
    ("result-wrapper-string", ToolResult(text="", structured={"result": '[{"status":"accepted","job_id":"4"}]'}),
     "auto", ("4", "accepted", None, "generic")),
    ("result-wrapper-object", as_json({"result": {"job_id": "5", "status": "queued"}}, structured=True), "auto",
     ("5", "queued", None, "generic")),
    ("result-wrapper-list", text('{"result": [{"jobId": "6", "status": "accepted"}]}'), "auto",
     ("6", "accepted", None, "generic")),
    # --- what must never be taken for a receipt ---------------------------------------------------------------
    ("record-id-name", as_json({"id": 5, "name": "Bob"}), "auto", None),
    ("order-shipped", as_json({"order_id": "A1", "status": "shipped"}), "auto", None),
    ("finished-job", as_json({"job_id": "x", "status": "completed", "result": {"a": 1}}), "auto", None),
    ("failed-job", as_json({"job_id": "x", "status": "failed", "error": "boom"}), "auto", None),
    ("customer-active", as_json({"id": 7, "name": "Ada", "status": "active"}, structured=True), "auto", None),
    ("server-running", as_json({"id": 3, "name": "web-1", "status": "running"}), "auto", None),
    ("todo-pending", as_json({"task_id": 12, "title": "Buy milk", "status": "pending"}), "auto", None),
    ("person-location", as_json({"id": 5, "name": "Bob", "location": "Paris"}), "auto", None),
    ("id-without-status", as_json({"id": "abc"}), "auto", None),
    ("id-with-url-only", as_json({"id": "abc", "status_url": "/jobs/abc"}), "auto", None),
    ("job-id-alone", as_json({"job_id": "x"}), "auto", None),
    ("status-alone", as_json({"status": "accepted"}), "auto", None),
    ("empty-job-id", as_json({"job_id": "", "status": "queued"}), "auto", None),
    ("bool-job-id", as_json({"job_id": True, "status": "queued"}), "auto", None),
    ("numeric-status", as_json({"job_id": "1", "status": 202}), "auto", None),
    ("url-not-a-url", as_json({"job_id": "1", "status_url": "soon"}), "auto", None),
    ("prose-accepted", text("Your request was accepted; the job will run tonight. Job id 42, status: queued."),
     "auto", None),
    ("prose-json-inside", text('The job was accepted: {"job_id": "1", "status": "queued"}'), "auto", None),
    ("many-records", as_json([{"job_id": "1", "status": "queued"}, {"job_id": "2", "status": "running"}]), "auto",
     None),
    ("many-records-structured",
     as_json({"result": [{"id": 1, "status": "queued"}, {"id": 2, "status": "queued"}]}, structured=True), "auto",
     None),
    ("empty-text", text(""), "auto", None),
    ("empty-list", text("[]"), "auto", None),
    ("empty-object", text("{}"), "auto", None),
    ("broken-json", text('{"job_id": "1", "status": "queued"'), "auto", None),
    ("plain-number", ToolResult(text="3", structured=3), "auto", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("result", "profile", "expected"), [c[1:] for c in RECOGNITION], ids=[c[0] for c in RECOGNITION]
)
def test_recognise(result: ToolResult, profile: str, expected: tuple[str, str | None, str | None, str] | None) -> None:
    got = recognise(result, poll_profile=profile)
    assert key(got) == expected
    if got is not None:
        json.dumps(got.raw)  # what mcp_jobs.receipt stores


def test_recognise_keeps_the_parsed_payload_and_refuses_unknown_profiles() -> None:
    got = recognise(N8N_ITEMS, poll_profile="auto")
    assert got is not None and got.raw == [{"status": "accepted", "job_id": "4"}]
    assert got.as_record() == {"job_id": "4", "status": "accepted", "status_url": None, "profile": "generic"}
    with pytest.raises(ValueError, match="poll profile"):
        recognise(N8N_ITEMS, poll_profile="webhook")


UNPOLLABLE: list[tuple[str, ToolResult, str, bool]] = [
    ("n8n-text", text("Workflow was started"), "auto", True),
    ("n8n-text-dot", text("  Workflow was started. "), "n8n", True),
    ("n8n-json", as_json({"message": "Workflow was started"}), "auto", True),
    ("n8n-json-list", text('[{"message":"Workflow was started"}]'), "http", True),
    ("accepted-word", text("Accepted"), "auto", True),
    ("status-accepted", as_json({"status": "accepted"}), "auto", True),
    ("status-queued-message", as_json({"status": "queued", "message": "ok"}), "mcp-task", True),
    ("profile-none", text("Workflow was started"), "none", False),
    ("prose", text("Your order was accepted and ships tomorrow."), "auto", False),
    ("status-running", as_json({"status": "running"}), "auto", False),
    ("status-accepted-record", as_json({"status": "accepted", "name": "Loan 4"}), "auto", False),
    ("customer", as_json({"id": 7, "name": "Ada", "status": "active"}), "auto", False),
    ("pollable", as_json({"job_id": "1", "status": "accepted"}), "auto", False),
    ("empty", text(""), "auto", False),
]


@pytest.mark.parametrize(("result", "profile", "expected"), [c[1:] for c in UNPOLLABLE], ids=[c[0] for c in UNPOLLABLE])
def test_looks_like_unpollable_ack(result: ToolResult, profile: str, expected: bool) -> None:
    assert looks_like_unpollable_ack(result, poll_profile=profile) is expected


# -- endpoint_for --------------------------------------------------------------------------------------------


def http_cfg(url: str = "http://127.0.0.1:8000/mcp", **kw: Any) -> ServerConfig:
    return ServerConfig(name="srv", transport="streamable-http", url=url, **kw)


ENDPOINTS: list[tuple[str, ServerConfig, Receipt, str]] = [
    ("default", http_cfg(), receipt("rep-1"), "http://127.0.0.1:8000/mcp/results/rep-1"),
    ("quoted", http_cfg(), receipt("a b/c?d#ü"), "http://127.0.0.1:8000/mcp/results/a%20b%2Fc%3Fd%23%C3%BC"),
    ("template-mid", http_cfg(result_endpoint="/jobs/{job_id}/result"), receipt("x"),
     "http://127.0.0.1:8000/jobs/x/result"),
    ("relative-no-slash", http_cfg("http://h.example/mcp/sse", result_endpoint="results/{job_id}"), receipt("x"),
     "http://h.example/mcp/results/x"),
    ("absolute", http_cfg(result_endpoint="https://api.example.com/v2/jobs/{job_id}?verbose=1"), receipt("x"),
     "https://api.example.com/v2/jobs/x?verbose=1"),
    ("no-placeholder-slash", http_cfg(result_endpoint="/status/"), receipt("x"), "http://127.0.0.1:8000/status/x"),
    ("no-placeholder-query", http_cfg(result_endpoint="/status?full=1"), receipt("x"),
     "http://127.0.0.1:8000/status/x?full=1"),
    ("n8n-default", http_cfg("https://n8n.example.com/mcp/abc/sse"), receipt("55", profile="n8n"),
     "https://n8n.example.com/api/v1/executions/55?includeData=true"),
    ("n8n-custom", http_cfg("https://n8n.example.com/mcp/abc/sse",
                            result_endpoint="http://n8n.internal:5678/api/v1/executions/{job_id}?includeData=true"),
     receipt("55", profile="n8n"), "http://n8n.internal:5678/api/v1/executions/55?includeData=true"),
    ("status-url-relative", http_cfg(), receipt("9", url="/jobs/9/status"), "http://127.0.0.1:8000/jobs/9/status"),
    ("status-url-same-origin", http_cfg(), receipt("9", url="HTTP://127.0.0.1:8000/q/9?x=1"),
     "http://127.0.0.1:8000/q/9?x=1"),
    ("status-url-default-port", http_cfg("https://h.example/mcp"), receipt("9", url="https://h.example:443/q/9"),
     "https://h.example:443/q/9"),
    ("status-url-configured-origin", http_cfg(result_endpoint="https://api.example.com/jobs/{job_id}"),
     receipt("9", url="https://api.example.com/jobs/9/full"), "https://api.example.com/jobs/9/full"),
    ("stdio-absolute", ServerConfig(name="srv", transport="stdio", command="x",
                                    result_endpoint="http://127.0.0.1:9000/r/{job_id}"),
     receipt("1"), "http://127.0.0.1:9000/r/1"),
]  # fmt: skip


@pytest.mark.parametrize(("cfg", "rec", "expected"), [c[1:] for c in ENDPOINTS], ids=[c[0] for c in ENDPOINTS])
def test_endpoint_for(cfg: ServerConfig, rec: Receipt, expected: str) -> None:
    assert endpoint_for(cfg, rec) == expected


@pytest.mark.parametrize(
    "status_url",
    [
        "http://169.254.169.254/latest/meta-data?token=s3cret",
        "http://127.0.0.1:9999/jobs/9?token=s3cret",  # another port
        "https://127.0.0.1:8000/jobs/9?token=s3cret",  # another scheme
        "//evil.example/jobs/9?token=s3cret",  # scheme-relative
    ],
)
def test_off_origin_status_url_is_ignored_and_logged_without_query(
    status_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mcp_integration.receipts"):
        url = endpoint_for(http_cfg(), receipt("9", url=status_url))
    assert url == "http://127.0.0.1:8000/mcp/results/9"
    assert "another origin" in caplog.text
    assert "s3cret" not in caplog.text and "token=***" in caplog.text  # the query's key shown, its value not


@pytest.mark.parametrize("status_url", ["http://[oops/jobs/9", "http://127.0.0.1:99999/jobs/9"])
def test_malformed_status_url_is_ignored(status_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mcp_integration.receipts"):
        assert endpoint_for(http_cfg(), receipt("9", url=status_url)) == "http://127.0.0.1:8000/mcp/results/9"
    assert "ignoring" in caplog.text


def test_stdio_server_needs_an_absolute_result_endpoint() -> None:
    stdio = ServerConfig(name="local", transport="stdio", command="python")
    with pytest.raises(PermanentPollError, match="absolute result_endpoint"):
        endpoint_for(stdio, receipt("1"))
    with pytest.raises(PermanentPollError, match="absolute result_endpoint"):
        endpoint_for(stdio, receipt("1", profile="n8n"))
    # A status URL has no origin to be checked against: it is not trusted either.
    with pytest.raises(PermanentPollError):
        endpoint_for(stdio, receipt("1", url="http://127.0.0.1:1/jobs/1"))


def test_endpoint_must_be_http() -> None:
    with pytest.raises(PermanentPollError, match="http"):
        endpoint_for(http_cfg(result_endpoint="file:///etc/{job_id}"), receipt("passwd"))


# -- reading status documents --------------------------------------------------------------------------------

GENERIC_DOCS: list[tuple[str, Any, tuple[bool, bool, str | None, str | None]]] = [
    ("running", {"status": "running"}, (False, False, None, None)),
    ("queued-state", {"state": "QUEUED"}, (False, False, None, None)),
    ("unknown-status", {"status": "thinking"}, (False, False, None, None)),
    ("result", {"status": "completed", "result": {"report": "r"}}, (True, True, '{"report": "r"}', None)),
    ("output-string", {"status": "succeeded", "output": "Done: 3 pages"}, (True, True, "Done: 3 pages", None)),
    ("data", {"state": "done", "data": [1, 2]}, (True, True, "[1, 2]", None)),
    ("answer", {"status": "success", "answer": "42"}, (True, True, "42", None)),
    ("response", {"status": "finished", "response": {"ok": "ü"}}, (True, True, '{"ok": "ü"}', None)),
    ("rest", {"status": "complete", "job_id": "1", "created_at": "t", "report": "r"},
     (True, True, '{"report": "r"}', None)),
    ("message-only", {"status": "done", "job_id": "1", "message": "Sent."}, (True, True, "Sent.", None)),
    ("no-status", {"report": "r"}, (True, True, '{"report": "r"}', None)),
    ("one-item-list", [{"status": "completed", "result": "x"}], (True, True, "x", None)),
    ("failed-error", {"status": "failed", "error": "disk full"}, (True, False, None, "disk full")),
    ("error-object", {"status": "error", "error": {"message": "bad input"}}, (True, False, None, "bad input")),
    ("cancelled-message", {"status": "cancelled", "message": "by user"}, (True, False, None, "by user")),
    ("canceled-bare", {"status": "canceled"}, (True, False, None, "the job ended with status canceled")),
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in GENERIC_DOCS], ids=[c[0] for c in GENERIC_DOCS])
def test_parse_generic_status(body: Any, expected: tuple[bool, bool, str | None, str | None]) -> None:
    outcome = parse_generic_status(body)
    assert (outcome.done, outcome.ok, outcome.result.text if outcome.result else None, outcome.error) == expected
    assert outcome.raw is body


def n8n_doc(status: str | None, *, finished: bool = False, last: str | None = "Summarise", **extra: Any) -> Any:
    doc: dict[str, Any] = {"id": "1", "finished": finished, "data": {"resultData": {"runData": {}, **extra}}}
    if status is not None:
        doc["status"] = status
    if last is not None:
        doc["data"]["resultData"]["lastNodeExecuted"] = last
    return doc


def runs(*branches: list[Any]) -> dict[str, Any]:
    return {"Summarise": [{"data": {"main": [[{"json": j} for j in b] for b in branches]}}]}


N8N_DOCS: list[tuple[str, Any, tuple[bool, bool, Any, str | None]]] = [
    ("running", n8n_doc("running"), (False, False, None, None)),
    ("waiting", n8n_doc("waiting"), (False, False, None, None)),
    ("new", n8n_doc("new"), (False, False, None, None)),
    ("success-one", n8n_doc("success", finished=True, runData=runs([{"a": 1}])), (True, True, {"a": 1}, None)),
    ("success-many", n8n_doc("success", finished=True, runData=runs([{"a": 1}, {"a": 2}])),
     (True, True, [{"a": 1}, {"a": 2}], None)),
    ("second-branch", n8n_doc("success", finished=True, runData=runs([], [{"b": 1}])), (True, True, {"b": 1}, None)),
    ("last-run-wins", n8n_doc("success", finished=True, runData={"Summarise": [
        {"data": {"main": [[{"json": {"run": 1}}]]}}, {"data": {"main": [[{"json": {"run": 2}}]]}}]}),
     (True, True, {"run": 2}, None)),
    ("finished-no-status", n8n_doc(None, finished=True, runData=runs([{"a": 1}])), (True, True, {"a": 1}, None)),
    ("success-no-data", {"id": "1", "finished": True, "status": "success"}, (True, False, None, "no output")),
    ("error", n8n_doc("error", error={"message": "The Summarise node failed"}),
     (True, False, None, "The Summarise node failed")),
    ("crashed", n8n_doc("crashed"), (True, False, None, "status crashed")),
    ("canceled", n8n_doc("canceled"), (True, False, None, "status canceled")),
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in N8N_DOCS], ids=[c[0] for c in N8N_DOCS])
def test_parse_n8n_execution(body: Any, expected: tuple[bool, bool, Any, str | None]) -> None:
    done, ok, answer, error = expected
    outcome = parse_n8n_execution(body)
    assert (outcome.done, outcome.ok) == (done, ok)
    if answer is None:
        assert outcome.result is None
    else:
        assert outcome.result is not None
        assert outcome.result.structured == answer
        assert json.loads(outcome.result.text) == answer
    if error is None:
        assert outcome.error is None
    else:
        assert outcome.error is not None and error in outcome.error


# -- one poll, HTTP behaviour (httpx's MockTransport: no network) ---------------------------------------------

SECRET = "sk-live-do-not-leak"


def mock_poller(
    handler: Callable[[httpx.Request], httpx.Response], monkeypatch: pytest.MonkeyPatch, **cfg: Any
) -> ReceiptPoller:
    monkeypatch.setenv("RECEIPT_TEST_KEY", SECRET)
    config = http_cfg(headers={"Authorization": "env:RECEIPT_TEST_KEY"}, **cfg)
    return ReceiptPoller(config, httpx.AsyncClient(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize(
    ("code", "kind"),
    [(404, TransientPollError), (408, TransientPollError), (429, TransientPollError), (500, TransientPollError),
     (502, TransientPollError), (400, PermanentPollError), (401, PermanentPollError), (403, PermanentPollError),
     (410, PermanentPollError), (422, PermanentPollError)],
)  # fmt: skip
async def test_http_status_classification(
    code: int, kind: type[Exception], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(code, json={"echo": request.headers.get("authorization")})

    poller = mock_poller(handler, monkeypatch)
    with caplog.at_level(logging.DEBUG), pytest.raises(kind) as info:
        await poller.poll_once(receipt("j1"))
    assert seen[0].headers["authorization"] == SECRET  # resolved from env:, sent
    assert str(code) in str(info.value) and getattr(info.value, "status_code", None) == code
    assert SECRET not in str(info.value) and SECRET not in caplog.text


async def test_retry_after_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    poller = mock_poller(lambda _: httpx.Response(503, headers={"Retry-After": "2"}), monkeypatch)
    with pytest.raises(TransientPollError) as info:
        await poller.poll_once(receipt("j1"))
    assert info.value.retry_after == 2.0


@pytest.mark.parametrize(
    "exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")]
)
async def test_network_errors_are_transient(exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(TransientPollError) as info:
        await mock_poller(handler, monkeypatch).poll_once(receipt("j1"))
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("body", [b"<html>gateway</html>", b""])
async def test_unparseable_2xx_body_is_permanent(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    poller = mock_poller(lambda _: httpx.Response(200, content=body), monkeypatch)
    with pytest.raises(PermanentPollError, match="not JSON"):
        await poller.poll_once(receipt("j1"))


async def test_missing_secret_is_permanent_and_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    poller = mock_poller(lambda _: httpx.Response(200, json={}), monkeypatch)
    monkeypatch.delenv("RECEIPT_TEST_KEY")
    with pytest.raises(PermanentPollError, match="RECEIPT_TEST_KEY"):
        await poller.poll_once(receipt("j1"))


async def test_same_origin_redirect_is_followed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/mcp/results/j1":
            return httpx.Response(302, headers={"Location": "/elsewhere/j1"})
        if request.url.path == "/elsewhere/j1":
            return httpx.Response(200, json={"status": "done", "result": "moved answer"})
        return httpx.Response(302, headers={"Location": "/mcp/results/loop"})

    poller = mock_poller(handler, monkeypatch)
    outcome = await poller.poll_once(receipt("j1"))
    assert outcome.result is not None and outcome.result.text == "moved answer"
    with pytest.raises(PermanentPollError, match="more than once"):
        await poller.poll_once(receipt("loop"))


@pytest.mark.parametrize("location", ["http://[oops/x", "ftp://127.0.0.1:8000/x", "http://127.0.0.1:99999/x"])
async def test_malformed_or_foreign_redirect_is_permanent(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    poller = mock_poller(lambda _: httpx.Response(307, headers={"Location": location}), monkeypatch)
    with pytest.raises(PermanentPollError, match="another origin"):
        await poller.poll_once(receipt("j1"))


async def test_auto_receipt_reads_n8n_api_when_pointed_at_it(monkeypatch: pytest.MonkeyPatch) -> None:
    body = n8n_doc("success", finished=True, runData=runs([{"a": 1}]))
    poller = mock_poller(lambda _: httpx.Response(200, json=body), monkeypatch)
    outcome = await poller.poll_once(receipt("1"))  # profile generic
    assert outcome.ok and outcome.result is not None and outcome.result.structured == {"a": 1}


def test_default_http_client() -> None:
    client = default_http_client()
    assert client.follow_redirects is False
    assert client.timeout.connect == 5.0 and client.timeout.read == 15.0


# -- against real servers ----------------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with default_http_client() as client:
        yield client


async def call_sse(port: int, tool: str, arguments: dict[str, Any]) -> ToolResult:
    async with Client(sse_client(f"http://127.0.0.1:{port}/mcp/reports")) as c:
        return ToolResult.from_mcp(await c.session.call_tool(tool, arguments))


async def call_http(port: int, tool: str, arguments: dict[str, Any], path: str = "/mcp") -> ToolResult:
    async with Client(f"http://127.0.0.1:{port}{path}") as c:
        return ToolResult.from_mcp(await c.session.call_tool(tool, arguments))


async def poll_until_done(poller: ReceiptPoller, rec: Receipt, *, limit: float = 10.0) -> tuple[PollOutcome, int]:
    """The loop is the job layer's; this is the simplest one that a test can count."""
    deadline = time.monotonic() + limit
    polls = 0
    while True:
        polls += 1
        try:
            outcome = await poller.poll_once(rec)
            if outcome.done:
                return outcome, polls
        except TransientPollError:
            pass
        assert time.monotonic() < deadline, f"not done after {limit} s ({polls} polls)"
        await asyncio.sleep(0.2)


async def stats(http: httpx.AsyncClient, port: int) -> dict[str, int]:
    return (await http.get(f"http://127.0.0.1:{port}/_stats")).json()


def n8n_cfg(port: int, **kw: Any) -> ServerConfig:
    return ServerConfig(
        name="n8n",
        transport="sse",
        url=f"http://127.0.0.1:{port}/mcp/reports",
        headers={"X-N8N-API-KEY": "env:N8N_TEST_KEY"},
        poll_profile="n8n",
        **kw,
    )


async def test_n8n_like_server_receipt_is_polled_to_the_answer(
    spawn: Callable[..., int], http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "800", "--api-key", "k1", script=N8N_SCRIPT)
    monkeypatch.setenv("N8N_TEST_KEY", "k1")
    result = await call_sse(port, "start_workflow", {"topic": "solar panels"})
    assert result.text.startswith('[{"status":"accepted","job_id":"')

    rec = recognise(result, poll_profile="n8n")
    assert rec is not None and rec.profile == "n8n" and rec.status == "accepted"
    auto = recognise(result, poll_profile="auto")
    assert auto is not None and auto.job_id == rec.job_id  # `job_id` does not say n8n: auto polls it generically
    assert recognise(result, poll_profile="none") is None

    cfg = n8n_cfg(port)
    assert endpoint_for(cfg, rec) == f"http://127.0.0.1:{port}/api/v1/executions/{rec.job_id}?includeData=true"
    outcome, polls = await poll_until_done(ReceiptPoller(cfg, http), rec)
    assert outcome.done and outcome.ok and outcome.status == "success" and outcome.error is None
    assert outcome.result is not None
    assert outcome.result.structured == {"summary": "Report on solar panels is ready", "pages": 3}
    assert json.loads(outcome.result.text) == outcome.result.structured
    assert polls >= 2  # it was running at first
    assert (await stats(http, port))[rec.job_id] == polls

    # The same workflow reached over Streamable HTTP, recognised under `auto`, polled where the row points.
    result = await call_http(port, "start_workflow", {"topic": "wind"}, path="/mcp/reports")
    auto = recognise(result, poll_profile="auto")
    assert auto is not None and auto.profile == "generic"
    cfg_auto = n8n_cfg(port, result_endpoint="/api/v1/executions/{job_id}?includeData=true")
    cfg_auto.poll_profile = "auto"
    outcome, _ = await poll_until_done(ReceiptPoller(cfg_auto, http), auto)
    assert outcome.ok and outcome.result is not None and outcome.result.structured["summary"].endswith("wind is ready")


async def test_n8n_webhook_started_answer(
    spawn: Callable[..., int], http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "300", "--api-key", "k1", script=N8N_SCRIPT)
    monkeypatch.setenv("N8N_TEST_KEY", "k1")
    with_id = await call_sse(port, "trigger_webhook", {"topic": "tides"})
    rec = recognise(with_id, poll_profile="auto")
    assert rec is not None and rec.profile == "n8n"
    outcome, _ = await poll_until_done(ReceiptPoller(n8n_cfg(port), http), rec)
    assert (
        outcome.ok and outcome.result is not None and outcome.result.structured["summary"] == "Report on tides is ready"
    )

    bare = await call_sse(port, "trigger_webhook", {"topic": "tides", "with_execution_id": False})
    assert recognise(bare, poll_profile="n8n") is None
    assert looks_like_unpollable_ack(bare, poll_profile="n8n")


async def test_n8n_like_server_failed_execution(
    spawn: Callable[..., int], http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "300", "--api-key", "k1", "--fail", script=N8N_SCRIPT)
    monkeypatch.setenv("N8N_TEST_KEY", "k1")
    rec = recognise(await call_sse(port, "start_workflow", {"topic": "x"}), poll_profile="n8n")
    assert rec is not None
    outcome, _ = await poll_until_done(ReceiptPoller(n8n_cfg(port), http), rec)
    assert outcome.done and not outcome.ok and outcome.result is None
    assert outcome.status == "error" and outcome.error == "The Summarise node failed"


async def test_n8n_wrong_api_key_is_permanent_and_never_shown(
    spawn: Callable[..., int],
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "300", "--api-key", "k1", script=N8N_SCRIPT)
    monkeypatch.setenv("N8N_TEST_KEY", "wrong-key-value-9f3")
    rec = recognise(await call_sse(port, "start_workflow", {"topic": "x"}), poll_profile="n8n")
    assert rec is not None
    with caplog.at_level(logging.DEBUG), pytest.raises(PermanentPollError) as info:
        await ReceiptPoller(n8n_cfg(port), http).poll_once(rec)
    assert info.value.status_code == 401 and "401" in str(info.value)
    assert "wrong-key-value-9f3" not in str(info.value) and "wrong-key-value-9f3" not in caplog.text
    assert "k1" not in str(info.value)


def generic_cfg(port: int) -> ServerConfig:
    return ServerConfig(
        name="queue", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", poll_profile="http"
    )


async def test_generic_server_receipt_is_polled_to_the_answer(
    spawn: Callable[..., int], http: httpx.AsyncClient
) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "600", script=GENERIC_SCRIPT)
    result = await call_http(port, "submit_report", {"topic": "tea"})
    assert result.structured == {"job_id": "rep-1", "status": "queued"}
    for profile in ("http", "auto"):
        rec = recognise(result, poll_profile=profile)
        assert key(rec) == ("rep-1", "queued", None, "generic")
    assert recognise(result, poll_profile="mcp-task") is None
    rec = recognise(result, poll_profile="http")
    assert rec is not None

    poller = ReceiptPoller(generic_cfg(port), http)
    outcome, polls = await poll_until_done(poller, rec)
    assert outcome.ok and outcome.status == "completed" and outcome.result is not None
    assert outcome.result.structured == {"report": "The report on tea: all good.", "topic": "tea"}
    assert polls >= 2 and (await stats(http, port))["rep-1"] == polls

    # A same-origin redirect is followed once.
    moved = await poller.poll_once(receipt("moved-rep-1"))
    assert moved.ok and moved.result == outcome.result

    failing = recognise(await call_http(port, "submit_report", {"topic": "x", "fail": True}), poll_profile="http")
    assert failing is not None
    outcome, _ = await poll_until_done(poller, failing)
    assert outcome.done and not outcome.ok and outcome.error == "the report generator crashed"

    # A job the server does not know (yet) is worth retrying; the loop bounds it.
    with pytest.raises(TransientPollError, match="404"):
        await poller.poll_once(receipt("rep-999"))


async def test_generic_server_lookup_is_not_a_receipt(spawn: Callable[..., int]) -> None:
    port = spawn("--port", "0", script=GENERIC_SCRIPT)
    result = await call_http(port, "lookup_customer", {"id": 7})
    assert result.structured == {"id": 7, "name": "Ada", "status": "active"}
    for profile in ("auto", "http", "n8n"):
        assert recognise(result, poll_profile=profile) is None
    assert not looks_like_unpollable_ack(result)


async def test_redirect_to_another_origin_is_not_followed(spawn: Callable[..., int], http: httpx.AsyncClient) -> None:
    port = spawn("--port", "0", script=GENERIC_SCRIPT)
    with pytest.raises(PermanentPollError) as info:
        await ReceiptPoller(generic_cfg(port), http).poll_once(receipt("redirect-1"))
    message = str(info.value)
    assert "another origin" in message and "127.0.0.2" in message
    assert "steal" not in message and "job=" not in message  # the target's path and query are not repeated
    assert (await stats(http, port)) == {"redirect-1": 1}  # and nothing was fetched after it


async def test_a_busy_result_endpoint_is_not_asked_again_before_its_retry_after(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    """The endpoint answers the first poll of a job with 503 and `Retry-After: 1.5`; the row's poll interval is
    0.1 s. The next poll waits the 1.5 s the server asked for, then finds the answer."""
    port = spawn("--port", "0", "--finish-after-ms", "200", "--busy-retry-after", "1.5", script=GENERIC_SCRIPT)
    cfg = generic_cfg(port)
    cfg.poll_interval = 100
    await registry.add_server(cfg)
    d = Dispatcher(registry)
    await d.start()
    try:
        job = d.submit("submit_report", {"topic": "tides"})
        assert "tides" in (await job.wait(20)).text
        polls = [e for e in job.events if e.kind == "poll"]
        assert "503" in polls[0].data["error"] and len(polls) == 2
        assert polls[1].at - polls[0].at >= 1.45
    finally:
        await d.aclose()
