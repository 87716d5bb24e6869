"""A hand-rolled MCP server over stdio that sends exactly the JSON we choose, mistakes included.

The SDK's own server refuses to send a malformed tool list, but servers in the wild do send them; this one
speaks the 2025-06-18 handshake, lists well-formed and malformed tools, and answers `echo` and `ping`.
    python tests/servers/raw_stdio_server.py [--garbage]   # --garbage: a non-JSON line before each answer
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

TOOLS = [
    {
        "name": "echo",
        "description": "Repeat the text.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    {"name": "broken", "description": "Not an object schema.", "inputSchema": {"type": "string"}},
    {
        "name": "broken_props",
        "description": "Properties is a list.",
        "inputSchema": {"type": "object", "properties": [1]},
    },
    {"name": "no_schema", "description": "No inputSchema at all."},
    {"name": "bad_jsonschema", "inputSchema": {"type": "object", "properties": {"x": {"type": "nonsense"}}}},
    {"description": "A tool without a name."},
    {"name": "ping_me", "description": "Takes no arguments.", "inputSchema": {"type": "object"}},
]


def send(msg: dict) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def serve(
    tools: list[dict],
    call: Callable[[str, dict], dict],
    *,
    name: str,
    protocol: Callable[[str | None], str],
    before_answer: Callable[[], None] = lambda: None,
    on_initialize: Callable[[dict], None] = lambda params: None,
) -> None:
    """The read-handle-write loop: one line in, its answer out, and only then the next line (so nothing, not even
    a ping, is answered while a call runs). Speaks the handshake; `server/discover` is an unknown method."""
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "id" not in msg or "method" not in msg:
            continue  # notifications (and answers) need no answer
        rid, method, params = msg["id"], msg["method"], msg.get("params") or {}
        before_answer()
        if method == "initialize":
            on_initialize(params)
            result = {
                "protocolVersion": protocol(params.get("protocolVersion")),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": name, "version": "1"},
            }
        elif method == "tools/list":
            result = {"tools": tools}
        elif method == "ping":
            result = {}
        elif method == "tools/call":
            result = call(params.get("name", ""), params.get("arguments") or {})
        else:
            send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": f"Method not found: {method}"}})
            continue
        send({"jsonrpc": "2.0", "id": rid, "result": result})


def echo(_name: str, arguments: dict) -> dict:
    return {"content": [{"type": "text", "text": f"echo: {arguments.get('text', '')}"}], "isError": False}


def main() -> None:
    garbage = "--garbage" in sys.argv

    def write_garbage() -> None:
        if garbage:
            sys.stdout.write("this is not json\n")

    serve(TOOLS, echo, name="raw", protocol=lambda asked: "2025-06-18", before_answer=write_garbage)


if __name__ == "__main__":
    main()
