"""Bring in the `mcpServers` JSON that MCP clients (Claude Desktop, Cursor, VS Code…) already use."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any
from urllib.parse import urlparse

from mcp_integration.errors import RegistryError
from mcp_integration.limits import MAX_DEPTH, json_too_deep
from mcp_integration.registry import ServerConfig
from mcp_integration.secrets import literal_secrets as secret_literals

__all__ = [
    "MAX_IMPORT_BYTES",
    "literal_secrets",
    "load_file",
    "normalise_name",
    "parse_mcp_servers",
]


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
    if json_too_deep(text):
        raise RegistryError(f"not a server list: it nests deeper than {MAX_DEPTH} levels")
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
        for key in ("url", "serverUrl", "command"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise RegistryError(f"server {raw_name!r}: {key} must be text")
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
        if isinstance(entry.get("timeout"), int) and not isinstance(entry["timeout"], bool):
            cfg.timeout_ms = entry["timeout"]
        try:
            cfg.validate()
        except RegistryError as exc:
            raise RegistryError(f"entry {raw_name!r}: {exc}") from None
        out.append(cfg)
    dupes = sorted(n for n, count in Counter(c.name for c in out).items() if count > 1)
    if dupes:
        raise RegistryError(f"two entries become the same server name: {', '.join(dupes)}")
    return out


# An mcpServers file of a thousand servers is ~300 kB; anything far larger is not one.
MAX_IMPORT_BYTES = 4_000_000


def load_file(path: str) -> list[ServerConfig]:
    """Read at most MAX_IMPORT_BYTES (so /dev/zero is refused, not read forever), as strict UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_IMPORT_BYTES:
        raise RegistryError(f"{path} is larger than {MAX_IMPORT_BYTES // 1_000_000} MB: not a server list")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    return parse_mcp_servers(text)


def literal_secrets(cfg: ServerConfig) -> list[str]:
    """What holds a literal value that looks secret where an env: reference belongs (headers, env, URL parts)."""
    return secret_literals(cfg.headers, cfg.env, cfg.url)
