"""OAuth 2.1 for hosted MCP servers: the SDK's own providers (`mcp.client.auth`), with their tokens kept in the
registry and shared by every worker. We write no OAuth: discovery (RFC 9728, RFC 8414, OIDC), registration
(dynamic, pre-registered, client ID metadata documents), PKCE, the `resource` parameter, scope selection and
step-up, refresh and the client-credentials grants are the SDK's. What is ours:

- **Storage** (`SharedTokens`): the SDK's `TokenStorage` over `oauth_store.py` (sealed rows in PostgreSQL), with
  the metadata discovered at login kept beside the tokens, so a worker that never logged in refreshes at the
  right endpoint.
- **Refresh once across workers**: a token due within its last fifth of life (at most a minute) is refreshed
  under the store's per-server lock, after rereading what another worker may already have written. A 401 first
  looks for a newer stored token (another worker refreshed, a person logged in again) before anything else.
- **No person, no prompt**: a worker never starts an authorization it cannot finish. For the authorization-code
  grant a missing, refused or unrefreshable token, or a `403 insufficient_scope`, marks the server
  `needs_login` (with the scope asked for) and hands the refusal back to the transport; `servers login` is what
  prompts, and it asks for the union of the scopes granted, configured and asked for. Unattended grants (client
  credentials, private key JWT, identity assertion) re-authorise by themselves, step-up included.
- **A failed flow is an answer, not a crash**: an exception inside an auth flow would end the SDK transport's
  writer (and leave the request waiting forever), so the flow's error is recorded (`failure`) and the request is
  sent once more for an honest refusal.
- **The 2025-03-26 metadata at the server's root**: a server without protected-resource metadata serves its
  authorization server metadata at its own origin's well-known address; when that document names an issuer on
  the same origin with a path (`https://host/oauth`), the SDK's strict issuer check (RFC 8414 §3.3, which it
  applies to the legacy path too) refuses it. We accept an issuer on the MCP server's own origin there: the
  2025-03-26 spec makes that origin the authorization base, so no credential can leave it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import warnings
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httpx2
import jwt
from mcp.client.auth import (
    OAuthClientProvider,
    OAuthFlowError,
    OAuthRegistrationError,
    OAuthTokenError,
    TokenStorage,
)
from mcp.client.auth.extensions.client_credentials import (
    ClientCredentialsOAuthProvider,
    PrivateKeyJWTOAuthProvider,
    SignedJWTParameters,
)
from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider
from mcp.client.auth.utils import (
    build_protected_resource_metadata_discovery_urls,
    create_client_registration_request,
    create_oauth_metadata_request,
    extract_field_from_www_auth,
    extract_resource_metadata_from_www_auth,
    extract_scope_from_www_auth,
    union_scopes,
)
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthMetadata,
    OAuthToken,
    ProtectedResourceMetadata,
)
from pydantic import AnyUrl

from mcp_integration.auth_config import OAuthSettings
from mcp_integration.errors import NeedsLogin, SecretMissing
from mcp_integration.explain import describe
from mcp_integration.oauth_store import OAuthStore, StoredTokens
from mcp_integration.registry import ServerConfig
from mcp_integration.scrubber import known
from mcp_integration.secrets import ENV_PREFIX, resolve_url

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = [
    "CLIENT_NAME",
    "AuthFor",
    "Detected",
    "LoginPrompt",
    "OAuthBroker",
    "SharedTokens",
    "build_provider",
    "detect_oauth",
    "refresh_margin",
    "token_subject",
]

log = logging.getLogger(__name__)

CLIENT_NAME = "voice-mcp"


class _OneLineFlowErrors(logging.Filter):
    """The SDK logs each failed authorization flow at ERROR with its traceback; we report the reason ourselves, in
    one line. Its record is kept (traceless, at DEBUG) only where DEBUG is wanted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != "OAuth flow error":
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger().isEnabledFor(logging.DEBUG)


logging.getLogger("mcp.client.auth.oauth2").addFilter(_OneLineFlowErrors())


def _why(exc: BaseException) -> str:
    if isinstance(exc, OAuthFlowError | OAuthTokenError | OAuthRegistrationError):
        return str(exc) or type(exc).__name__
    return describe(exc)


# Where a worker's (never used) authorization would return: the SDK requires a redirect URI for the
# authorization-code grant even when only refreshing.
_NO_REDIRECT = "http://127.0.0.1/callback"


