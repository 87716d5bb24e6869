"""Every failure this package reports: one tree, rooted at `VoiceMcpError`.

- `ToolCallError` — a tool call that failed, with a `kind` (what went wrong, as the caller is told) and a reason
  fit to tell a person; `CircuitOpen` is one refused without trying.
- `ConnectError` and its kinds — a server that could not be reached, or stopped being reachable.
- `RegistryError` — the registry refused an operation (bad input, a clash); its message is shown as it is.
- `SecretMissing` — an `env:NAME` reference to a variable that is not set.

(`tasks.TaskError` is a protocol error, and so an `mcp` `MCPError`, like the SDK's own.)
"""

from __future__ import annotations

from typing import Literal

from mcp_integration.limits import MAX_REASON_CHARS, cut_text
from mcp_integration.scrubber import scrub

__all__ = [
    "Busy",
    "CircuitOpen",
    "ConnectError",
    "ConnectionLost",
    "ErrorKind",
    "NeedsLogin",
    "Reconnecting",
    "RegistryError",
    "SecretMissing",
    "ToolCallError",
    "Unauthorized",
    "VoiceMcpError",
]

# What went wrong with a tool call, as the caller will be told (speech.error_sentence has a sentence for each).
ErrorKind = Literal[
    "unknown_tool",
    "unknown_server",
    "unknown_job",
    "invalid_arguments",
    "unreachable",
    "unauthorized",
    "needs_login",
    "server_error",
    "tool_error",
    "timeout",
    "cancelled",
]


class VoiceMcpError(Exception):
    """The root of every error this package raises on purpose."""


class ToolCallError(VoiceMcpError):
    """Every failure of a tool call, with the server, the tool and a reason fit to tell a person.

    `kind` says what went wrong: unknown_tool, invalid_arguments, unreachable, unauthorized (the server refused
    our credentials: HTTP 401/403), server_error, tool_error, timeout, cancelled.
    """

    def __init__(self, server: str | None, tool: str, reason: str, kind: ErrorKind = "server_error") -> None:
        self.server = server
        self.tool = tool
        # A server's error message is its own text: bounded, storable in mcp_jobs (no NUL), and never carrying a
        # credential of ours (a server may echo the header it refused).
        self.reason = reason = cut_text(scrub(str(reason)), MAX_REASON_CHARS)
        self.kind = kind
        where = f"{server}/{tool}" if server else tool
        super().__init__(f"{where}: {reason}")

    def __copy__(self) -> ToolCallError:
        # The same error as a new exception (not by __init__: the message is already made, and a subclass may
        # take other arguments): a job raises a copy of its error to each waiter (see Job.wait).
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        new.args = self.args
        new.__cause__, new.__suppress_context__ = self.__cause__, self.__suppress_context__
        return new


class CircuitOpen(ToolCallError):
    """A call refused without trying, because its server's breaker says it is down."""


class ConnectError(VoiceMcpError):
    """The server could not be reached or refused the MCP handshake."""


class Reconnecting(ConnectError):
    """Opening failed recently: no new attempt before the backoff has passed (`retry_in` seconds from now)."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class Unauthorized(ConnectError):
    """The server refused our credentials (HTTP 401 or 403): no retry will help until they change."""

    def __init__(self, server: str, status: int) -> None:
        super().__init__(f"server {server!r} needs authorization (HTTP {status})")
        self.status = status


class NeedsLogin(ConnectError):
    """An OAuth server whose tokens we lack or can no longer refresh, or that asks for a scope only a person can
    grant: `servers login NAME` fixes it; no retry will. `scope` names what the server asked for, when it did."""

    def __init__(self, server: str, reason: str = "", scope: str | None = None) -> None:
        wanted = f" with scope {scope!r}" if scope else ""
        because = f" ({reason})" if reason else ""
        super().__init__(
            f"server {server!r} needs a login{wanted}{because}: run `python -m mcp_integration servers login {server}`"
        )
        self.server = server
        self.reason = reason
        self.scope = scope


class Busy(ConnectError):
    """A serial server is working on a request of ours: a ping would wait behind it and prove nothing."""


class ConnectionLost(ConnectError):
    """The connection dropped, or the server stopped answering, while a request waited; `reason` says which."""

    def __init__(self, server: str, reason: str) -> None:
        super().__init__(f"server {server!r}: {reason}")
        self.reason = reason


class RegistryError(VoiceMcpError):
    """A registry operation was refused; the message is fit to show a user as is."""


class SecretMissing(VoiceMcpError):
    """An `env:NAME` reference names a variable that is not set. The message names the variable, not a value."""
