"""Bring in the `mcpServers` JSON that MCP clients (Claude Desktop, Cursor, VS Code…) already use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mcp_integration.registry import RegistryError, ServerConfig

_TRANSPORT_ALIASES = {
    "stdio": "stdio",
    "sse": "sse",
    "http": "streamable-http",
    "streamable-http": "streamable-http",
    "streamable_http": "streamable-http",
    "streamablehttp": "streamable-http",
    "ws": "websocket",
    "websocket": "websocket",
}


def normalise_name(name: str) -> str:
    """Client configs use any key ("My Server"); the registry wants `^[a-z0-9_-]{1,48}$`."""
    out = re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-")
    return out[:48] or "server"


def _transport(name: str, entry: dict[str, Any]) -> str:
    declared = entry.get("type") or entry.get("transport")
    if declared is not None:
        key = str(declared).lower().replace(" ", "")
        if key not in _TRANSPORT_ALIASES:
            raise RegistryError(f"server {name!r}: unknown transport type {declared!r}")
        return _TRANSPORT_ALIASES[key]
    if "command" in entry:
        return "stdio"
    url = str(entry.get("url") or entry.get("serverUrl") or "")
    parsed = urlparse(url)
    if parsed.scheme in ("ws", "wss"):
        return "websocket"
    # The legacy transport's endpoint is, by long convention, .../sse.
    return "sse" if parsed.path.rstrip("/").endswith("/sse") else "streamable-http"


def _str_map(name: str, what: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RegistryError(f"server {name!r}: {what} must be an object")
    return {str(k): str(v) for k, v in value.items()}


def parse_mcp_servers(text: str) -> list[ServerConfig]:
    """Parse and check a whole file first, so a bad entry imports nothing rather than half."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    servers = doc.get("mcpServers", doc.get("servers")) if isinstance(doc, dict) else None
    if not isinstance(servers, dict):
        raise RegistryError('expected an object with "mcpServers": {name: {command|url, ...}}')
    out: list[ServerConfig] = []
    for raw_name, entry in servers.items():
        if not isinstance(entry, dict):
            raise RegistryError(f"server {raw_name!r}: expected an object")
        name = normalise_name(raw_name)
        transport = _transport(raw_name, entry)
        args = entry.get("args") or []
        if not isinstance(args, list):
            raise RegistryError(f"server {raw_name!r}: args must be a list")
        cfg = ServerConfig(
            name=name,
            transport=transport,
            url=entry.get("url") or entry.get("serverUrl"),
            command=entry.get("command"),
            args=[str(a) for a in args],
            env=_str_map(raw_name, "env", entry.get("env")),
            headers=_str_map(raw_name, "headers", entry.get("headers")),
            enabled=not entry.get("disabled", False),
        )
        if isinstance(entry.get("allowedTools"), list):
            cfg.allowed_tools = [str(t) for t in entry["allowedTools"]]
        if isinstance(entry.get("timeout"), int):
            cfg.timeout_ms = entry["timeout"]
        cfg.validate()
        out.append(cfg)
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RegistryError(f"two entries become the same server name: {', '.join(dupes)}")
    return out


def load_file(path: str) -> list[ServerConfig]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror}") from None
    return parse_mcp_servers(text)


_SECRETISH = re.compile(r"(?i)token|key|secret|passw|auth|bearer|cookie|credential")


def literal_secrets(cfg: ServerConfig) -> list[str]:
    """Names of header/env entries that look secret yet hold a literal value instead of an `env:NAME` reference."""
    return [
        f"{what} {k}"
        for what, m in (("header", cfg.headers), ("env", cfg.env))
        for k, v in m.items()
        if not v.startswith("env:") and _SECRETISH.search(k)
    ]
