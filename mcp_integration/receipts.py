"""Receipts: tool results that only acknowledge work, and one poll of the endpoint that holds the real answer.

A workflow tool (an n8n webhook that responds immediately, a queue-backed API) answers `tools/call` with an
ordinary result such as `[{"status":"accepted","job_id":"4"}]`. Handing that to a language model makes it say
"accepted" instead of the answer, so this module recognises such results and fetches the answer:

- `recognise(result, poll_profile=...)` says whether a result is a receipt that can be polled;
- `looks_like_unpollable_ack(result)` spots acknowledgments that carry nothing to poll with;
- `endpoint_for(cfg, receipt)` builds the URL to poll, on the server's own origin only;
- `ReceiptPoller.poll_once(receipt)` makes one GET and says whether the job is done, and with what.

The loop around `poll_once` (intervals, backoff, overall timeout) belongs to the job layer. No standard exists for
receipts, so recognition errs towards "not a receipt": polling an ordinary answer would hide it behind errors,
while a missed receipt is at least visible to the caller.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx

from mcp_integration.errors import SecretMissing
from mcp_integration.registry import POLL_PROFILES, ServerConfig
from mcp_integration.results import ToolResult
from mcp_integration.secrets import redact_url, resolve_refs, resolve_url

__all__ = [
    "ACK_STATUSES",
    "ANSWER_FIELDS",
    "DEFAULT_RESULT_ENDPOINT",
    "DONE_STATUSES",
    "FAILURE_STATUSES",
    "ID_FIELDS",
    "N8N_DONE_STATUSES",
    "N8N_EXECUTION_TEMPLATE",
    "STATUS_URL_FIELDS",
    "SUCCESS_STATUSES",
    "PermanentPollError",
    "PollOutcome",
    "Receipt",
    "ReceiptPoller",
    "TransientPollError",
    "default_http_client",
    "endpoint_for",
    "looks_like_unpollable_ack",
    "parse_generic_status",
    "parse_n8n_execution",
    "read_acknowledgment",
    "recognise",
]


log = logging.getLogger(__name__)

DEFAULT_RESULT_ENDPOINT = "/mcp/results"
N8N_EXECUTION_TEMPLATE = "/api/v1/executions/{job_id}?includeData=true"

# Statuses that mean "work has been taken on, the answer comes later".
ACK_STATUSES = frozenset(
    {
        "accepted",
        "queued",
        "pending",
        "running",
        "started",
        "submitted",
        "processing",
        "in_progress",
        "scheduled",
        "waiting",
        "new",
    }
)
# Only these are unambiguous enough to call a bare `{"status": "accepted"}` an acknowledgment: "running" or
# "pending" alone is just as likely the answer to "what state is X in?".
_HARD_ACK_STATUSES = frozenset({"accepted", "queued", "submitted"})
SUCCESS_STATUSES = frozenset({"completed", "complete", "done", "success", "succeeded", "finished"})
FAILURE_STATUSES = frozenset({"failed", "failure", "error", "crashed", "aborted", "timed_out", "cancelled", "canceled"})
DONE_STATUSES = SUCCESS_STATUSES | FAILURE_STATUSES
N8N_DONE_STATUSES = frozenset({"success", "error", "crashed", "canceled", "cancelled"})

ID_FIELDS = ("job_id", "jobId", "execution_id", "executionId", "task_id", "taskId")
_N8N_ID_FIELDS = frozenset({"execution_id", "executionId"})
# `id` is on every database record and "task" is a common domain noun (to-do apps): with these, a result only
# counts as a receipt when it holds nothing but bookkeeping, so `{"task_id": 3, "title": ..., "status":
# "pending"}` stays an answer.
_STRICT_ID_FIELDS = frozenset({"id", "task_id", "taskId"})
STATUS_URL_FIELDS = ("status_url", "statusUrl", "result_url", "resultUrl", "poll_url", "location")
ANSWER_FIELDS = ("result", "output", "data", "answer", "response")
_N8N_STARTED = "workflow was started"
_UNPOLLABLE_TEXTS = frozenset({_N8N_STARTED, "workflow started", "accepted", "queued", "submitted"})

_TIME_FIELDS = frozenset(
    {
        "created_at",
        "createdAt",
        "submitted_at",
        "submittedAt",
        "queued_at",
        "queuedAt",
        "started_at",
        "startedAt",
        "updated_at",
        "updatedAt",
        "finished_at",
        "finishedAt",
        "completed_at",
        "completedAt",
    }
)
# What an acknowledgment may hold besides its id: anything else makes the object look like a record.
_ACK_BOOKKEEPING = (
    frozenset(
        {
            "status",
            "state",
            "message",
            "detail",
            "type",
            "kind",
            "object",
            "ok",
            "success",
            "queue",
            "position",
            "queue_position",
            "progress",
            "eta",
            "eta_seconds",
            "poll_interval",
            "pollInterval",
            "poll_interval_ms",
            "pollIntervalMs",
            "retry_after",
            "retryAfter",
        }
    )
    | _TIME_FIELDS
    | frozenset(ID_FIELDS)
    | {"id"}
    | frozenset(STATUS_URL_FIELDS)
)
# What a finished job's status document holds that is not the answer.
_POLL_BOOKKEEPING = (
    frozenset({"status", "state", "message", "error", "progress", "id"})
    | _TIME_FIELDS
    | frozenset(ID_FIELDS)
    | frozenset(STATUS_URL_FIELDS)
)
_MAX_TEXT_TO_PARSE = 64 * 1024  # a receipt is small; a large text is an answer, not worth parsing twice
_MAX_JOB_ID = 256
_WRAPPER_DEPTH = 3


class TransientPollError(Exception):
    """One poll failed in a way worth retrying (network, 5xx, 408, 429, a job not visible yet)."""

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class PermanentPollError(Exception):
    """Polling cannot succeed by retrying: refused (4xx), misconfigured, off-origin, or an unreadable answer."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Receipt:
    """An acknowledgment that can be polled: what to ask for (`job_id`, maybe `status_url`) and how (`profile`)."""

    job_id: str
    status: str | None
    status_url: str | None
    profile: str  # "generic" | "n8n"
    raw: Any

    def as_record(self) -> dict[str, Any]:
        # The status URL without its query string: a token there must not reach mcp_jobs.
        status_url = redact_url(self.status_url) if self.status_url else None
        return {"job_id": self.job_id, "status": self.status, "status_url": status_url, "profile": self.profile}


