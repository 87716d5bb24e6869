"""The secret values this process holds, and one scrubber that removes them from everything that leaves it.

Every value resolved from a reference (`secrets.py`) is registered here, with the forms it travels in. A log
record factory renders and scrubs every record of every library as it is made (tracebacks too), so no logger or
handler can be missed; errors, rows, CLI output and the status page call `scrub`; a tool's answer gets
`scrub_known` (our values only: the answer is the caller's data, so credential *shapes* are left alone there).

Hand-written: no library knows which values are ours; generic secret scanners guess by shape and miss a plain
password, while we know every value we resolved. Process-wide, as logging is.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import traceback
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = ["MASK", "install_log_scrubber", "known", "scrub", "scrub_known"]

MASK = "***"
# Shorter values are left alone: masking "abc" everywhere would garble ordinary text, and no real credential is
# that short.
MIN_SECRET_CHARS = 6
# Credentials in the shapes errors quote them: "Bearer abc", "api_key=abc", "password: abc".
_SHAPES = re.compile(
    r"(?i)\b(bearer\s+|basic\s+|(?:api[-_]?key|access[-_]?token|refresh[-_]?token|token|password|passwd|secret)"
    # The value is never itself a scheme word: in "Basic Bearer abc" the secret is abc, not "Bearer".
    r"\s*[=:]\s*)(?!(?:bearer|basic)\b)[^\s,;:&'\"<>)\]}]{4,}"
)


class KnownSecrets:
    """The secret values this process holds. Thread-safe; the pattern is rebuilt only when a value is added."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        forms = _forms(value)
        with self._lock:
            new = forms - self._values
            if new:
                self._values |= new
                ordered = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
        install_log_scrubber()

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(MASK, text) if pattern is not None else text

    def __contains__(self, value: str) -> bool:
        return value in self._values

    def __bool__(self) -> bool:
        return self._pattern is not None

    def clear(self) -> None:
        """Forget every value (tests only: a process forgets nothing it ever resolved)."""
        with self._lock:
            self._values.clear()
            self._pattern = None


known = KnownSecrets()


def _forms(value: str) -> set[str]:
    """The value and the forms it travels in: after a scheme word ("Bearer x"), URL-encoded, Basic's password."""
    words = value.split()
    # "Bearer abc" leaks as "abc" just as well; the scheme word itself is no secret.
    candidates = {value.strip(), *(words[1:] if len(words) > 1 and words[0].isalpha() else words)}
    if len(words) == 2 and words[0].lower() == "basic":
        try:
            decoded = base64.b64decode(words[1], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            decoded = ""
        if ":" in decoded:
            candidates |= {decoded, decoded.split(":", 1)[1]}
    return {
        form
        for c in candidates
        for form in (c, quote(c, safe=""), quote_plus(c, safe=""))
        if len(form) >= MIN_SECRET_CHARS
    }


def scrub_known(value: Any, _depth: int = 0) -> Any:
    """A value (text, or JSON-like containers of it) with the secrets this process knows replaced by `***`. For
    a tool's answer: only our own values go, not things that merely look like credentials (the answer is the
    caller's data)."""
    if not known:
        return value
    if isinstance(value, str):
        return known.scrub(value)
    if _depth > 64:
        return value
    if isinstance(value, dict):
        return {known.scrub(k) if isinstance(k, str) else k: scrub_known(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_known(v, _depth + 1) for v in value]
    return value


def scrub(text: str) -> str:
    """`text` with every known secret, and every credential in a recognisable shape, replaced by `***`."""
    if not text:
        return text
    return _SHAPES.sub(lambda m: m[1] + MASK, known.scrub(text))


# -- logs --------------------------------------------------------------------------------------------------------

_installed = False
_install_lock = threading.Lock()


def install_log_scrubber() -> None:
    """From now on every log record, of every library, is scrubbed as it is made: its message rendered and
    scrubbed, its traceback too. Idempotent; done before the first secret is resolved."""
    global _installed
    with _install_lock:
        if _installed:
            return
        base = logging.getLogRecordFactory()

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = base(*args, **kwargs)
            _scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string is the logging module's to report
        return
    record.msg, record.args = scrub(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
