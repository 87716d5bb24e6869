"""One line, fit for a person, about an exception: what the logs, the CLI, the health rows and the caller see
instead of a class name or a traceback."""

from __future__ import annotations

from mcp.shared.exceptions import MCPError

from mcp_integration.errors import VoiceMcpError
from mcp_integration.secrets import redact_url

__all__ = ["describe", "refused_status"]


def describe(exc: BaseException) -> str:
    """A one-line reason for an exception, fit for a person: the exception groups anyio raises unwrapped, and
    HTTP failures said as their status, never as a class name."""
    exc = _innermost(exc)
    if isinstance(exc, VoiceMcpError):
        return str(exc)  # ours: already a sentence
    if isinstance(exc, MCPError):
        return f"MCP error {exc.error.code}: {exc.error.message}"
    status = _http_status(exc)
    if status is not None and 300 <= status < 400:
        # The SDK (HTTP, SSE) and our WebSocket client follow a redirect only within the server's origin.
        location = getattr(getattr(exc, "response", None), "headers", {}).get("location", "")
        return f"the server redirected to another origin ({redact_url(location) or '?'}); not followed"
    if status is not None:
        return f"the server answered HTTP {status}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def refused_status(exc: BaseException) -> int | None:
    """401 or 403 when the exception is an HTTP answer refusing our credentials."""
    status = _http_status(_innermost(exc))
    return status if status in (401, 403) else None


def _innermost(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _http_status(exc: BaseException) -> int | None:
    # httpx2.HTTPStatusError (SSE), websockets' InvalidStatus (a refused WebSocket handshake): both carry the answer.
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) and not isinstance(exc, MCPError) else None