@dataclass(frozen=True)
class PollOutcome:
    """What one poll learned. `ok` is True only for a job that is done and succeeded; `result` is then set,
    `error` is set for a job that is done and failed; a job not done yet has neither."""

    done: bool
    ok: bool
    result: ToolResult | None
    error: str | None
    status: str | None
    raw: Any


# -- recognition ----------------------------------------------------------------------------------------------


def recognise(result: ToolResult, *, poll_profile: str) -> Receipt | None:
    """The receipt in a tool result, or None when the result is (or must be treated as) the answer itself.

    `poll_profile` is the server's: `none` and `mcp-task` never poll receipts; `n8n` knows n8n's shapes and polls
    the n8n API; `http` knows the generic shapes; `auto` both.
    """
    if poll_profile not in POLL_PROFILES:
        raise ValueError(f"unknown poll profile {poll_profile!r}")
    if poll_profile in ("none", "mcp-task"):
        return None
    return _receipt_in(_records(result), poll_profile)


def looks_like_unpollable_ack(result: ToolResult, *, poll_profile: str = "auto") -> bool:
    """True for an acknowledgment with nothing to poll: n8n's bare "Workflow was started", a lone "Accepted".

    Meant for results `recognise` turned down: the job layer should fail such a call with a clear reason (the
    workflow answers before it has a result: make its webhook respond when the last node finishes) rather than
    hand the acknowledgment to a language model as if it were the answer.
    """
    if poll_profile == "none":
        return False
    return _unpollable(result, _records(result))


