"""Logs that say which call they are about: context fields (job id, server, tool, room) and a JSON format.

Context lives in a `contextvars` variable, so it follows the code that runs for a call: a task created while
`log_context(...)` is active (a job's own task, say) carries the fields on every line it logs, and so do the
tasks it creates. A `ContextFilter` copies the fields onto each record; any formatter can then show them,
ours (`LOG_FORMAT=json`: one JSON object per line) or another framework's (LiveKit's JSON and coloured
formats print a record's extra attributes).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from mcp_integration.scrubber import install_log_scrubber

__all__ = [
    "CONTEXT_KEYS",
    "FORMATS",
    "TEXT_FORMAT",
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "bind",
    "context_with",
    "formatter",
    "install_context_filter",
    "log_context",
    "log_format",
    "outside_job",
    "record_fields",
    "setup_logging",
    "unbind",
    "use_json_on",
]


FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Shown first, in this order; other context fields follow.
CONTEXT_KEYS = ("job_id", "server", "tool", "room")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_fields: ContextVar[Mapping[str, Any]] = ContextVar("voice_mcp_log_fields", default=_EMPTY)

# The attributes every LogRecord has; anything else on a record is an extra field worth showing.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def bind(**fields: Any) -> Token[Mapping[str, Any]]:
    """Add fields to the current context (None values are left out). Returns a token for `unbind`."""
    return _fields.set(_merged(fields))


def _merged(fields: dict[str, Any]) -> Mapping[str, Any]:
    # Read-only: a context copied into a task shares this mapping with its parent.
    return MappingProxyType({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: Token[Mapping[str, Any]]) -> None:
    _fields.reset(token)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """The fields apply inside the block, and to every task created inside it for as long as it runs."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def context_with(**fields: Any) -> contextvars.Context:
    """A copy of the current context with these fields added, for a task to run in (`create_task(context=)`):
    what `log_context` around the task's creation gives, without binding and unbinding them here."""
    ctx = contextvars.copy_context()
    ctx.run(_fields.set, _merged(fields))
    return ctx


def outside_job() -> contextvars.Context:
    """A copy of the current context without a job's fields, for the long-lived tasks a job may happen to start
    (a connection's runner, its liveness watch, a rediscovery): their lines are about the server, not that job."""
    ctx = contextvars.copy_context()
    kept = MappingProxyType({k: v for k, v in _fields.get().items() if k not in ("job_id", "tool")})
    ctx.run(_fields.set, kept)
    return ctx


class ContextFilter(logging.Filter):
    """Copies the context fields onto each record. Never overwrites an attribute the record already has: an
    explicit `extra=`, or fields set in another process (LiveKit forwards job-process records to its parent)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _fields.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context and extra fields of a record, the well-known ones first."""
    extra = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}
    for key, value in _fields.get().items():
        extra.setdefault(key, value)
    ordered = {k: extra.pop(k) for k in CONTEXT_KEYS if k in extra}
    ordered.update(extra)
    return ordered


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, name (the logger), message, then the context and extra fields.

    The key names are LiveKit's (its production format, `python agent.py start`): the worker's lines and those
    of our CLI and status page then share one schema in a log pipeline."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "name": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            out.setdefault(key, value)
        # The scrubbed rendering made with the record (secrets.py), when there is one.
        if record.exc_text:
            out["exc_info"] = record.exc_text
        elif record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        # default=str: an extra field that JSON cannot hold is shown as text rather than losing the line.
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain format; a line about a call ends with its context, like `[job_id=… server=demo tool=echo]`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in record_fields(record).items() if k in CONTEXT_KEYS}
        if not fields:
            return line
        first, sep, rest = line.partition("\n")  # after the message, before any traceback
        return f"{first} [{' '.join(f'{k}={v}' for k, v in fields.items())}]{sep}{rest}"


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler `setup_logging` installed, so a second call replaces it instead of adding another."""


def log_format(fmt: str) -> str:
    """The format asked for (Settings.log_format: LOG_FORMAT, else text); a clear ValueError for anything else."""
    chosen = fmt.strip().lower()
    if chosen not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(FORMATS)}, not {chosen!r}")
    return chosen


def formatter(fmt: str = "text") -> logging.Formatter:
    return JsonFormatter() if log_format(fmt) == "json" else TextFormatter()


def setup_logging(
    fmt: str = "text", level: int | str = logging.INFO, *, stream: TextIO | None = None, force: bool = False
) -> bool:
    """Log to `stream` (stderr) in the chosen format, with context fields on every line.

    Like `logging.basicConfig`, it leaves a root logger that someone else already configured alone (a host
    framework, pytest's capture) unless `force`; it returns whether it installed its handler. Calling it again
    replaces the handler it installed before."""
    install_log_scrubber()  # before anything is logged: no secret this process resolves reaches a line
    chosen = formatter(fmt)
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _OurHandler)]
    if not force and len(ours) < len(root.handlers):
        return False
    for handler in ours:
        root.removeHandler(handler)
    handler = _OurHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(chosen)
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    return True


def install_context_filter(logger: logging.Logger | None = None) -> None:
    """Add the context filter to every handler of `logger` (the root): for hosts that own the handlers, such
    as a LiveKit worker, whose formats then show the fields. Safe to call more than once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())


def use_json_on(logger: logging.Logger | None = None) -> int:
    """Switch the plain stream handlers of `logger` (the root) that do not write JSON yet to our JSON format;
    returns how many. For a host that installed its own handler: replacing its formatter keeps one handler, so
    no line is written twice. A handler already writing JSON (LiveKit's production format) is left as it is."""
    count = 0
    for handler in (logger or logging.getLogger()).handlers:
        plain = type(handler) is logging.StreamHandler or isinstance(handler, _OurHandler)
        if plain and not _writes_json(handler.formatter):
            handler.setFormatter(JsonFormatter())
            count += 1
    install_context_filter(logger)
    return count


def _writes_json(fmt: logging.Formatter | None) -> bool:
    # Asking the formatter itself works for any framework's formatter, with no import of that framework.
    if fmt is None:
        return False
    probe = logging.LogRecord("probe", logging.INFO, __file__, 0, "probe", None, None)
    try:
        return isinstance(json.loads(fmt.format(probe)), dict)
    except ValueError:
        return False
