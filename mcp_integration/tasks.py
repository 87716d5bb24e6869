"""The MCP tasks runtime, client side: both task dialects behind one small interface.

- **2026-ext** (`io.modelcontextprotocol/tasks`, SEP-2663, on 2026-07-28 connections): the client declares the
  extension (in every request's `_meta`, which the SDK stamps from `Client(extensions=...)`); the server may
  answer any `tools/call` with `{resultType: "task", taskId, status, pollIntervalMs, ttlMs, ...}`, which the SDK
  hands us through our `ResultClaim`; `tasks/get` returns the status and, once completed, the result inline;
  `tasks/cancel` asks for cancellation. Every `tasks/*` request carries `Mcp-Name: <taskId>` on HTTP (through
  the SDK's public `Request.name_param`). Status pushes exist only on a `subscriptions/listen` stream with a
  `taskIds` filter, and only where the server acknowledges it.
- **2025-11-25** (core `tasks` utility, on handshake connections): when the server declares
  `capabilities.tasks.requests.tools.call` and the tool's `execution.taskSupport` is optional or required, the
  call carries `params.task {ttl}` and the answer is `CreateTaskResult {task: {...}}`; then `tasks/get`,
  `tasks/result` (the payload) and `tasks/cancel`; the server may push `notifications/tasks/status`.

Each task request (get, result, cancel) is one round trip with a bounded timeout; how long a call and its task
may take is the job engine's to bound (its wait policy).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import mcp_types as types
from mcp.client.extension import ClaimContext, ClientExtension, NotificationBinding, ResultClaim
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY
from mcp_types import INTERNAL_ERROR, INVALID_REQUEST
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from mcp_integration.aio import spawn
from mcp_integration.mcp_compat import drive_input_required, send_raw_request

if TYPE_CHECKING:
    from mcp.client.session import ClientSession

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT_S",
    "DEFAULT_TASK_TTL_MS",
    "DIALECT_2025",
    "DIALECT_2026",
    "STATUSES",
    "STATUS_METHODS",
    "TASKS_EXTENSION",
    "TERMINAL",
    "CreatedTask2026",
    "ProgressCallback",
    "StatusCallback",
    "TaskClient",
    "TaskError",
    "TaskHandle",
    "TaskStatus",
    "TasksExtension",
    "result_text",
    "status_from_wire",
    "task_support",
]


log = logging.getLogger(__name__)

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
DIALECT_2026 = "2026-ext"
DIALECT_2025 = "2025-11-25"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
STATUSES = frozenset({"working", "input_required", *TERMINAL})
# 2025-11-25 names it notifications/tasks/status; the extension's current draft says notifications/tasks.
STATUS_METHODS = ("notifications/tasks/status", "notifications/tasks")
DEFAULT_REQUEST_TIMEOUT_S = 30.0
# How long a 2025 server should keep a task (params.task.ttl): long enough for a late answer to be spoken.
DEFAULT_TASK_TTL_MS = 3_600_000
# Pushed statuses kept for a late subscriber (a push can land between call_tool returning and subscribe).
_KEEP_LATEST = 1024

ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None]]
StatusCallback = Callable[["TaskStatus"], None]
_T = TypeVar("_T")
_RAW: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


class TaskError(MCPError):
    """A task request that cannot be made, or an answer that makes no sense; the message says which and why.

    An `MCPError`, so callers that already handle the SDK's errors handle these too.
    """

    def __init__(self, message: str, code: int = INVALID_REQUEST) -> None:
        super().__init__(code, message)


@dataclass(frozen=True)
class TaskStatus:
    task_id: str
    status: str  # working | input_required | completed | failed | cancelled
    message: str | None
    poll_interval_s: float | None  # what the server asks (pollInterval / pollIntervalMs), None if unsaid
    result: types.CallToolResult | None = None  # set when the dialect delivers it inline (2026)
    error: str | None = None
    error_code: int | None = None  # the JSON-RPC code of a 2026 `failed` task's error
    updated_at: str | None = None  # lastUpdatedAt, as the server wrote it

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class TaskHandle:
    dialect: str  # "2026-ext" | "2025-11-25"
    task_id: str
    first: TaskStatus
    tool: str | None = None


# -- wire models -------------------------------------------------------------------------------------------------


class CreatedTask2026(types.Result):
    """The claimed `tools/call` answer of the 2026 extension: a flat CreateTaskResult, `resultType: "task"`."""

    model_config = ConfigDict(extra="allow")

    result_type: Literal["task"]
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str | None = None
    last_updated_at: str | None = None
    ttl_ms: float | None = None
    poll_interval_ms: float | None = None


class _GetTask2026(types.Request[types.GetTaskRequestParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: types.GetTaskRequestParams
    # The SDK mirrors this params key into `Mcp-Name` (SEP-2663: MUST on HTTP); its stamp does not for tasks/*.
    name_param = "taskId"


class _CancelTask2026(types.Request[types.CancelTaskRequestParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: types.CancelTaskRequestParams
    name_param = "taskId"


class _AnyParams(BaseModel):
    """Notification params kept whole: both dialects' task shapes, validated by `status_from_wire`."""

    model_config = ConfigDict(extra="allow")