def read_acknowledgment(result: ToolResult, *, poll_profile: str) -> tuple[Receipt | None, bool]:
    """`recognise`, and for a result with no receipt `looks_like_unpollable_ack`, from one reading of the
    result: what the job layer asks of every answer, whose text each would parse on its own."""
    if poll_profile not in POLL_PROFILES:
        raise ValueError(f"unknown poll profile {poll_profile!r}")
    if poll_profile == "none":
        return None, False
    records = _records(result)
    if poll_profile != "mcp-task":
        receipt = _receipt_in(records, poll_profile)
        if receipt is not None:
            return receipt, False
    return None, _unpollable(result, records)


def _records(result: ToolResult) -> list[tuple[dict[str, Any], Any]]:
    """Each JSON object the result stands for, with the payload it came from."""
    out = []
    for payload in _payloads(result):
        record = _single_record(payload)
        if record is not None:
            out.append((record, payload))
    return out


def _receipt_in(records: list[tuple[dict[str, Any], Any]], poll_profile: str) -> Receipt | None:
    for record, payload in records:
        receipt = _match(record, payload, poll_profile)
        if receipt is not None:
            return receipt
    return None


def _unpollable(result: ToolResult, records: list[tuple[dict[str, Any], Any]]) -> bool:
    if _clean_phrase(result.text) in _UNPOLLABLE_TEXTS:
        return True
    for record, _ in records:
        if not set(record) <= _ACK_BOOKKEEPING:
            continue
        message = record.get("message")
        if isinstance(message, str) and _clean_phrase(message) == _N8N_STARTED:
            return True
        if _status_of(record) in _HARD_ACK_STATUSES and _job_id(record, allow_plain_id=True) is None:
            return True
    return False


def _payloads(result: ToolResult) -> list[Any]:
    """The JSON values a result carries: its structured content, and its text when that is JSON."""
    out: list[Any] = []
    if result.structured is not None:
        out.append(result.structured)
    parsed = _parse_json_text(result.text)
    if parsed is not None and parsed not in out:
        out.append(parsed)
    return out


def _parse_json_text(text: Any) -> Any:
    if not isinstance(text, str) or len(text) > _MAX_TEXT_TO_PARSE:
        return None
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


def _single_record(payload: Any, depth: int = 0) -> dict[str, Any] | None:
    """The one JSON object a payload stands for; None for lists of several items (records, not a receipt)."""
    if depth > _WRAPPER_DEPTH:
        return None
    if isinstance(payload, str):
        parsed = _parse_json_text(payload)
        return None if parsed is None else _single_record(parsed, depth + 1)
    if isinstance(payload, list):
        return _single_record(payload[0], depth + 1) if len(payload) == 1 else None
    if isinstance(payload, dict):
        # A lone `result` key is a wrapper, not an answer: the MCP SDK wraps a tool's plain return value so
        # (`{"result": "<the text>"}`), and item wrappers of workflow tools look the same.
        if set(payload) == {"result"}:
            return _single_record(payload["result"], depth + 1)
        return payload
    return None


def _match(record: dict[str, Any], raw: Any, poll_profile: str) -> Receipt | None:
    status = _status_of(record)
    # A status that is not an acknowledgment (completed, shipped, active…) means this is an answer, whatever ids
    # it carries.
    if status is not None and status not in ACK_STATUSES:
        return None

    message = record.get("message")
    if poll_profile in ("n8n", "auto") and isinstance(message, str) and _clean_phrase(message) == _N8N_STARTED:
        found = _job_id(record, allow_plain_id=False)
        if found is None:
            return None
        return Receipt(found[1], status or "started", None, "n8n", raw)

    found = _job_id(record, allow_plain_id=status is not None)
    if found is None:
        return None
    field_name, job_id = found
    if field_name in _STRICT_ID_FIELDS and not set(record) <= _ACK_BOOKKEEPING:
        return None
    status_url = _status_url(record)
    if status is None and status_url is None:
        return None
    if poll_profile == "auto":
        # Only n8n's own vocabulary says "n8n"; a `job_id` from an n8n workflow is polled generically unless the
        # row says n8n (or points result_endpoint at n8n's API, which poll_once recognises by its answer).
        profile = "n8n" if field_name in _N8N_ID_FIELDS else "generic"
    else:
        profile = "n8n" if poll_profile == "n8n" else "generic"
    return Receipt(job_id, status, status_url, profile, raw)