class LoginPrompt(Protocol):
    """A person at hand: shows the authorization URL, then waits for the redirect (`oauth_login.py`)."""

    redirect_uri: str

    async def show(self, url: str) -> None: ...

    async def code(self) -> AuthorizationCodeResult: ...


def token_subject(access_token: str | None) -> str | None:
    """Who a token was issued to, when it says so (a JWT's `email`, `preferred_username` or `sub`; unverified:
    shown to the person who just logged in, never trusted)."""
    if not access_token or access_token.count(".") != 2:
        return None
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    for key in ("email", "preferred_username", "name", "sub", "client_id"):
        if isinstance(claims.get(key), str) and claims[key]:
            return claims[key]
    return None


class SharedTokens(TokenStorage):
    """The SDK's TokenStorage for one server, over the registry. While a refresh holds the server's lock, `conn`
    is that lock's connection: the refreshed tokens are written inside the same transaction."""

    def __init__(self, store: OAuthStore, server: str) -> None:
        self.store = store
        self.server = server
        self.conn: AsyncConnection[Any] | None = None
        self.expires_at: float | None = None
        self.context: Any = None  # the provider's OAuthContext, for the metadata saved with the tokens
        self.on_saved: Callable[[], None] | None = None

    async def get_tokens(self) -> OAuthToken | None:
        stored = await self.store.tokens(self.server, self.conn)
        self.expires_at = stored.expires_at if stored else None
        return OAuthToken.model_validate(stored.token) if stored else None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        token = tokens.model_dump(mode="json", exclude_none=True)
        self.expires_at = await self.store.save_tokens(
            self.server,
            token,
            refreshed=self.conn is not None,
            metadata=self._metadata(),
            subject=token_subject(tokens.access_token),
            conn=self.conn,
        )
        if self.on_saved is not None:
            self.on_saved()

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        client = await self.store.client(self.server)
        return OAuthClientInformationFull.model_validate(client) if client else None

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        await self.store.save_client(self.server, client_info.model_dump(mode="json", exclude_none=True))

    def _metadata(self) -> dict[str, Any]:
        ctx = self.context
        if ctx is None or (ctx.oauth_metadata is None and ctx.protected_resource_metadata is None):
            return {}
        out: dict[str, Any] = {"auth_server_url": ctx.auth_server_url}
        if ctx.oauth_metadata is not None:
            out["asm"] = ctx.oauth_metadata.model_dump(mode="json", exclude_none=True)
        if ctx.protected_resource_metadata is not None:
            out["prm"] = ctx.protected_resource_metadata.model_dump(mode="json", exclude_none=True)
        return out


def refresh_margin(lifetime_s: float | None) -> float:
    """How long before expiry a token is refreshed: a fifth of its lifetime, between 1 s and 60 s."""
    return min(60.0, max(1.0, float(lifetime_s or 3600) / 5))