def status_from_wire(raw: Mapping[str, Any], dialect: str, *, task_id: str | None = None) -> TaskStatus:
    """A TaskStatus from a task object of either dialect (CreateTaskResult.task, tasks/get, a status push)."""
    tid = raw.get("taskId", task_id)
    status = raw.get("status")
    if not isinstance(tid, str) or not tid or status not in STATUSES:
        raise TaskError(f"malformed task from the server: taskId={tid!r} status={status!r}", INTERNAL_ERROR)
    message = raw.get("statusMessage")
    message = message if isinstance(message, str) and message else None
    poll = raw.get("pollIntervalMs") if "pollIntervalMs" in raw else raw.get("pollInterval")
    poll_s = poll / 1000 if isinstance(poll, int | float) and not isinstance(poll, bool) and poll > 0 else None
    updated = raw.get("lastUpdatedAt")
    result: types.CallToolResult | None = None
    error: str | None = None
    error_code: int | None = None
    inline = raw.get("result")
    if dialect == DIALECT_2026 and status == "completed" and isinstance(inline, dict):
        try:
            result = types.CallToolResult.model_validate(inline, by_name=False)
        except ValidationError as exc:
            raise TaskError(f"task {tid}: the inline result is not a CallToolResult ({exc})", INTERNAL_ERROR) from None
        if result.is_error:
            error = result_text(result) or "the tool reported an error"
    if status == "failed":
        err = raw.get("error")
        if isinstance(err, dict):
            error = err.get("message") if isinstance(err.get("message"), str) else None
            error_code = err.get("code") if isinstance(err.get("code"), int) else None
        error = error or message or "the task failed"
    return TaskStatus(
        task_id=tid,
        status=status,
        message=message,
        poll_interval_s=poll_s,
        result=result,
        error=error,
        error_code=error_code,
        updated_at=updated if isinstance(updated, str) else None,
    )


def result_text(result: types.CallToolResult) -> str:
    return "\n".join(item.text for item in result.content if isinstance(item, types.TextContent))


def task_support(tool_meta: Mapping[str, Any] | None) -> str:
    """A tool's `execution.taskSupport` as captured at discovery; absent means forbidden (2025-11-25)."""
    execution = (tool_meta or {}).get("execution")
    value = execution.get("taskSupport") if isinstance(execution, Mapping) else None
    return value if value in ("optional", "required") else "forbidden"


# -- the SDK extension -------------------------------------------------------------------------------------------


class TasksExtension(ClientExtension):
    """What `Client(extensions=...)` folds in: the capability ad, the `resultType: "task"` claim, status pushes.

    The claim is active only on 2026-07-28 connections (the SDK drops the ad elsewhere); the notification
    bindings fire on any connection, because neither revision's core tables define a task status method.
    """

    identifier = TASKS_EXTENSION

    def __init__(self, runtime: TaskClient) -> None:
        self._runtime = runtime

    def claims(self) -> Sequence[ResultClaim[Any]]:
        return _TASK_CLAIMS

    def notifications(self) -> Sequence[NotificationBinding[Any]]:
        return tuple(
            NotificationBinding(method=method, params_type=_AnyParams, handler=self._runtime.on_status_push)
            for method in STATUS_METHODS
        )


@dataclass(eq=False)
class _Listen:
    """One `subscriptions/listen` stream asking for one task's status pushes (2026)."""

    request_id: str
    task_id: str
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    honored: list[str] = field(default_factory=list)
    runner: asyncio.Task[None] | None = None


# -- the runtime -------------------------------------------------------------------------------------------------