def _status_of(record: dict[str, Any]) -> str | None:
    for key in ("status", "state"):
        if key in record and record[key] is not None:
            value = record[key]
            if not isinstance(value, str):
                return f"<{type(value).__name__}>"  # present but not a word: never an acknowledgment
            return value.strip().lower().replace("-", "_").replace(" ", "_")
    return None


def _job_id(record: dict[str, Any], *, allow_plain_id: bool) -> tuple[str, str] | None:
    fields = (*ID_FIELDS, "id") if allow_plain_id else ID_FIELDS
    for key in fields:
        value = record.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return key, str(value)
        if isinstance(value, str):
            value = value.strip()
            if 0 < len(value) <= _MAX_JOB_ID and value.isprintable():
                return key, value
    return None


def _status_url(record: dict[str, Any]) -> str | None:
    for key in STATUS_URL_FIELDS:
        value = record.get(key)
        # `location` is also a person's or an order's place: only a URL or an absolute path counts.
        if isinstance(value, str) and value.strip().lower().startswith(("http://", "https://", "/")):
            return value.strip()
    return None


def _clean_phrase(text: Any) -> str:
    if not isinstance(text, str) or len(text) > 200:
        return ""
    return text.strip().strip("\"'").strip().rstrip(".!").strip().lower()


# -- where to poll ---------------------------------------------------------------------------------------------


def endpoint_for(cfg: ServerConfig, receipt: Receipt) -> str:
    """The URL that answers for `receipt`.

    The receipt's own status URL wins when it is on a trusted origin (the server's, or that of an absolute
    `result_endpoint` the registry configured): a receipt is data from the server, and following it anywhere
    would let a server make us send its headers (API keys) to any host. Otherwise the row's `result_endpoint`
    is a template with `{job_id}`, resolved against the server's URL; n8n servers default to n8n's executions API.
    """
    if receipt.status_url:
        own = _trusted_status_url(cfg, receipt.status_url)
        if own is not None:
            return own
    template = cfg.result_endpoint or DEFAULT_RESULT_ENDPOINT
    if receipt.profile == "n8n" and template == DEFAULT_RESULT_ENDPOINT:
        template = N8N_EXECUTION_TEMPLATE
    if "{job_id}" not in template:
        base, sep, query = template.partition("?")
        template = base.rstrip("/") + "/{job_id}" + sep + query
    url = template.replace("{job_id}", quote(receipt.job_id, safe=""))
    if _is_absolute(url):
        return url
    if _scheme(url):
        raise PermanentPollError(f"server {cfg.name!r}: result_endpoint must be an http(s) URL or a path")
    server_url = _server_url(cfg)
    if not server_url:
        raise PermanentPollError(
            f"server {cfg.name!r}: polling receipts of a server without a URL needs an absolute result_endpoint "
            "(http(s)://host/path/{job_id})"
        )
    try:
        return urljoin(server_url, url)
    except ValueError:
        raise PermanentPollError(f"server {cfg.name!r}: result_endpoint is not a valid URL path") from None


def _server_url(cfg: ServerConfig) -> str | None:
    """The server's URL with its {env:NAME} parts resolved (a relative result endpoint is resolved against it)."""
    if not cfg.url:
        return None
    try:
        return resolve_url(cfg.url, server=cfg.name)
    except SecretMissing as exc:  # its message names the variable, never a value
        raise PermanentPollError(str(exc)) from None


def _trusted_status_url(cfg: ServerConfig, status_url: str) -> str | None:
    template = cfg.result_endpoint or ""
    configured = template if _is_absolute(template) else None
    server_url = _server_url(cfg)
    base = server_url or configured
    if base is None:
        log.warning("server %s: ignoring a receipt's status URL: the server has no URL to resolve it on", cfg.name)
        return None
    try:
        url = urljoin(base, status_url)
    except ValueError:
        log.warning("server %s: ignoring a receipt's status URL that is not a valid URL", cfg.name)
        return None
    trusted = {_origin(u) for u in (server_url, configured) if u} - {None}
    if _is_absolute(url) and _origin(url) in trusted:
        return url
    log.warning("server %s: ignoring a receipt's status URL on another origin: %s", cfg.name, redact_url(url))
    return None


