"""The demo MCP server behind a bearer token, for the secret-handling tests.

    TOKEN=... python tests/servers/auth_server.py --port 0 --token-env TOKEN

Streamable HTTP at /mcp and legacy SSE at /mcp/sse answer only requests carrying `Authorization: Bearer <the
value of $TOKEN>`; anything else gets 401 with a `WWW-Authenticate` challenge, as a real API gateway answers.
Prints `LISTENING <port>` once the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
from typing import Any

from demo_server import app_with_mcp, build, serve_http


def require_bearer(app: Any, token: str) -> Any:
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer error="invalid_token"'),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": b'{"error": "invalid_token"}'})
                return
        await app(scope, receive, send)

    return guarded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-env", required=True, help="the environment variable holding the expected token")
    args = parser.parse_args()
    app = app_with_mcp(build("auth"), [], sse=True)
    asyncio.run(serve_http(require_bearer(app, os.environ[args.token_env]), args.port))


if __name__ == "__main__":
    main()
