"""The status page: servers and jobs live over server-sent events, actions, /healthz and /metrics (Starlette)."""

from __future__ import annotations

from mcp_integration.web.app import create_app
from mcp_integration.web.guard import TOKEN_ENV, BindingError, check_binding
from mcp_integration.web.server import Services, build_app, listening, serve, services

__all__ = [
    "TOKEN_ENV",
    "BindingError",
    "Services",
    "build_app",
    "check_binding",
    "create_app",
    "listening",
    "serve",
    "services",
]