def _is_absolute(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme
    except ValueError:
        return "?"


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port


def _origin_text(url: str) -> str:
    origin = _origin(url)
    return f"{origin[0]}://{origin[1]}:{origin[2]}" if origin else "<unknown origin>"


# -- one poll --------------------------------------------------------------------------------------------------


def default_http_client() -> httpx.AsyncClient:
    """A client for polling: short timeouts (a poll is a cheap read, retried by the loop) and no auto-redirects."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(15.0, connect=5.0),
        follow_redirects=False,
        # Keep every connection alive: polling reopens them constantly otherwise (see dispatcher's poll slots).
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    )


class ReceiptPoller:
    """Polls one server's result endpoint. Holds no state between polls: the loop around it decides when."""

    def __init__(self, cfg: ServerConfig, http: httpx.AsyncClient) -> None:
        self.cfg = cfg
        self.http = http

    async def poll_once(self, receipt: Receipt) -> PollOutcome:
        url = endpoint_for(self.cfg, receipt)
        response = await self._get(url)
        if response.is_redirect:
            url = self._redirect_target(url, response)
            response = await self._get(url)
            if response.is_redirect:
                raise PermanentPollError(
                    f"server {self.cfg.name!r}: the result endpoint {redact_url(url)} redirected more than once",
                    status_code=response.status_code,
                )
        self._check_status(url, response)
        try:
            body = response.json()
        except ValueError:
            raise PermanentPollError(
                f"server {self.cfg.name!r}: the result endpoint {redact_url(url)} answered HTTP "
                f"{response.status_code} with a body that is not JSON",
                status_code=response.status_code,
            ) from None
        if receipt.profile == "n8n" or _looks_like_n8n_execution(body):
            return parse_n8n_execution(body)
        return parse_generic_status(body)

    async def _get(self, url: str) -> httpx.Response:
        try:
            headers = resolve_refs(self.cfg.headers, what="header", server=self.cfg.name)
        except SecretMissing as exc:  # its message names the variable, never a value
            raise PermanentPollError(str(exc)) from None
        headers.setdefault("Accept", "application/json")
        try:
            return await self.http.get(url, headers=headers, follow_redirects=False)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            raise PermanentPollError(f"server {self.cfg.name!r}: cannot poll {redact_url(url)}") from None
        except httpx.TimeoutException as exc:
            raise TransientPollError(
                f"server {self.cfg.name!r}: polling {redact_url(url)} timed out ({type(exc).__name__})"
            ) from None
        except httpx.RequestError as exc:
            # The exception's own text may hold the full URL; its type says enough.
            raise TransientPollError(
                f"server {self.cfg.name!r}: polling {redact_url(url)} failed ({type(exc).__name__})"
            ) from None

    def _redirect_target(self, url: str, response: httpx.Response) -> str:
        location = response.headers.get("location")
        if not location:
            raise PermanentPollError(
                f"server {self.cfg.name!r}: the result endpoint {redact_url(url)} redirected without a Location",
                status_code=response.status_code,
            )
        try:
            target = urljoin(url, location)
        except ValueError:
            target = ""
        if not _is_absolute(target) or _origin(target) is None or _origin(target) != _origin(url):
            # Only the origin is named: the target's path or query may carry a token meant for someone else.
            raise PermanentPollError(
                f"server {self.cfg.name!r}: the result endpoint {redact_url(url)} redirected to another origin "
                f"({_origin_text(target)}); not followed",
                status_code=response.status_code,
            )
        return target

    def _check_status(self, url: str, response: httpx.Response) -> None:
        code = response.status_code
        where = f"server {self.cfg.name!r}: the result endpoint {redact_url(url)} answered HTTP {code}"
        if 200 <= code < 300:
            return
        if code == 404:
            # A job may become visible only after its receipt was sent (a queue that records it when a worker
            # picks it up, a lagging replica behind the API), so a young job's 404 is worth another try. The
            # loop's own limits end a 404 that persists.
            raise TransientPollError(f"{where} (not found yet)", status_code=code)
        if code in (408, 429) or code >= 500:
            raise TransientPollError(where, status_code=code, retry_after=_retry_after(response))
        hint = " (check the server's headers, e.g. its API key)" if code in (401, 403) else ""
        raise PermanentPollError(where + hint, status_code=code)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date is rare here; the loop's backoff covers it
    return seconds if seconds >= 0 else None


# -- reading a status document ---------------------------------------------------------------------------------


def parse_generic_status(body: Any) -> PollOutcome:
    """A generic status document: `status`/`state`, the answer in `result|output|data|answer|response`."""
    record = body[0] if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict) else body
    if not isinstance(record, dict):
        # A bare value on 2xx is the answer itself (endpoints that 404 until the result exists).
        return PollOutcome(True, True, _answer_result(record), None, None, body)
    status = _status_of(record)
    if status is not None and status not in DONE_STATUSES:
        return PollOutcome(False, False, None, None, status, body)
    if status in FAILURE_STATUSES:
        return PollOutcome(
            True, False, None, _error_text(record) or f"the job ended with status {status}", status, body
        )
    # Done, or no status at all: a document without one is taken to be the result itself.
    return PollOutcome(True, True, _answer_result(_generic_answer(record)), None, status, body)


