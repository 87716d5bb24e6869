"""A protected MCP server and its OAuth 2.1 authorization server in one process, on 127.0.0.1.

    python tests/servers/oauth_server.py --port 0 [--token-ttl S] [--no-refresh] [--scopes "a b"]
        [--client ID:SECRET]

Built on the `mcp` SDK's own authorization-server machinery (`MCPServer(auth=AuthSettings, auth_server_provider=
...)`: RFC 8414 metadata, RFC 9728 protected-resource metadata, dynamic registration, PKCE, the token endpoint,
bearer checks on /mcp); only the provider's memory is written here. It behaves as hosted authorization servers
do where it matters to us:

- **Refresh tokens rotate, and reuse is punished** (OAuth 2.0 Security BCP §4.14): a refresh token works once;
  presenting a spent one revokes its whole family (every access and refresh token descended from that login),
  as Auth0, Okta and others do. Two workers refreshing with one token therefore lock both out.
- **Access tokens expire** after `--token-ttl` seconds (`expires_in` says so); an expired one gets 401.
- **The person approves at once**: /authorize redirects straight back with a code (no login page).
- `--no-refresh` refuses every refresh (as after a revoked grant): the client must log in again.
- `--scopes` lists the scopes clients may register for; a login asks for `mcp:tools` (the resource's metadata
  names only that one).
- **Step-up**: the tool `admin_report` needs the scope `mcp:admin`. Called with a token without it, the server
  answers `403` with `WWW-Authenticate: Bearer error="insufficient_scope", scope="mcp:tools mcp:admin"` (RFC 6750
  §3.1, as the MCP spec's scope challenge has it), before the request reaches the MCP session.
- **Client credentials** (`--client ID:SECRET`, RFC 6749 §4.4): a pre-registered confidential client gets tokens
  from /token with `grant_type=client_credentials` (its secret by HTTP Basic or in the form), for the scopes it
  asks, without a refresh token, as machine-to-machine grants are issued. The SDK's token endpoint has no such
  grant, so this one form is answered here, before it.

`GET /stats` answers what happened (logins, refreshes, reuse detected, rejected tokens, tool calls) for the
tests and bench/oauth_refresh.py. Prints `LISTENING <port>` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

import uvicorn
from demo_server import build, listening_socket
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    TokenError,
    construct_redirect_uri,
)
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

ADMIN_SCOPE = "mcp:admin"


@dataclass
class Memory:
    token_ttl: int
    refresh: bool
    clients: dict[str, OAuthClientInformationFull] = field(default_factory=dict)
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    access: dict[str, tuple[AccessToken, str]] = field(default_factory=dict)  # token -> (token, family)
    refresh_tokens: dict[str, tuple[RefreshToken, str]] = field(default_factory=dict)
    spent: dict[str, str] = field(default_factory=dict)  # used refresh token -> family
    revoked: set[str] = field(default_factory=set)  # families
    stats: Counter[str] = field(default_factory=Counter)


class Provider:
    """The SDK's `OAuthAuthorizationServerProvider`, in memory."""

    def __init__(self, memory: Memory) -> None:
        self.m = memory

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.m.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        assert client_info.client_id is not None
        self.m.clients[client_info.client_id] = client_info
        self.m.stats["registrations"] += 1

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        code = secrets.token_urlsafe(24)
        assert client.client_id is not None
        self.m.codes[code] = AuthorizationCode(
            code=code,
            scopes=params.scopes or [],
            expires_at=time.time() + 300,
            client_id=client.client_id,
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
            subject="ada@example.com",
        )
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state)

    async def load_authorization_code(self, client: OAuthClientInformationFull, code: str) -> AuthorizationCode | None:
        return self.m.codes.get(code)

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        self.m.codes.pop(authorization_code.code, None)
        self.m.stats["logins"] += 1
        family = secrets.token_hex(8)
        return self._issue(authorization_code.client_id, authorization_code.scopes, authorization_code.resource, family)

    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> RefreshToken | None:
        family = self.m.spent.get(refresh_token)
        if family is not None:
            # A spent refresh token presented again: someone else holds the family. Revoke all of it.
            self.m.stats["refresh_reuse"] += 1
            self.m.revoked.add(family)
            return None
        held = self.m.refresh_tokens.get(refresh_token)
        if held is None or held[1] in self.m.revoked:
            self.m.stats["refresh_refused"] += 1
            return None
        return held[0]

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        if not self.m.refresh:
            self.m.stats["refresh_refused"] += 1
            raise TokenError("invalid_grant", "refresh tokens are not honoured any more")
        _, family = self.m.refresh_tokens.pop(refresh_token.token)
        self.m.spent[refresh_token.token] = family
        self.m.stats["refreshes"] += 1
        return self._issue(refresh_token.client_id, scopes or refresh_token.scopes, refresh_token.resource, family)

    async def load_access_token(self, token: str) -> AccessToken | None:
        held = self.m.access.get(token)
        if held is None or held[1] in self.m.revoked or (held[0].expires_at or 0) < time.time():
            self.m.stats["rejected_tokens"] += 1
            return None
        return held[0]

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        self.m.access.pop(token.token, None)

    def _issue(
        self, client_id: str, scopes: list[str], resource: str | None, family: str, *, refresh: bool = True
    ) -> OAuthToken:
        access, refresh_token = f"at-{secrets.token_urlsafe(24)}", f"rt-{secrets.token_urlsafe(24)}"
        expires = int(time.time()) + self.m.token_ttl
        subject = "ada@example.com"
        token = AccessToken(
            token=access, client_id=client_id, scopes=scopes, expires_at=expires, resource=resource, subject=subject
        )
        self.m.access[access] = (token, family)
        if refresh:
            self.m.refresh_tokens[refresh_token] = (
                RefreshToken(
                    token=refresh_token, client_id=client_id, scopes=scopes, resource=resource, subject=subject
                ),
                family,
            )
        self.m.stats["tokens_issued"] += 1
        return OAuthToken(
            access_token=access,
            expires_in=self.m.token_ttl,
            scope=" ".join(scopes) or None,
            refresh_token=refresh_token if refresh else None,
        )


