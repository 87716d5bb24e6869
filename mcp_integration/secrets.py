"""Secrets: kept as references in the registry, resolved at connect time, and never shown once resolved.

- **References.** A header or env value `env:NAME`, and a URL part `{env:NAME}` (userinfo, a path segment, a query
  value: `https://mcp.example.com/s/{env:ZAPIER_KEY}/mcp`), name an environment variable; the registry stores the
  reference, never the value.
- **Known secrets.** Every value resolved from a reference (and every literal credential found in a server's URL)
  is registered, in this process, with one scrubber. Log records of every library (a record factory, so no
  logger or handler is missed), error strings, rows written to the database, CLI output and the status page
  pass through it: each known value becomes `***`, and so do credentials in the shapes errors quote them.
- **Redaction for display.** Headers and env show references as they are and literals as `***`; a URL shows
  no userinfo, no query values and no opaque path segments.
- **Literal secrets refused.** A header or env value that looks secret, or a URL with a password, a secret-named
  query value or an API-key-like path segment, must be a reference (unless the operator insists).

Hand-written, because no library knows which values are ours: generic secret scanners guess by shape and miss
a plain password, while we know every value we resolved.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading
import traceback
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit, urlunsplit

__all__ = [
    "ENV_PREFIX",
    "SecretMissing",
    "install_log_scrubber",
    "known",
    "literal_secrets",
    "redact",
    "redact_url",
    "register_url_secrets",
    "resolve_refs",
    "resolve_url",
    "scrub",
    "scrub_known",
]

ENV_PREFIX = "env:"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PLACEHOLDER = re.compile(r"\{env:([^{}]*)\}")
MASK = "***"
# Shorter values are left alone: masking "abc" everywhere would garble ordinary text, and no real credential is
# that short.
MIN_SECRET_CHARS = 6

# Names that say a value is a secret (headers, env, URL query keys).
SECRETISH = re.compile(r"(?i)token|key|secret|passw|auth|bearer|cookie|credential|signature|sig$")
# Credentials in the shapes errors quote them: "Bearer abc", "api_key=abc", "password: abc".
_SHAPES = re.compile(
    r"(?i)\b(bearer\s+|basic\s+|(?:api[-_]?key|access[-_]?token|refresh[-_]?token|token|password|passwd|secret)"
    r"\s*[=:]\s*)[^\s,;:&'\"<>)\]}]{4,}"
)


class SecretMissing(Exception):
    """An `env:NAME` reference names a variable that is not set. The message names the variable, not a value."""


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


# -- references ------------------------------------------------------------------------------------------------


def resolve_refs(
    mapping: Mapping[str, str], *, what: str, server: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Header or env values with `env:NAME` resolved. Resolved values, and literal ones under a secret-looking
    name, become known secrets."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, value in mapping.items():
        if value.startswith(ENV_PREFIX):
            out[key] = _lookup(value[len(ENV_PREFIX) :], environ, f"server {server!r}: {what} {key!r}")
            known.add(out[key])
        else:
            out[key] = value
            if SECRETISH.search(key):
                known.add(value)
    return out


def resolve_url(url: str, *, server: str, environ: Mapping[str, str] | None = None) -> str:
    """The URL with each `{env:NAME}` replaced by its value, percent-encoded for where it stands. The values, and
    any literal credential the URL holds, become known secrets."""
    environ = os.environ if environ is None else environ

    def value(m: re.Match[str]) -> str:
        resolved = _lookup(m[1], environ, f"server {server!r}: its URL")
        known.add(resolved)
        # Safe in userinfo, a path segment and a query value alike.
        return quote(resolved, safe="")

    resolved = PLACEHOLDER.sub(value, url)
    register_url_secrets(resolved)
    return resolved


def _lookup(name: str, environ: Mapping[str, str], where: str) -> str:
    if name not in environ:
        raise SecretMissing(f"{where} refers to env:{name}, which is not set")
    return environ[name]


def register_url_secrets(url: str) -> None:
    """A URL's own credentials (a password, query values, opaque path segments) become known secrets: a URL shown
    in a library's log line must not carry them."""
    for part in _url_secret_parts(url):
        known.add(part)


def _url_secret_parts(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found = [password] if password else []
    found += [v for _, v in parse_qsl(parts.query, keep_blank_values=True) if v and not PLACEHOLDER.fullmatch(v)]
    found += [s for s in parts.path.split("/") if looks_opaque(s)]
    return found


# -- what may be shown -----------------------------------------------------------------------------------------


def redact(mapping: Mapping[str, str]) -> dict[str, str]:
    """What may be shown of headers or env: `env:NAME` references as they are, literal values hidden."""
    return {k: (v if v.startswith(ENV_PREFIX) else MASK) for k, v in mapping.items()}


def redact_url(url: str | None) -> str:
    """A URL fit to show or log: no userinfo, query values hidden (keys kept), opaque path segments hidden;
    `{env:NAME}` references are shown as they are."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    userinfo = f"{MASK}@" if parts.username or parts.password else ""
    path = "/".join(MASK if looks_opaque(s) else s for s in parts.path.split("/"))
    query = "&".join(
        f"{quote(k, safe='{}:')}={v if PLACEHOLDER.fullmatch(v) else MASK}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, f"{userinfo}{host}{port}", path, query, ""))


# A segment that is an API key rather than a name: long, and mixing what words do not mix. Slugs
# ("customer-support-2024") and short ids stay readable; UUIDs (n8n's default trigger paths) are hidden.
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_KEY_PREFIX = re.compile(r"^(sk|pk|rk|ak)[-_]|^(ghp|gho|ghs|xox[abprs])[-_]", re.I)


def looks_opaque(segment: str) -> bool:
    if not segment or PLACEHOLDER.fullmatch(segment):
        return False
    if _UUID.match(segment) or (len(segment) >= 12 and _KEY_PREFIX.match(segment)):
        return True
    if len(segment) < 20:
        return False
    if re.fullmatch(r"[0-9a-fA-F]+", segment):
        return True
    has_digit = any(c.isdigit() for c in segment)
    mixed_case = any(c.isupper() for c in segment) and any(c.islower() for c in segment)
    wordy = bool(re.fullmatch(r"[a-z0-9]+(?:[-_.][a-z0-9]+)*", segment)) and not has_digit
    return has_digit and (mixed_case or not re.search(r"[-_.]", segment)) and not wordy


def literal_secrets(headers: Mapping[str, str], env: Mapping[str, str], url: str | None) -> list[str]:
    """What holds a literal value that looks secret, where a reference belongs: header and env entries under a
    secret-looking name, and a URL's password, secret-named query values and API-key-like path segments."""
    found = [
        f"{what} {k}"
        for what, m in (("header", headers), ("env", env))
        for k, v in m.items()
        if not v.startswith(ENV_PREFIX) and SECRETISH.search(k)
    ]
    if url:
        try:
            parts = urlsplit(url)
            if parts.password and not PLACEHOLDER.fullmatch(parts.password):
                found.append("the URL's password")
            found += [
                f"the URL's query value {k!r}"
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
                if v and SECRETISH.search(k) and not PLACEHOLDER.fullmatch(v)
            ]
            if any(looks_opaque(s) and not _UUID.match(s) for s in parts.path.split("/")):
                found.append("a path segment of the URL that looks like a key")
        except ValueError:
            pass
    return found


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


def scrub_all(values: Iterable[str | None]) -> list[str | None]:
    return [scrub(v) if isinstance(v, str) else v for v in values]
