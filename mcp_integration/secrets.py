"""Secrets by reference: kept as references in the registry, resolved at connect time, shown only redacted.

- **References.** A header or env value `env:NAME`, and a URL part `{env:NAME}` (userinfo, a path segment, a query
  value: `https://mcp.example.com/s/{env:ZAPIER_KEY}/mcp`), name an environment variable; the registry stores the
  reference, never the value. Each value resolved here, and each literal credential found in a server's URL,
  becomes a known secret of `scrubber.py`, which keeps it out of everything that leaves the process.
- **Redaction for display.** Headers and env show references as they are and literals as `***`; a URL shows no
  userinfo, no query values and no opaque path segments.
- **Literal secrets refused.** A header or env value that looks secret, or a URL with a password, a secret-named
  query value or an API-key-like path segment, must be a reference (unless the operator insists).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from mcp_integration.errors import SecretMissing
from mcp_integration.scrubber import MASK, known

__all__ = [
    "ENV_NAME",
    "ENV_PREFIX",
    "PLACEHOLDER",
    "SECRETISH",
    "literal_secrets",
    "looks_opaque",
    "redact",
    "redact_url",
    "register_url_secrets",
    "resolve_refs",
    "resolve_url",
]

ENV_PREFIX = "env:"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PLACEHOLDER = re.compile(r"\{env:([^{}]*)\}")

# Names that say a value is a secret (headers, env, URL query keys).
SECRETISH = re.compile(r"(?i)token|key|secret|passw|auth|bearer|cookie|credential|signature|sig$")


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
