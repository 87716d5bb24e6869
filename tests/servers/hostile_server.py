"""A hand-rolled MCP server that sends exactly the bytes a test asks for, over stdio or WebSocket.

The SDK's server only ever sends well-formed messages; servers in the wild send invalid UTF-8, stray lines,
enormous or binary results. Here the test chooses, through tool arguments, so that one process serves a
whole property-based test (hypothesis) instead of one process per example.

    python tests/servers/hostile_server.py                                  # stdio
    python tests/servers/hostile_server.py --transport websocket --port 0   # prints LISTENING <port>
    TOKEN=... python tests/servers/hostile_server.py --transport websocket --token-env TOKEN
                        # the WebSocket handshake needs `Authorization: Bearer $TOKEN`, else HTTP 401

Tools (bytes travel base64-encoded in the arguments):
  echo(text)          an ordinary answer
  reply(result)       `result` sent back verbatim as the JSON-RPC result
  raw_reply(b64)      the whole answer is these bytes, with `{id}` replaced by the request's id
  emit(frames, text)  each frame written raw (a line on stdio, a frame on WebSocket), then an ordinary answer;
                      with as_text=true a frame that is not UTF-8 still goes out as a text frame (a protocol error)
  big(chars, kind)    an answer of `chars` characters: kind text | structured | image
  set_tools(b64)      from now on tools/list answers with these bytes as its result
  stats()             {"calls": tools/call requests received, "tools": the tool names called, in order}
--endless-tools: tools/list never ends (every page names one more tool and a next cursor), as a broken
paginating server does.
A frame that is not valid UTF-8 goes out as a binary WebSocket frame (a text frame must be UTF-8), unless
`as_text` asks for the broken kind.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from typing import Any

OPEN: dict[str, Any] = {"type": "object"}
TOOLS = [
    {"name": name, "description": f"Hostile test tool {name}.", "inputSchema": OPEN}
    for name in ("echo", "reply", "raw_reply", "emit", "big", "set_tools", "stats")
]
PNG_HEADER = b"\x89PNG\r\n\x1a\n"


class Hostile:
    """The protocol, independent of the transport: one incoming message in, the frames to send out."""

    def __init__(self, *, endless_tools: bool = False) -> None:
        self.tools_result = json.dumps({"tools": TOOLS}).encode()
        self.calls: list[str] = []
        self.endless_tools = endless_tools

    def answer(self, msg: Any) -> list[bytes]:
        if not isinstance(msg, dict) or "id" not in msg or "method" not in msg:
            return []  # notifications and responses need no answer
        rid, method = msg["id"], msg["method"]
        if method == "initialize":
            return [_ok(rid, {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": _INFO})]
        if method == "ping":
            return [_ok(rid, {})]
        if method == "tools/list" and self.endless_tools:
            # A cursor that never ends: each page names a tool of its own and points to the next page.
            page = int(((msg.get("params") or {}).get("cursor")) or 0)
            listed = [{"name": f"page_{page}", "inputSchema": OPEN}, *(TOOLS if page == 0 else [])]
            return [_ok(rid, {"tools": listed, "nextCursor": str(page + 1)})]
        if method == "tools/list":
            return [b'{"jsonrpc":"2.0","id":' + json.dumps(rid).encode() + b',"result":' + self.tools_result + b"}"]
        if method != "tools/call":
            return [_frame({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})]
        params = msg.get("params") or {}
        name, args = params.get("name"), params.get("arguments") or {}
        self.calls.append(str(name))
        if name == "echo":
            return [_ok(rid, _text(f"echo: {args.get('text', '')}"))]
        if name == "reply":
            return [_ok(rid, args.get("result"))]
        if name == "raw_reply":
            return [base64.b64decode(args["b64"]).replace(b"{id}", json.dumps(rid).encode())]
        if name == "emit":
            frames = [base64.b64decode(f) for f in args.get("frames", [])]
            return [*frames, _ok(rid, _text(args.get("text", f"emitted {len(frames)}")))]
        if name == "big":
            return [_ok(rid, _big(int(args["chars"]), args.get("kind", "text")))]
        if name == "set_tools":
            self.tools_result = base64.b64decode(args["b64"])
            return [_ok(rid, _text("tools set"))]
        if name == "stats":
            return [_ok(rid, _text(json.dumps({"calls": len(self.calls), "tools": self.calls})))]
        return [_ok(rid, {**_text(f"no tool {name!r}"), "isError": True})]


_INFO = {"name": "hostile", "version": "1"}


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def _big(chars: int, kind: str) -> dict[str, Any]:
    if kind == "structured":
        rows = [{"row": i, "name": f"item {i}", "note": "x" * 80} for i in range(chars // 100 + 1)]
        return {"content": [{"type": "text", "text": json.dumps(rows)}], "structuredContent": {"rows": rows}}
    if kind == "image":
        data = base64.b64encode(PNG_HEADER + bytes(chars * 3 // 4)).decode()
        return {"content": [{"type": "image", "data": data, "mimeType": "image/png"}]}
    return _text(("All work and no play makes Jack a dull boy. " * (chars // 44 + 1))[:chars])


def _ok(rid: Any, result: Any) -> bytes:
    return _frame({"jsonrpc": "2.0", "id": rid, "result": result})


def _frame(msg: Any) -> bytes:
    return json.dumps(msg).encode()


def _wants_raw_text(msg: Any) -> bool:
    params = msg.get("params") if isinstance(msg, dict) else None
    args = params.get("arguments") if isinstance(params, dict) else None
    return isinstance(args, dict) and args.get("as_text") is True


def run_stdio() -> None:
    server = Hostile(endless_tools="--endless-tools" in sys.argv)
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        for frame in server.answer(msg):
            out.write(frame + b"\n")
        out.flush()


async def run_websocket(host: str, port: int, token: str | None) -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.datastructures import Headers
    from websockets.http11 import Request, Response

    def check_auth(ws: ServerConnection, request: Request) -> Response | None:
        if token is None or request.headers.get("Authorization") == f"Bearer {token}":
            return None
        headers = Headers([("WWW-Authenticate", 'Bearer error="invalid_token"'), ("Content-Length", "0")])
        return Response(401, "Unauthorized", headers, b"")

    async def handle(ws: ServerConnection) -> None:
        server = Hostile()  # one per connection, like a stdio process
        async for message in ws:
            try:
                msg = json.loads(message)
            except ValueError:
                continue
            as_text = _wants_raw_text(msg)
            for frame in server.answer(msg):
                try:
                    await ws.send(frame.decode("utf-8"))
                except UnicodeDecodeError:
                    # Not UTF-8: a binary frame carries it, unless the test wants the protocol broken.
                    await ws.send(frame, text=as_text)

    async with serve(
        handle,
        host,
        port,
        subprotocols=["mcp"],
        max_size=64 * 2**20,
        process_request=check_auth,  # type: ignore[list-item]
    ) as ws_server:
        print(f"LISTENING {ws_server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transport", choices=["stdio", "websocket"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-env", default=None, help="WebSocket only: the variable holding the bearer token")
    parser.add_argument("--endless-tools", action="store_true", help="stdio only: a tools/list that never ends")
    args = parser.parse_args()
    if args.transport == "stdio":
        run_stdio()
    else:
        token = os.environ[args.token_env] if args.token_env else None
        asyncio.run(run_websocket(args.host, args.port, token))


if __name__ == "__main__":
    main()
