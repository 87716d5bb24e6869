"""The one place that reaches into the `mcp` SDK's private surface; checked when imported.

What we use that the SDK does not export publicly, and why:
- `ClientSession._stamp` and `ClientSession._dispatcher.send_raw_request`: a 2025-11-25 `tools/call` with
  `params.task` is answered with `CreateTaskResult`, which the typed `send_request` rejects (it checks every
  tools/call answer as CallToolResult), and a `subscriptions/listen` with a `taskIds` filter must carry an id we
  choose. The SDK's own `mcp.client.subscriptions.listen` takes this same path.
- `TransportStreams` (the stream pair a transport yields): typed only in `mcp.client._transport`.

The versions of the SDK this was tested with are pinned in constraints.txt; an SDK without these names fails at
import with a message that says so (tests/test_architecture.py checks it), not deep inside a call.
"""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from mcp.client import Transport
from mcp.client._transport import TransportStreams
from mcp.client.session import ClientSession

if TYPE_CHECKING:
    from mcp.shared.dispatcher import CallOptions

__all__ = ["TESTED_MCP", "Transport", "TransportStreams", "mcp_version", "send_raw_request"]

log = logging.getLogger(__name__)

# The SDK release the private surface below was read in and tested against (constraints.txt pins it).
TESTED_MCP = "2.3.0"


def mcp_version() -> str:
    return version("mcp")


def missing() -> list[str]:
    """The private names this module needs that the installed SDK lacks (empty when all are there). The session's
    attributes are set in its __init__, so they are looked for there."""
    from mcp.shared import jsonrpc_dispatcher

    init = inspect.getsource(ClientSession.__init__)
    needed = {
        "ClientSession._stamp": "self._stamp" in init,
        "ClientSession._dispatcher": "self._dispatcher" in init,
        "JSONRPCDispatcher.send_raw_request": hasattr(
            getattr(jsonrpc_dispatcher, "JSONRPCDispatcher", None), "send_raw_request"
        ),
    }
    return [name for name, found in needed.items() if not found]


_gone = missing()
if _gone:
    raise ImportError(
        f"the installed mcp SDK ({mcp_version()}) lacks {', '.join(_gone)}, which voice-mcp's task runtime uses; "
        f"install the version in constraints.txt (mcp=={TESTED_MCP})"
    )
if mcp_version() != TESTED_MCP:
    log.warning("mcp SDK %s is installed; voice-mcp was tested with %s (constraints.txt)", mcp_version(), TESTED_MCP)


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
