"""How a server wants us to authenticate, as the registry stores it: no credentials, fixed headers, or OAuth 2.1.

OAuth settings name what the SDK's providers need (`mcp.client.auth`): the grant, a pre-registered client (its
secret or private key only as an `env:NAME` reference), a client ID metadata document URL, scopes and, for the
grants that must not trust the resource server's choice of authorization server, the issuer. Tokens are not
settings: they live encrypted in `mcp_oauth` (`oauth_store.py`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from mcp_integration.errors import RegistryError
from mcp_integration.secrets import ENV_NAME, ENV_PREFIX

__all__ = [
    "AUTH_MODES",
    "GRANTS",
    "TOKEN_AUTH_METHODS",
    "AuthMode",
    "OAuthGrant",
    "OAuthSettings",
]

AuthMode = Literal["none", "header", "oauth"]
AUTH_MODES: tuple[AuthMode, ...] = get_args(AuthMode)

# authorization_code: a person logs in once (`servers login`), workers refresh. client_credentials: a machine
# client with a secret; private_key_jwt: one that signs an assertion (RFC 7523); identity_assertion: an enterprise
# IdP's ID token exchanged for an ID-JAG (SEP-990, RFC 8693 then RFC 7523).
OAuthGrant = Literal["authorization_code", "client_credentials", "private_key_jwt", "identity_assertion"]
GRANTS: tuple[OAuthGrant, ...] = get_args(OAuthGrant)
TOKEN_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,256}$")  # RFC 6749 §3.3 scope-token


@dataclass(frozen=True)
class OAuthSettings:
    grant: OAuthGrant = "authorization_code"
    client_id: str | None = None  # pre-registered (else dynamic registration or a metadata document); may be env:
    client_secret: str | None = None  # env:NAME
    private_key: str | None = None  # env:NAME holding a PEM key (private_key_jwt)
    signing_algorithm: str = "RS256"
    token_auth_method: str | None = None  # how a pre-registered client authenticates at the token endpoint
    client_metadata_url: str | None = None  # an https:// client ID metadata document (CIMD)
    scopes: str | None = None  # space-separated; else the server's challenge or metadata decides
    issuer: str | None = None  # the authorization server these client credentials belong to
    idp_token_endpoint: str | None = None  # identity_assertion: the enterprise IdP's token endpoint
    idp_client_id: str | None = None
    idp_id_token: str | None = None  # env:NAME

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> OAuthSettings | None:
        if not data:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RegistryError(f"unknown OAuth setting {unknown[0]!r}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        defaults = OAuthSettings()
        return {k: v for k, v in asdict(self).items() if v != getattr(defaults, k) or k == "grant"}

    @property
    def interactive(self) -> bool:
        """A person must log in (a browser, once); the other grants run unattended."""
        return self.grant == "authorization_code"

    def references(self) -> dict[str, str]:
        """The settings that hold secrets, each an env:NAME reference."""
        refs = {"client secret": self.client_secret, "private key": self.private_key, "IdP ID token": self.idp_id_token}
        return {label: value for label, value in refs.items() if value}

    def validate(self, where: str) -> None:
        if self.grant not in GRANTS:
            raise RegistryError(f"{where}: unknown OAuth grant {self.grant!r}: choose one of {', '.join(GRANTS)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, str):
                raise RegistryError(f"{where}: OAuth setting {f.name} must be text")
            if isinstance(value, str) and (len(value) > 2048 or re.search(r"[\x00-\x1f\x7f]", value)):
                raise RegistryError(f"{where}: OAuth setting {f.name} is too long or holds a control character")
        for label, value in self.references().items():
            name = value[len(ENV_PREFIX) :] if value.startswith(ENV_PREFIX) else None
            if name is None or not ENV_NAME.match(name):
                raise RegistryError(f"{where}: the OAuth {label} must be an env:NAME reference, never the value")
        if self.client_id is not None and self.client_id.startswith(ENV_PREFIX):
            if not ENV_NAME.match(self.client_id[len(ENV_PREFIX) :]):
                raise RegistryError(f"{where}: OAuth client id {self.client_id!r}: env: must name a variable")
        if self.token_auth_method is not None and self.token_auth_method not in TOKEN_AUTH_METHODS:
            raise RegistryError(f"{where}: token endpoint auth method must be one of {', '.join(TOKEN_AUTH_METHODS)}")
        for token in (self.scopes or "").split():
            if not _SCOPE_TOKEN.match(token):
                raise RegistryError(f"{where}: {token!r} is not a valid OAuth scope")
        for label, url in (
            ("client metadata URL", self.client_metadata_url),
            ("issuer", self.issuer),
            ("IdP token endpoint", self.idp_token_endpoint),
        ):
            if url is not None:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise RegistryError(f"{where}: the OAuth {label} must be an http(s) URL")
        if self.client_metadata_url is not None and (
            urlsplit(self.client_metadata_url).scheme != "https" or urlsplit(self.client_metadata_url).path in ("", "/")
        ):
            raise RegistryError(f"{where}: a client metadata URL must be https:// with a path (the document's address)")
        needs = {
            "client_credentials": ("client_id", "client_secret"),
            "private_key_jwt": ("client_id", "private_key"),
            "identity_assertion": (
                "client_id",
                "client_secret",
                "idp_token_endpoint",
                "idp_client_id",
                "idp_id_token",
            ),
        }.get(self.grant, ())
        missing = [name.replace("_", " ") for name in needs if not getattr(self, name)]
        if missing:
            raise RegistryError(f"{where}: the {self.grant} grant needs: {', '.join(missing)}")