class _Shared:
    """Put before one of the SDK's OAuthClientProvider classes: see the module's docstring. Uses the hooks the
    SDK's own extensions override (`_initialize`, `_auth_flow`, `_perform_authorization`, `_expected_issuer`) and
    its refresh steps (`_refresh_token`, `_handle_refresh_response`); `mcp_compat.py` checks they exist."""

    context: Any
    _initialized: bool

    def _share(
        self,
        server: str,
        storage: SharedTokens,
        settings: OAuthSettings,
        prompt: LoginPrompt | None,
        wanted_scope: str | None,
        preregistered: OAuthClientInformationFull | None,
    ) -> None:
        self.server = server
        self.tokens = storage
        storage.context = self.context
        storage.on_saved = self._saved
        self.settings = settings
        self.prompt = prompt
        self.wanted_scope = wanted_scope
        self.preregistered = preregistered
        self.needs_login: NeedsLogin | None = None
        self.failure: str | None = None
        self.refreshes = 0  # refreshes this process performed (tests and benchmarks count them)
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self._legacy_issuer: str | None = None
        self._last_prm_url: str | None = None

    @property
    def _waits_for_person(self) -> bool:
        return self.settings.interactive and self.prompt is None

    def _saved(self) -> None:
        self.needs_login = None
        self.failure = None

    # -- the SDK's hooks ---------------------------------------------------------------------------------------

    async def _initialize(self) -> None:
        await super()._initialize()  # type: ignore[misc]
        if self.preregistered is not None:
            self.context.client_info = self.preregistered
        self.context.token_expiry_time = self.tokens.expires_at
        meta = await self.tokens.store.metadata(self.server)
        if meta.get("asm") and self.context.oauth_metadata is None:
            self.context.oauth_metadata = OAuthMetadata.model_validate(meta["asm"])
        if meta.get("prm") and self.context.protected_resource_metadata is None:
            self.context.protected_resource_metadata = ProtectedResourceMetadata.model_validate(meta["prm"])
        if meta.get("auth_server_url") and self.context.auth_server_url is None:
            self.context.auth_server_url = meta["auth_server_url"]

    async def _perform_authorization(self) -> httpx2.Request:
        # The scopes configured and the ones a server asked for earlier (a step-up a worker could not do) join
        # whatever the SDK selected from this challenge.
        extra = union_scopes(self.settings.scopes, self.wanted_scope)
        if extra:
            self.context.client_metadata.scope = union_scopes(self.context.client_metadata.scope, extra)
        return await super()._perform_authorization()  # type: ignore[misc]

    def _expected_issuer(self) -> str:
        return self._legacy_issuer or super()._expected_issuer()  # type: ignore[misc]

    def _widened_registration(self, outgoing: httpx2.Request) -> httpx2.Request:
        """A dynamic registration asks for the scopes configured and any a step-up asked for, not only the ones
        this challenge selected: an authorization server that holds a client to its registered scope (the SDK's
        does) would refuse the wider authorization that follows."""
        extra = union_scopes(self.settings.scopes, self.wanted_scope)
        if not extra or outgoing.method != "POST" or self.context.client_info is not None:
            return outgoing
        base = self.context.get_authorization_base_url(self.context.server_url)
        registration = create_client_registration_request(
            self.context.oauth_metadata, self.context.client_metadata, base
        )
        if registration.url != outgoing.url:
            return outgoing  # not the registration
        self.context.client_metadata.scope = union_scopes(self.context.client_metadata.scope, extra)
        return create_client_registration_request(self.context.oauth_metadata, self.context.client_metadata, base)

    async def _auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        if not self._initialized:
            async with self.context.lock:
                if not self._initialized:
                    await self._initialize()
        force = False
        for attempt in range(2):
            if force or self._refresh_due():
                async with self._lock():
                    if force or self._refresh_due():
                        refused = False
                        async with self.tokens.store.locked(self.server) as conn:
                            stored = await self.tokens.store.tokens(self.server, conn)
                            if stored is not None and self._newer(stored):
                                self._adopt(stored)
                            elif self._refreshable(stored):
                                if stored is not None:
                                    self._adopt(stored)  # the newest refresh token there is
                                self.tokens.conn = conn
                                try:
                                    response = yield await self._refresh_token()  # type: ignore[attr-defined]
                                    refused = not await self._handle_refresh_response(response)  # type: ignore[attr-defined]
                                finally:
                                    self.tokens.conn = None
                                if not refused:
                                    self.refreshes += 1
                        if refused and self._waits_for_person:
                            await self._mark_needs_login("the authorization server refused the refresh token")
            force = False
            flow = super()._auth_flow(request)  # type: ignore[misc]
            try:
                outgoing = await flow.__anext__()
                response = yield outgoing
                if outgoing is request:
                    verdict = await self._refused(request, response)
                    if verdict in ("retry", "refresh") and attempt == 0:
                        force = verdict == "refresh"
                        continue
                    if verdict == "stop":
                        return
                    if response.status_code == 401:
                        hint = extract_resource_metadata_from_www_auth(response)
                        urls = build_protected_resource_metadata_discovery_urls(hint, self.context.server_url)
                        self._last_prm_url = urls[-1] if urls else None
                while True:
                    if str(outgoing.url) == self._last_prm_url and response.status_code != 200:
                        # The last place protected-resource metadata could be: from here the SDK takes the
                        # 2025-03-26 path, with its metadata at the origin's root (see the module's docstring).
                        probe = yield create_oauth_metadata_request(_root_metadata_url(self.context.server_url))
                        self._legacy_issuer = await _same_origin_issuer(probe, self.context.server_url)
                    outgoing = self._widened_registration(await flow.asend(response))
                    response = yield outgoing
            except StopAsyncIteration:
                return
            except Exception as exc:
                self.failure = _why(exc)
                log.warning("server %s: authorization failed: %s", self.server, self.failure)
                # The transport needs its own request answered, not a discovery document: send it once more.
                yield request
                return
            finally:
                await flow.aclose()

    # -- decisions -----------------------------------------------------------------------------------------------

    def _lock(self) -> asyncio.Lock:
        # One per event loop: a provider outlives no process, but tests run several loops.
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    def _refresh_due(self) -> bool:
        token = self.context.current_tokens
        expiry = self.context.token_expiry_time
        if token is None or not token.access_token or expiry is None:
            return False
        return time.time() >= expiry - refresh_margin(token.expires_in)

    def _newer(self, stored: StoredTokens) -> bool:
        current = self.context.current_tokens
        if stored.access_token is None or (current is not None and stored.access_token == current.access_token):
            return False
        if stored.expires_at is None:
            return True
        token = OAuthToken.model_validate(stored.token)
        return time.time() < stored.expires_at - refresh_margin(token.expires_in)

    def _refreshable(self, stored: StoredTokens | None) -> bool:
        token = stored.token if stored is not None else None
        refresh = (token or {}).get("refresh_token") or (
            self.context.current_tokens.refresh_token if self.context.current_tokens else None
        )
        return bool(refresh and self.context.client_info)

    def _adopt(self, stored: StoredTokens) -> None:
        self.needs_login = None  # someone logged in again, or another worker refreshed
        self.context.current_tokens = OAuthToken.model_validate(stored.token)
        self.context.token_expiry_time = stored.expires_at
        self.tokens.expires_at = stored.expires_at

    async def _refused(self, request: httpx2.Request, response: httpx2.Response) -> str | None:
        """What to do about the answer to the request itself: "retry" (a newer stored token was adopted),
        "refresh", "stop" (hand the refusal back: a person must log in), or None (the SDK's flow goes on)."""
        if response.status_code == 401:
            sent = request.headers.get("authorization", "")[len("Bearer ") :] or None
            try:
                stored = await self.tokens.store.tokens(self.server)
            except Exception as exc:  # the database down: decide on what this process knows
                log.info("server %s: cannot reread stored tokens: %s", self.server, describe(exc))
                stored = None
            if stored is not None and stored.access_token not in (None, sent) and self._newer(stored):
                self._adopt(stored)
                return "retry"
            if sent is not None and self._refreshable(stored):
                return "refresh"
            if self._waits_for_person:
                why = "the server refused our token" if sent else "not logged in yet"
                await self._mark_needs_login(why)
                return "stop"
            return None
        if response.status_code == 403 and extract_field_from_www_auth(response, "error") == "insufficient_scope":
            if self._waits_for_person:
                granted = self.context.current_tokens.scope if self.context.current_tokens else None
                scope = union_scopes(granted, extract_scope_from_www_auth(response))
                await self._mark_needs_login("the server asks for more scope", scope)
                return "stop"
        return None

    async def _mark_needs_login(self, reason: str, scope: str | None = None) -> None:
        if self.needs_login is not None and (scope is None or scope == self.needs_login.scope):
            return  # said already, with the first (truest) reason
        self.needs_login = NeedsLogin(self.server, reason, scope)
        log.warning("%s", self.needs_login)
        try:
            await self.tokens.store.needs_login(self.server, reason, scope)
        except Exception as exc:
            log.warning("server %s: could not record that it needs a login: %s", self.server, describe(exc))