def _generic_answer(record: dict[str, Any]) -> Any:
    for key in ANSWER_FIELDS:
        if record.get(key) is not None:
            return record[key]
    rest = {k: v for k, v in record.items() if k not in _POLL_BOOKKEEPING}
    if not rest and isinstance(record.get("message"), str):
        return record["message"]
    return rest


def _error_text(record: dict[str, Any]) -> str | None:
    for key in ("error", "message"):
        value = record.get(key)
        if isinstance(value, dict):
            value = value.get("message")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _looks_like_n8n_execution(body: Any) -> bool:
    # Lets an `auto` receipt read n8n's API when the operator pointed result_endpoint at it.
    data = body.get("data") if isinstance(body, dict) else None
    return isinstance(data, dict) and "finished" in body and isinstance(data.get("resultData"), dict)


def parse_n8n_execution(body: Any) -> PollOutcome:
    """n8n's `GET /api/v1/executions/{id}?includeData=true`: done, ok, and the last executed node's output."""
    if not isinstance(body, dict):
        raise PermanentPollError("the n8n executions API answered something other than an execution object")
    status = body.get("status") if isinstance(body.get("status"), str) else None
    status = status.lower() if status else None
    finished = body.get("finished") is True
    result_data = _dig(body, "data", "resultData")
    error = _dig(result_data, "error", "message")
    error = error if isinstance(error, str) and error else None
    if not (finished or status in N8N_DONE_STATUSES):
        return PollOutcome(False, False, None, None, status, body)
    if status in N8N_DONE_STATUSES - {"success"}:
        ok = False
    elif status == "success":
        ok = True
    else:
        ok = finished and error is None
    if not ok:
        return PollOutcome(True, False, None, error or f"the n8n execution ended with status {status}", status, body)
    found, answer = _last_node_output(result_data)
    if not found:
        return PollOutcome(
            True,
            False,
            None,
            "the n8n execution succeeded but returned no output: poll with includeData=true, and make sure the "
            "workflow saves the data of successful executions",
            status,
            body,
        )
    return PollOutcome(True, True, _answer_result(answer), None, status, body)


def _last_node_output(result_data: Any) -> tuple[bool, Any]:
    last = _dig(result_data, "lastNodeExecuted")
    runs = _dig(result_data, "runData", last) if isinstance(last, str) else None
    if not isinstance(runs, list) or not runs:
        return False, None
    # A node inside a loop runs several times: the last run holds the final output.
    main = _dig(runs[-1], "data", "main")
    if not isinstance(main, list):
        return False, None
    # An IF/Switch node's output may be on a later branch: take the first branch with items.
    items = next((branch for branch in main if isinstance(branch, list) and branch), [])
    values = [item.get("json") for item in items if isinstance(item, dict)]
    return True, values[0] if len(values) == 1 else values


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _answer_result(answer: Any) -> ToolResult:
    text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
    structured = answer if isinstance(answer, dict | list) else None
    return ToolResult(text=text, structured=structured, content=[{"type": "text", "text": text}])
