"""A hand-rolled MCP server over stdio that sends exactly the JSON we choose, mistakes included.

The SDK's own server refuses to send a malformed tool list, but servers in the wild do send them; this one
speaks the 2025-06-18 handshake, lists well-formed and malformed tools, and answers `echo` and `ping`.
    python tests/servers/raw_stdio_server.py [--garbage]   # --garbage: a non-JSON line before each answer
"""

from __future__ import annotations

import json
import sys

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


def main() -> None:
    garbage = "--garbage" in sys.argv
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "id" not in msg:
            continue  # notifications need no answer
        rid, method = msg["id"], msg.get("method")
        if garbage:
            sys.stdout.write("this is not json\n")
        if method == "initialize":
            result = {
                "protocolVersion": "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "raw", "version": "1"},
            }
        elif method == "tools/list":
            result = {"tools": TOOLS}
        elif method == "ping":
            result = {}
        elif method == "tools/call":
            params = msg.get("params") or {}
            text = f"echo: {(params.get('arguments') or {}).get('text', '')}"
            result = {"content": [{"type": "text", "text": text}], "isError": False}
        else:
            send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": f"Method not found: {method}"}})
            continue
        send({"jsonrpc": "2.0", "id": rid, "result": result})


if __name__ == "__main__":
    main()
