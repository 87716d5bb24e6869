"""Sealing what must be stored but never read by anyone but us: OAuth tokens and client registrations.

`cryptography`'s Fernet (AES-128-CBC with HMAC-SHA256, a timestamp, a kept format), never a cipher of our own.
The key comes from `VOICE_MCP_SECRET_KEY`: one Fernet key, or several separated by commas to rotate them (the
first seals, every one opens; re-sealing happens as tokens are next written). Each sealed value names what it
is for (the server and the field), checked on opening: a row copied onto another server's does not open.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from mcp_integration.errors import VoiceMcpError

__all__ = ["KEY_VARIABLE", "Vault", "VaultError", "new_key"]

KEY_VARIABLE = "VOICE_MCP_SECRET_KEY"


class VaultError(VoiceMcpError):
    """No key, a malformed key, or a sealed value that does not open with it."""


def new_key() -> str:
    return Fernet.generate_key().decode()


class Vault:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise VaultError(f"{KEY_VARIABLE} is empty")
        try:
            self._fernet = MultiFernet([Fernet(k.strip().encode()) for k in keys])
        except ValueError:
            raise VaultError(
                f"{KEY_VARIABLE} must hold Fernet keys (32 url-safe base64 bytes each, comma-separated); "
                "make one with: python -m mcp_integration secret-key"
            ) from None

    @classmethod
    def from_setting(cls, value: str | None) -> Vault | None:
        keys = [k for k in (value or "").split(",") if k.strip()]
        return cls(keys) if keys else None

    def seal(self, purpose: str, data: dict[str, Any]) -> bytes:
        return self._fernet.encrypt(json.dumps({"for": purpose, "data": data}).encode())

    def open(self, purpose: str, sealed: bytes) -> dict[str, Any]:
        try:
            box = json.loads(self._fernet.decrypt(bytes(sealed)))
        except (InvalidToken, ValueError):
            raise VaultError(
                f"stored OAuth data does not open with {KEY_VARIABLE} (was the key changed? log in again)"
            ) from None
        if not isinstance(box, dict) or box.get("for") != purpose or not isinstance(box.get("data"), dict):
            raise VaultError("stored OAuth data belongs to another server or field; log in again")
        return box["data"]