class TaskClient:
    """The tasks runtime of one connection. `session` returns the connection's live ClientSession."""

    def __init__(
        self,
        session: Callable[[], ClientSession],
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        task_ttl_ms: int | None = DEFAULT_TASK_TTL_MS,
    ) -> None:
        self._get_session = session
        self.request_timeout = request_timeout
        self.task_ttl_ms = task_ttl_ms
        self._extension = TasksExtension(self)
        self._subs: dict[str, list[StatusCallback]] = {}
        self._latest: OrderedDict[str, TaskStatus] = OrderedDict()
        self._dialects: OrderedDict[str, str] = OrderedDict()
        self._session_seen: ClientSession | None = None
        self._pushes_seen = False
        self._listen_state: Literal["unknown", "offered", "refused"] = "unknown"
        self._listens: dict[str, _Listen] = {}
        self._listens_by_id: dict[str, _Listen] = {}
        self._listen_ids = itertools.count(1)
        self._background: set[asyncio.Task[Any]] = set()

    def extensions(self) -> list[ClientExtension]:
        return [self._extension]

    @property
    def push_available(self) -> bool:
        """Status pushes can be expected: seen on this connection (2025), or a listen stream was honored (2026)."""
        return self._pushes_seen or self._listen_state == "offered"

    # -- calls ---------------------------------------------------------------------------------------------------

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        tool_meta: Mapping[str, Any] | None,
        progress: ProgressCallback | None = None,
    ) -> types.CallToolResult | TaskHandle:
        session = self._session()
        support = task_support(tool_meta)
        if session.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return await self._call_2026(session, name, arguments, progress)
        if support != "forbidden" and self._server_tasks_tools_call(session):
            return await self._call_2025_task(session, name, arguments, progress)
        if support == "required":
            # 2025-11-25: without the server's capability the client MUST NOT augment, and a `required` tool
            # refuses a plain call; sending it anyway would only fail on the server.
            raise TaskError(
                f"tool {name!r} must run as a task, but the server does not declare tasks.requests.tools.call"
            )

        async def plain(on_progress: ProgressCallback | None) -> types.CallToolResult:
            return await session.call_tool(name, arguments, progress_callback=on_progress)

        return await plain(progress)

    async def _call_2026(
        self, session: ClientSession, name: str, arguments: dict[str, Any], progress: ProgressCallback | None
    ) -> types.CallToolResult | TaskHandle:
        async def send(responses: Any = None, state: str | None = None) -> Any:
            return await session.call_tool(
                name,
                arguments,
                progress_callback=progress,
                input_responses=responses,
                request_state=state,
                allow_input_required=True,
                allow_claimed=True,
            )

        answer = await send()
        if isinstance(answer, types.InputRequiredResult):
            # The server needs the caller first (an elicitation): answered, then the call is sent again.
            answer = await drive_input_required(session, answer, send)
        if isinstance(answer, types.CallToolResult):
            return answer
        if isinstance(answer, CreatedTask2026):
            first = status_from_wire(answer.model_dump(by_alias=True, mode="json"), DIALECT_2026)
            self._remember(first.task_id, DIALECT_2026)
            return TaskHandle(DIALECT_2026, first.task_id, first, name)
        raise TaskError(f"tool {name!r}: unexpected answer {type(answer).__name__}", INTERNAL_ERROR)

    async def _call_2025_task(
        self, session: ClientSession, name: str, arguments: dict[str, Any], progress: ProgressCallback | None
    ) -> types.CallToolResult | TaskHandle:
        task: dict[str, Any] = {} if self.task_ttl_ms is None else {"ttl": self.task_ttl_ms}
        params = {"name": name, "arguments": arguments, "task": task}
        raw = await self._send_raw(session, "tools/call", params, timeout=self.request_timeout, on_progress=progress)
        created = raw.get("task")
        if isinstance(created, dict):
            first = status_from_wire(created, DIALECT_2025)
            self._remember(first.task_id, DIALECT_2025)
            return TaskHandle(DIALECT_2025, first.task_id, first, name)
        if "content" in raw:
            # The server ran it inline after all (allowed for an `optional` tool): an ordinary result.
            return _parse(types.CallToolResult, raw, "tools/call")
        raise TaskError(f"tool {name!r}: the server answered a task-augmented call with neither a task nor a result")

    # -- the task methods ----------------------------------------------------------------------------------------

    async def get(self, handle: TaskHandle) -> TaskStatus:
        session = self._session()
        params = types.GetTaskRequestParams(task_id=handle.task_id)
        request = _GetTask2026(params=params) if handle.dialect == DIALECT_2026 else types.GetTaskRequest(params=params)
        raw = await self._request(session, request)
        return status_from_wire(raw, handle.dialect, task_id=handle.task_id)

    async def result(self, handle: TaskHandle) -> types.CallToolResult:
        if handle.dialect == DIALECT_2026:
            status = await self.get(handle)
            if status.status == "completed" and status.result is not None:
                return status.result
            if status.status == "failed":
                raise MCPError(status.error_code or INTERNAL_ERROR, status.error or "the task failed")
            raise TaskError(f"task {handle.task_id} is {status.status}; it has no result")
        # 2025-11-25: tasks/result blocks until the task ends; the job engine asks only once it has.
        session = self._session()
        request = types.GetTaskPayloadRequest(params=types.GetTaskPayloadRequestParams(task_id=handle.task_id))
        return _parse(types.CallToolResult, await self._request(session, request), "tasks/result")

    async def cancel(self, handle: TaskHandle) -> None:
        session = self._session()
        params = types.CancelTaskRequestParams(task_id=handle.task_id)
        if handle.dialect == DIALECT_2026:
            await self._request(session, _CancelTask2026(params=params))
        else:
            await self._request(session, types.CancelTaskRequest(params=params))

    # -- pushes --------------------------------------------------------------------------------------------------

    def subscribe(self, task_id: str, callback: StatusCallback) -> Callable[[], None]:
        self._subs.setdefault(task_id, []).append(callback)
        latest = self._latest.get(task_id)
        if latest is not None:
            _deliver(callback, latest)
        if self._dialects.get(task_id) == DIALECT_2026 and self._listen_state != "refused":
            self._start_listen(task_id)

        def unsubscribe() -> None:
            subs = self._subs.get(task_id)
            if subs is not None and callback in subs:
                subs.remove(callback)
                if not subs:
                    del self._subs[task_id]
                    self._stop_listen(task_id)

        return unsubscribe

    async def on_status_push(self, params: _AnyParams) -> None:
        """A `notifications/tasks[/status]` from the server (the SDK's binding delivers them one at a time)."""
        raw = params.model_dump()
        tid = raw.get("taskId")
        dialect = self._dialects.get(tid) if isinstance(tid, str) else None
        if dialect is None:
            dialect = DIALECT_2026 if "pollIntervalMs" in raw or "ttlMs" in raw else DIALECT_2025
        try:
            status = status_from_wire(raw, dialect)
        except MCPError as exc:
            log.warning("ignoring a task status push: %s", exc)
            return
        self._pushes_seen = True
        previous = self._latest.get(status.task_id)
        # The SDK may dispatch near-simultaneous notifications out of order; a final status is final.
        if previous is not None and previous.terminal:
            return
        self._latest[status.task_id] = status
        self._latest.move_to_end(status.task_id)
        while len(self._latest) > _KEEP_LATEST:
            self._latest.popitem(last=False)
        for callback in list(self._subs.get(status.task_id, ())):
            _deliver(callback, status)
        if status.terminal:
            self._stop_listen(status.task_id)

    def on_message(self, message: Any) -> None:
        """Every message the connection's message_handler sees: listen acknowledgements are ours to read."""
        if not isinstance(message, types.SubscriptionsAcknowledgedNotification):
            return
        sub_id = (message.params.meta or {}).get(SUBSCRIPTION_ID_META_KEY)
        listen = self._listens_by_id.get(sub_id) if isinstance(sub_id, str) else None
        if listen is None:
            return
        ids = (message.params.notifications.model_extra or {}).get("taskIds")
        listen.honored = [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []
        listen.acked.set()

    def _start_listen(self, task_id: str) -> None:
        session = self._session_seen
        if task_id in self._listens or session is None or session.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # subscribed from outside the event loop: polls only
            return
        # Not int-like, so it never collides with the dispatcher's own ids; the ack names it in its `_meta`.
        listen = _Listen(request_id=f"task-listen-{next(self._listen_ids)}", task_id=task_id)
        self._listens[task_id] = listen
        self._listens_by_id[listen.request_id] = listen
        listen.runner = spawn(self._run_listen(session, listen), self._background, detached=False)

    async def _run_listen(self, session: ClientSession, listen: _Listen) -> None:
        params = {"notifications": {"taskIds": [listen.task_id]}}
        stream = asyncio.ensure_future(
            self._send_raw(session, "subscriptions/listen", params, timeout=None, request_id=listen.request_id)
        )
        acked = asyncio.ensure_future(listen.acked.wait())
        try:
            await asyncio.wait({stream, acked}, timeout=self.request_timeout, return_when=asyncio.FIRST_COMPLETED)
            if not listen.acked.is_set() or listen.task_id not in listen.honored:
                # Refused, unacknowledged, or acknowledged without our task: this server does not push task status.
                if self._listen_state == "unknown":
                    self._listen_state = "refused"
                    log.debug("no task status pushes on this connection (listen for %s not honored)", listen.task_id)
                return
            self._listen_state = "offered"
            # The stream lives until the task ends, the subscriber leaves, or the server closes it.
            await asyncio.gather(stream, return_exceptions=True)
        finally:
            for fut in (stream, acked):
                fut.cancel()
            await asyncio.gather(stream, acked, return_exceptions=True)
            if self._listens.get(listen.task_id) is listen:
                del self._listens[listen.task_id]
            self._listens_by_id.pop(listen.request_id, None)

    def _stop_listen(self, task_id: str) -> None:
        listen = self._listens.pop(task_id, None)
        if listen is not None:
            self._listens_by_id.pop(listen.request_id, None)
            if listen.runner is not None:
                listen.runner.cancel()

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _session(self) -> ClientSession:
        session = self._get_session()
        if session is not self._session_seen:
            # A new connection: what we learned about the old one (pushes, listen support) no longer holds.
            self._session_seen = session
            self._pushes_seen = False
            self._listen_state = "unknown"
            for task_id in list(self._listens):
                self._stop_listen(task_id)
        return session

    @staticmethod
    def _server_tasks_tools_call(session: ClientSession) -> bool:
        caps = session.server_capabilities
        tasks = caps.tasks if caps is not None else None
        requests = tasks.requests if tasks is not None else None
        tools = requests.tools if requests is not None else None
        return tools is not None and tools.call is not None

    def _remember(self, task_id: str, dialect: str) -> None:
        self._dialects[task_id] = dialect
        self._dialects.move_to_end(task_id)
        while len(self._dialects) > _KEEP_LATEST:
            self._dialects.popitem(last=False)

    async def _request(self, session: ClientSession, request: types.Request[Any, Any]) -> dict[str, Any]:
        # tasks/* are outside both revisions' core tables, so the SDK sends them without checking the answer's
        # shape; `status_from_wire` and `_parse` do that.
        raw = await session.send_request(request, _RAW, request_read_timeout_seconds=self.request_timeout)  # type: ignore[arg-type]
        return cast("dict[str, Any]", raw)

    async def _send_raw(
        self,
        session: ClientSession,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float | None,
        on_progress: ProgressCallback | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Send a request and return its raw answer, unchecked: where the SDK has no public path (see
        mcp_compat.py)."""
        return await send_raw_request(
            session, method, params, timeout=timeout, on_progress=on_progress, request_id=request_id
        )


def _deliver(callback: StatusCallback, status: TaskStatus) -> None:
    try:
        callback(status)
    except Exception:
        log.exception("task status callback failed for %s", status.task_id)


async def _not_here(created: CreatedTask2026, ctx: ClaimContext) -> types.CallToolResult:
    """The claim's resolver, for `Client.call_tool`: never used here, where `call_tool` hands the task to the job
    engine (waiters.py) instead of resolving it inline; the SDK requires one."""
    raise TaskError(f"task {created.task_id} of {ctx.tool_name!r} is waited for by the job engine, not inline")


# Built once: the SDK folds a client's extensions at every connect, and a ResultClaim checks each field of its
# model as it is made (about 700 bytecodes a connect, for a claim that names no connection).
_TASK_CLAIMS: tuple[ResultClaim[Any], ...] = (
    ResultClaim(result_type="task", model=CreatedTask2026, resolve=_not_here),
)


_M = TypeVar("_M", bound=BaseModel)


def _parse(model: type[_M], raw: Mapping[str, Any], what: str) -> _M:
    try:
        return model.model_validate(raw, by_name=False)
    except ValidationError as exc:
        raise TaskError(
            f"malformed {what} answer from the server: {exc.errors()[0].get('msg')}", INTERNAL_ERROR
        ) from None