def _root_metadata_url(server_url: str) -> str:
    parts = urlsplit(server_url)
    return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server"


async def _same_origin_issuer(response: httpx2.Response, server_url: str) -> str | None:
    if response.status_code != 200:
        return None
    try:
        issuer = str(OAuthMetadata.model_validate_json(await response.aread()).issuer)
    except ValueError:
        return None
    ours, theirs = urlsplit(server_url), urlsplit(issuer)
    same = (ours.scheme, ours.hostname, ours.port) == (theirs.scheme, theirs.hostname, theirs.port)
    return issuer if same else None


class _SharedAuthorizationCode(_Shared, OAuthClientProvider):
    pass


class _SharedClientCredentials(_Shared, ClientCredentialsOAuthProvider):
    pass


class _SharedPrivateKeyJWT(_Shared, PrivateKeyJWTOAuthProvider):
    pass


class _GuardedIdentityAssertion(IdentityAssertionOAuthProvider):
    """SEP-990's provider (no refresh tokens: each expiry is a new exchange), with a failed flow answered as the
    other providers answer it."""

    needs_login: NeedsLogin | None = None
    failure: str | None = None

    async def _auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        flow = super()._auth_flow(request)
        try:
            outgoing = await flow.__anext__()
            while True:
                response = yield outgoing
                outgoing = await flow.asend(response)
        except StopAsyncIteration:
            return
        except Exception as exc:
            self.failure = _why(exc)
            log.warning("authorization failed: %s", self.failure)
            yield request
        finally:
            await flow.aclose()


