"""The one place that reaches into the `mcp` SDK's private surface; checked when imported.

What we use that the SDK does not export publicly, and why:
- `ClientSession._stamp` and `ClientSession._dispatcher.send_raw_request`: a 2025-11-25 `tools/call` with
  `params.task` is answered with `CreateTaskResult`, which the typed `send_request` rejects (it checks every
  tools/call answer as CallToolResult), and a `subscriptions/listen` with a `taskIds` filter must carry an id we
  choose. The SDK's own `mcp.client.subscriptions.listen` takes this same path.
- `TransportStreams` (the stream pair a transport yields): typed only in `mcp.client._transport`.
- The OAuth providers' protected hooks, overridden by `oauth.py` as the SDK's own extensions override them
  (`OAUTH_HOOKS`), and the `OAuthContext` fields it reads: tokens shared by workers need the stored expiry and
  metadata restored, the refresh run under a lock, and a worker kept from prompting.
- `mcp.client.session._build_call_tool_adapter`, memoised: on a 2026-07-28 connection with our tasks extension
  the SDK builds a pydantic `TypeAdapter` for `tools/call` answers on every connect (~0.3 ms of CPU, the same
  adapter each time); twenty servers connecting at once queue behind it on one event loop.

The versions of the SDK this was tested with are pinned in constraints.txt; an SDK without these names fails at
import with a message that says so (tests/test_architecture.py checks it), not deep inside a call.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from mcp.client import Transport
from mcp.client import session as _session_module
from mcp.client._input_required import run_input_required_driver
from mcp.client._transport import TransportStreams
from mcp.client.session import ClientRequestContext, ClientSession

if TYPE_CHECKING:
    from mcp.shared.dispatcher import CallOptions

__all__ = [
    "OAUTH_CONTEXT_FIELDS",
    "OAUTH_HOOKS",
    "TESTED_MCP",
    "Transport",
    "TransportStreams",
    "drive_input_required",
    "mcp_version",
    "send_raw_request",
]

log = logging.getLogger(__name__)

# The SDK release the private surface below was read in and tested against (constraints.txt pins it).
TESTED_MCP = "2.3.0"


OAUTH_HOOKS = (
    "_auth_flow",
    "_initialize",
    "_perform_authorization",
    "_expected_issuer",
    "_refresh_token",
    "_handle_refresh_response",
)
OAUTH_CONTEXT_FIELDS = (
    "server_url",
    "client_metadata",
    "current_tokens",
    "token_expiry_time",
    "oauth_metadata",
    "protected_resource_metadata",
    "auth_server_url",
    "client_info",
    "lock",
)


def mcp_version() -> str:
    return version("mcp")


def missing() -> list[str]:
    """The private names this module needs that the installed SDK lacks (empty when all are there). The session's
    attributes are set in its __init__, so they are looked for there."""
    import dataclasses

    from mcp.client.auth import OAuthClientProvider
    from mcp.client.auth.oauth2 import OAuthContext
    from mcp.shared import jsonrpc_dispatcher

    init = inspect.getsource(ClientSession.__init__)
    provider_init = inspect.getsource(OAuthClientProvider.__init__)
    context_fields = {f.name for f in dataclasses.fields(OAuthContext)}
    needed = {
        "ClientSession._stamp": "self._stamp" in init,
        "ClientSession._dispatcher": "self._dispatcher" in init,
        "JSONRPCDispatcher.send_raw_request": hasattr(
            getattr(jsonrpc_dispatcher, "JSONRPCDispatcher", None), "send_raw_request"
        ),
        "OAuthClientProvider._initialized": "self._initialized" in provider_init,
        "ClientSession.dispatch_input_request": hasattr(ClientSession, "dispatch_input_request"),
        "mcp.client.session._build_call_tool_adapter": callable(
            getattr(_session_module, "_build_call_tool_adapter", None)
        ),
        **{f"OAuthClientProvider.{hook}": hasattr(OAuthClientProvider, hook) for hook in OAUTH_HOOKS},
        **{f"OAuthContext.{name}": name in context_fields for name in OAUTH_CONTEXT_FIELDS},
    }
    return [name for name, found in needed.items() if not found]


_gone = missing()
if _gone:
    raise ImportError(
        f"the installed mcp SDK ({mcp_version()}) lacks {', '.join(_gone)}, which voice-mcp uses (tasks, OAuth); "
        f"install the version in constraints.txt (mcp=={TESTED_MCP})"
    )
if mcp_version() != TESTED_MCP:
    log.warning("mcp SDK %s is installed; voice-mcp was tested with %s (constraints.txt)", mcp_version(), TESTED_MCP)

# Different claim sets a process meets (ours has one: the tasks extension's); a bound, not a tuning knob.
_ADAPTERS_KEPT = 32


def _memoised(build: Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
    """The SDK's adapter builder, answering a claim set it has built before with the same adapter. The adapter
    depends only on each claim's tag and model (its discriminator routes by the tags alone), and a `TypeAdapter`
    is immutable, so sessions may share one."""
    built: dict[tuple[tuple[str, Any], ...], Any] = {}

    @functools.wraps(build)
    def cached(active: Mapping[str, Any]) -> Any:
        key = tuple((tag, claim.model) for tag, claim in active.items())
        adapter = built.get(key)
        if adapter is None:
            adapter = build(active)
            if len(built) < _ADAPTERS_KEPT:
                built[key] = adapter
        return adapter

    cached.memoised = True  # type: ignore[attr-defined]
    return cached


if not getattr(_session_module._build_call_tool_adapter, "memoised", False):  # pyright: ignore[reportPrivateUsage]
    _session_module._build_call_tool_adapter = _memoised(_session_module._build_call_tool_adapter)  # pyright: ignore[reportPrivateUsage]


async def send_raw_request(
    session: ClientSession,
    method: str,
    params: dict[str, Any],
    *,
    timeout: float | None = None,
    on_progress: Any = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Send a request through the session (its envelope stamped as the SDK stamps its own) and return the raw
    answer, unchecked."""
    data: dict[str, Any] = {"method": method, "params": params}
    opts: CallOptions = {}
    if timeout is not None:
        opts["timeout"] = timeout
    if on_progress is not None:
        opts["on_progress"] = on_progress
    if request_id is not None:
        opts["request_id"] = request_id
    session._stamp(data, opts)  # pyright: ignore[reportPrivateUsage]
    return await session._dispatcher.send_raw_request(method, data.get("params"), opts)  # pyright: ignore[reportPrivateUsage]


async def drive_input_required(session: ClientSession, first: Any, retry: Any) -> Any:
    """A 2026-07-28 `input_required` answer (SEP-2322) resolved by the SDK's own driver: each embedded request
    goes through the session's callbacks (elicitation, sampling, roots) as a server's request would, and the call
    is retried with the answers. `Client.call_tool` does this for plain calls; our tasks runtime sends its calls
    on the session, so it drives the loop itself here. Returns the first answer that is not `input_required`."""

    async def dispatch(key: str, request: Any) -> Any:
        meta = request.params.meta if getattr(request, "params", None) else None
        return await session.dispatch_input_request(
            ClientRequestContext(session=session, request_id=key, meta=meta), request
        )

    return await run_input_required_driver(first, dispatch=dispatch, retry=retry)