class Guard:
    """ASGI in front of the SDK app: the client-credentials form at /token, and the scope that `admin_report`
    needs at /mcp. Everything else passes through untouched (bodies replayed)."""

    def __init__(self, app: ASGIApp, provider: Provider, base: str, clients: dict[str, str]) -> None:
        self.app, self.provider, self.base, self.clients = app, provider, base, clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ("/token", "/mcp"):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = self._client_credentials(scope, body) if scope["path"] == "/token" else self._step_up(scope, body)
        if answer is not None:
            await answer(scope, receive, send)
            return
        sent = False

        async def replay() -> dict[str, object]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _client_credentials(self, scope: Scope, body: bytes) -> Response | None:
        form = dict(pair.split("=", 1) for pair in body.decode().split("&") if "=" in pair)
        if form.get("grant_type") != "client_credentials":
            return None
        form = {k: unquote_plus(v) for k, v in form.items()}
        client_id, secret = form.get("client_id"), form.get("client_secret")
        header = dict(scope["headers"]).get(b"authorization", b"").decode()
        if header.lower().startswith("basic "):
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            client_id, secret = unquote_plus(client_id), unquote_plus(secret)
        if not client_id or self.clients.get(client_id) != secret:
            self.provider.m.stats["client_credentials_refused"] += 1
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        self.provider.m.stats["client_credentials"] += 1
        scopes = (form.get("scope") or "mcp:tools").split()
        token = self.provider._issue(client_id, scopes, form.get("resource"), secrets.token_hex(8), refresh=False)
        return JSONResponse(token.model_dump(exclude_none=True), headers={"Cache-Control": "no-store"})

    def _step_up(self, scope: Scope, body: bytes) -> Response | None:
        try:
            message = json.loads(body)
        except ValueError:
            return None
        if not isinstance(message, dict) or message.get("method") != "tools/call":
            return None
        if (message.get("params") or {}).get("name") != "admin_report":
            return None
        bearer = dict(scope["headers"]).get(b"authorization", b"").decode().removeprefix("Bearer ")
        held = self.provider.m.access.get(bearer)
        if held is None or ADMIN_SCOPE in held[0].scopes:
            return None  # no token: the SDK's own 401; the right scope: the call goes on
        self.provider.m.stats["step_up_403"] += 1
        challenge = (
            f'Bearer error="insufficient_scope", scope="mcp:tools {ADMIN_SCOPE}", '
            f'resource_metadata="{self.base}/.well-known/oauth-protected-resource/mcp", '
            'error_description="admin_report needs mcp:admin"'
        )
        return JSONResponse({"error": "insufficient_scope"}, status_code=403, headers={"WWW-Authenticate": challenge})


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-ttl", type=int, default=3600)
    parser.add_argument("--no-refresh", action="store_true")
    parser.add_argument("--scopes", default=f"mcp:tools {ADMIN_SCOPE}")
    parser.add_argument("--client", action="append", default=[], metavar="ID:SECRET")
    args = parser.parse_args()
    sock = listening_socket(args.port)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    memory = Memory(token_ttl=args.token_ttl, refresh=not args.no_refresh)
    scopes = args.scopes.split()
    provider = Provider(memory)
    mcp = build(
        "protected",
        auth=AuthSettings(
            issuer_url=base,
            resource_server_url=f"{base}/mcp",
            client_registration_options=ClientRegistrationOptions(enabled=True, valid_scopes=scopes),
            required_scopes=["mcp:tools"],
            validate_token_resource=False,
        ),
        auth_server_provider=provider,
    )

    @mcp.tool()
    async def whoami() -> str:
        """Say which token this call came with (its subject)."""
        memory.stats["calls"] += 1
        return "ada@example.com"

    @mcp.tool()
    async def admin_report() -> str:
        """Needs the scope mcp:admin: a token without it is asked to step up."""
        memory.stats["admin_calls"] += 1
        return "admin report: 3 open incidents"

    app = mcp.streamable_http_app(streamable_http_path="/mcp")

    async def stats(_: Request) -> Response:
        return JSONResponse(dict(memory.stats))

    app.router.routes.append(Route("/stats", stats))
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    clients = dict(c.split(":", 1) for c in args.client)
    guarded = Guard(app, provider, base, clients)
    server = uvicorn.Server(uvicorn.Config(guarded, log_level="warning", lifespan="on"))
    await server.serve(sockets=[sock])


if __name__ == "__main__":
    asyncio.run(main())