def _secret(value: str | None, server: str, what: str) -> str | None:
    """An OAuth setting's value: env:NAME resolved (a known secret from then on), a literal as it is."""
    if value is None:
        return None
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX) :]
        resolved = os.environ.get(name)
        if resolved is None:
            raise SecretMissing(f"server {server!r}: OAuth {what} refers to ${name}, which is not set")
        known.add(resolved)
        return resolved
    return value


def build_provider(
    cfg: ServerConfig,
    store: OAuthStore,
    *,
    prompt: LoginPrompt | None = None,
    wanted_scope: str | None = None,
) -> httpx2.Auth:
    """The SDK provider for a server's OAuth settings, its tokens in `store`. With a `prompt`, the
    authorization-code grant may ask a person; without, it never starts an authorization (see `_Shared`)."""
    settings = cfg.oauth or OAuthSettings()
    assert cfg.url is not None
    store.require_vault()  # tokens are only ever stored sealed: without the key, say so before anything is sent
    url = resolve_url(cfg.url, server=cfg.name)
    storage = SharedTokens(store, cfg.name)
    client_id = _secret(settings.client_id, cfg.name, "client id")
    client_secret = _secret(settings.client_secret, cfg.name, "client secret")
    with warnings.catch_warnings():
        # Omitting the issuer is deprecated in the SDK (3.0 will require it); we pass it whenever it is configured.
        warnings.simplefilter("ignore")
        if settings.grant == "identity_assertion":
            return _identity_assertion(cfg, settings, storage, url, client_id, client_secret)
        provider: _Shared
        if settings.grant == "client_credentials":
            assert client_id and client_secret
            method = settings.token_auth_method if settings.token_auth_method != "none" else None
            provider = _SharedClientCredentials(
                url,
                storage,
                client_id,
                client_secret,
                token_endpoint_auth_method=method or "client_secret_basic",  # type: ignore[arg-type]
                scope=settings.scopes,
                issuer=settings.issuer,
            )
            pre = None
        elif settings.grant == "private_key_jwt":
            assert client_id
            key = _secret(settings.private_key, cfg.name, "private key")
            assert key
            signer = SignedJWTParameters(
                issuer=client_id, subject=client_id, signing_key=key, signing_algorithm=settings.signing_algorithm
            )
            provider = _SharedPrivateKeyJWT(
                url,
                storage,
                client_id,
                signer.create_assertion_provider(),
                scope=settings.scopes,
                issuer=settings.issuer,
            )
            pre = None
        else:
            redirect = prompt.redirect_uri if prompt is not None else _NO_REDIRECT
            metadata = OAuthClientMetadata(
                client_name=CLIENT_NAME,
                redirect_uris=[AnyUrl(redirect)],
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                scope=settings.scopes,
            )
            pre = None
            if client_id:
                method = settings.token_auth_method or ("client_secret_basic" if client_secret else "none")
                pre = OAuthClientInformationFull(
                    client_id=client_id,
                    client_secret=client_secret,
                    redirect_uris=[AnyUrl(redirect)],
                    token_endpoint_auth_method=method,
                    issuer=settings.issuer,
                )
            provider = _SharedAuthorizationCode(
                url,
                metadata,
                storage,
                redirect_handler=prompt.show if prompt is not None else None,
                callback_handler=prompt.code if prompt is not None else None,
                client_metadata_url=settings.client_metadata_url,
            )
    provider._share(cfg.name, storage, settings, prompt, wanted_scope, pre)
    return provider  # type: ignore[return-value]


def _identity_assertion(
    cfg: ServerConfig,
    settings: OAuthSettings,
    storage: SharedTokens,
    url: str,
    client_id: str | None,
    client_secret: str | None,
) -> httpx2.Auth:
    """SEP-990: the enterprise IdP's ID token exchanged (RFC 8693) for an ID-JAG, presented (RFC 7523) to the
    MCP server's authorization server, which is configuration (`issuer`), never the resource server's choice."""
    assert client_id and client_secret and settings.idp_token_endpoint and settings.idp_client_id
    id_token = _secret(settings.idp_id_token, cfg.name, "IdP ID token")
    if not settings.issuer:
        raise SecretMissing(
            f"server {cfg.name!r}: the identity_assertion grant needs its authorization server (issuer)"
        )
    idp_endpoint, idp_client = settings.idp_token_endpoint, settings.idp_client_id

    async def id_jag(audience: str, resource: str) -> str:
        async with httpx2.AsyncClient(timeout=30.0, follow_redirects=False) as http:
            answer = await http.post(
                idp_endpoint,
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "requested_token_type": "urn:ietf:params:oauth:token-type:id-jag",
                    "subject_token": id_token or "",
                    "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                    "audience": audience,
                    "resource": resource,
                    "client_id": idp_client,
                },
            )
        if answer.status_code != 200:
            raise RuntimeError(f"the identity provider refused the token exchange (HTTP {answer.status_code})")
        try:
            grant = json.loads(answer.content)["access_token"]
        except (ValueError, KeyError, TypeError):
            raise RuntimeError("the identity provider's answer holds no ID-JAG") from None
        known.add(grant)
        return str(grant)

    method = (
        settings.token_auth_method
        if settings.token_auth_method in ("client_secret_basic", "client_secret_post")
        else None
    )
    return _GuardedIdentityAssertion(
        url,
        storage,
        client_id,
        client_secret,
        issuer=settings.issuer,
        assertion_provider=id_jag,
        scope=settings.scopes,
        token_endpoint_auth_method=method or "client_secret_basic",  # type: ignore[arg-type]
    )


AuthFor = Callable[[ServerConfig], "httpx2.Auth | None"]


class OAuthBroker:
    """One provider per OAuth server per process (its in-memory tokens shared by every connection to it), rebuilt
    when the server's row changes."""

    def __init__(self, store: OAuthStore) -> None:
        self.store = store
        self._providers: dict[str, tuple[tuple[Any, ...], httpx2.Auth]] = {}

    def auth_for(self, cfg: ServerConfig) -> httpx2.Auth | None:
        if cfg.auth != "oauth":
            return None
        key = (cfg.url, cfg.oauth)
        held = self._providers.get(cfg.name)
        if held is not None and held[0] == key:
            return held[1]
        provider = build_provider(cfg, self.store)
        self._providers[cfg.name] = (key, provider)
        return provider


@dataclass(frozen=True)
class Detected:
    """A server that asks for OAuth, as `servers add` found it."""

    issuer: str | None  # the authorization server its protected-resource metadata names
    scopes: list[str]
    metadata: bool  # protected-resource metadata found (else only a Bearer challenge)


async def detect_oauth(cfg: ServerConfig, timeout: float = 5.0) -> Detected | None:
    """Whether an HTTP server wants OAuth: a 401 with a Bearer challenge, or protected-resource metadata (RFC 9728)
    published for it. Nothing is sent that could change the server's state (GETs only); an unreachable server
    tells nothing (None)."""
    try:
        url = resolve_url(cfg.url or "", server=cfg.name)
    except SecretMissing:
        return None
    challenged = False
    hint: str | None = None
    try:
        async with httpx2.AsyncClient(timeout=timeout, follow_redirects=False) as http:
            headers = {"Accept": "application/json, text/event-stream"}
            async with http.stream("GET", url, headers=headers) as answer:
                challenge = answer.headers.get("www-authenticate", "")
                challenged = answer.status_code == 401 and challenge.lower().startswith("bearer")
                hint = extract_resource_metadata_from_www_auth(answer) if challenged else None
            for candidate in build_protected_resource_metadata_discovery_urls(hint, url):
                found = await http.get(candidate, headers={"Accept": "application/json"})
                if found.status_code != 200:
                    continue
                try:
                    prm = ProtectedResourceMetadata.model_validate_json(found.content)
                except ValueError:
                    continue
                servers = [str(s) for s in prm.authorization_servers]
                return Detected(servers[0] if servers else None, list(prm.scopes_supported or []), True)
    except httpx2.HTTPError as exc:
        log.info("server %s: could not check for OAuth: %s", cfg.name, describe(exc))
        return None
    return Detected(None, [], False) if challenged else None
