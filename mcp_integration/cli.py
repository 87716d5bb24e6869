"""`python -m mcp_integration …`: manage the registry, list tools, call one. Errors are one line, exit code 1."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg

from mcp_integration.auth_config import AUTH_MODES, GRANTS, TOKEN_AUTH_METHODS, OAuthSettings
from mcp_integration.config import Settings
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.elicitation import Asker, decline_all, from_values
from mcp_integration.embedded_db import open_registry
from mcp_integration.errors import ToolCallError, VoiceMcpError
from mcp_integration.importer import literal_secrets, load_file
from mcp_integration.jobs import FINAL_STATES, JobEvent
from mcp_integration.limits import MAX_ARGUMENT_BYTES, MAX_DEPTH, json_too_deep
from mcp_integration.logs import setup_logging
from mcp_integration.oauth import detect_oauth
from mcp_integration.oauth_store import OAuthState, OAuthStore
from mcp_integration.registry import POLL_PROFILES, TRANSPORTS, Registry, ServerConfig
from mcp_integration.runtime import Runtime, open_runtime
from mcp_integration.scrubber import install_log_scrubber, scrub
from mcp_integration.secrets import redact
from mcp_integration.terminal_ask import ask_on_terminal
from mcp_integration.vault import Vault, new_key

__all__ = [
    "COMMANDS",
    "JOB_STATES",
    "MAX_JOBS_LISTED",
    "CliError",
    "build_parser",
    "cmd_call",
    "cmd_dashboard",
    "cmd_demo",
    "cmd_jobs",
    "cmd_migrate",
    "cmd_servers",
    "cmd_tools",
    "main",
    "parse_args",
    "printable",
    "run",
]


MAX_JOBS_LISTED = 10_000

# The states a row of mcp_jobs can be in: the two of a running job, then the final ones.
JOB_STATES = ("submitted", "working", *FINAL_STATES)


class CliError(Exception):
    """A user mistake or an unreachable dependency: printed as one line, exit code 1."""


def _pairs(values: Sequence[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"{what} must look like NAME=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mcp_integration", description="voice-mcp: MCP servers for voice agents")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = p.add_subparsers(dest="verb", required=True)

    sub.add_parser("migrate", help="create or upgrade the database schema")

    servers = sub.add_parser("servers", help="manage registered MCP servers").add_subparsers(
        dest="action", required=True
    )
    add = servers.add_parser(
        "add",
        help="register a server",
        usage="%(prog)s NAME (--url URL | --command CMD [--arg ARG ...] | [options] -- CMD [ARG ...])",
        description="Register a server. A stdio server's command line may follow `--`, as desktop MCP clients take "
        "it: `servers add files -- npx -y @modelcontextprotocol/server-filesystem /srv/shared`.",
    )
    add.add_argument("name")
    add.add_argument(
        "--transport",
        choices=TRANSPORTS,
        help="default: stdio for a command; for a URL, websocket for ws(s)://, "
        "sse when the path ends in /sse, else streamable-http",
    )
    target = add.add_mutually_exclusive_group()
    target.add_argument("--url")
    target.add_argument("--command")
    add.add_argument(
        "--arg", action="append", default=[], help="an argument for --command (repeatable; may start with -)"
    )
    add.add_argument("--header", action="append", help="K=V; V may be env:NAME (repeatable)")
    add.add_argument("--env", action="append", help="K=V for a stdio server; V may be env:NAME (repeatable)")
    add.add_argument("--allow-tool", action="append", default=[], help="offer only these tools (repeatable)")
    add.add_argument(
        "--allow-sampling",
        action="store_true",
        help="let this server ask the voice session's LLM for completions (MCP sampling; off by default)",
    )
    add.add_argument(
        "--pin-tool",
        action="append",
        default=[],
        metavar="TOOL",
        help="offer this tool to the LLM on every turn, even when there are more tools than a turn's budget",
    )
    add.add_argument(
        "--root", action="append", default=[], metavar="PATH", help="a root the server may work in (repeatable)"
    )
    add.add_argument("--timeout", type=int, metavar="MS", default=35_000, help="idle timeout per call (ms)")
    add.add_argument("--poll-interval", type=int, metavar="MS", default=1_000)
    add.add_argument("--result-endpoint", default="/mcp/results")
    add.add_argument("--poll-profile", choices=POLL_PROFILES, default="auto")
    add.add_argument("--disabled", action="store_true", help="register it switched off")
    add.add_argument("--replace", action="store_true", help="update the server if the name exists")
    add.add_argument("--allow-literal-secrets", action="store_true", help=_LITERAL_HELP)
    _oauth_arguments(add)
    lst = servers.add_parser("list", help="list servers and their health")
    lst.add_argument("--json", action="store_true")
    for verb in ("remove", "enable", "disable"):
        servers.add_parser(verb, help=f"{verb} a server").add_argument("name")
    servers.add_parser("check", help="check reachability now and record it").add_argument("name", nargs="?")
    login = servers.add_parser(
        "login",
        help="authorize an OAuth server (a browser flow; unattended grants just fetch a token)",
        description="Run the OAuth authorization-code flow with PKCE: open (or print) the authorization address, "
        "receive the redirect on 127.0.0.1, store the tokens (encrypted) for every worker.",
    )
    login.add_argument("name")
    login.add_argument("--port", type=int, help="the loopback port for the redirect (default: as registered, else any)")
    login.add_argument("--no-browser", action="store_true", help="only print the address")
    servers.add_parser("logout", help="forget an OAuth server's tokens and registration").add_argument("name")
    imp = servers.add_parser("import", help="import an mcpServers JSON file (Claude Desktop, Cursor, …)")
    imp.add_argument("file")
    imp.add_argument("--replace", action="store_true", help="update servers whose names exist")
    imp.add_argument("--allow-literal-secrets", action="store_true", help=_LITERAL_HELP)

    sub.add_parser("demo", help="run the offline demo (embedded PostgreSQL when DATABASE_URL is unset)")
    sub.add_parser("secret-key", help="print a new key for VOICE_MCP_SECRET_KEY (it seals OAuth tokens)")

    dash = sub.add_parser("dashboard", help="serve the live status page (off loopback it needs DASHBOARD_TOKEN)")
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8080, help="port to bind; 0 picks a free one (default 8080)")
    dash.add_argument("--check-interval", type=float, metavar="S", default=15.0, help="seconds between health checks")

    tools = sub.add_parser("tools", help="list the tools of the enabled servers")
    tools.add_argument("--server")
    tools.add_argument("--json", action="store_true")

    call = sub.add_parser("call", help="call a tool and print its answer")
    call.add_argument("tool")
    call.add_argument("--args", default="{}", help="the arguments as a JSON object")
    call.add_argument("--server")
    call.add_argument("--raw", action="store_true", help="print the whole result as JSON")
    call.add_argument("--timeout", type=float, metavar="S", help="stop waiting after S seconds")
    call.add_argument(
        "--input",
        metavar="JSON",
        help="answers to the server's questions (elicitation) as a JSON object: fields left out take their defaults; "
        "without it, a terminal is asked, and with no terminal the question is declined",
    )

    jobs = sub.add_parser("jobs", help="list recent tool calls recorded in mcp_jobs, newest first")
    jobs.add_argument("--server")
    jobs.add_argument("--state", choices=JOB_STATES)
    jobs.add_argument("--limit", type=int, default=20, metavar="N", help="how many (default 20)")
    jobs.add_argument("--json", action="store_true")
    return p


_OAUTH_FLAGS = {
    "oauth_grant": "grant",
    "oauth_client_id": "client_id",
    "oauth_client_secret": "client_secret",
    "oauth_private_key": "private_key",
    "oauth_signing_alg": "signing_algorithm",
    "oauth_token_auth": "token_auth_method",
    "oauth_client_metadata_url": "client_metadata_url",
    "oauth_scope": "scopes",
    "oauth_issuer": "issuer",
    "oauth_idp_token_endpoint": "idp_token_endpoint",
    "oauth_idp_client_id": "idp_client_id",
    "oauth_idp_id_token": "idp_id_token",
}


def _oauth_arguments(add: argparse.ArgumentParser) -> None:
    group = add.add_argument_group(
        "authentication",
        "Hosted servers usually want OAuth 2.1: `--auth oauth` (found by itself when the server asks for it), then "
        "`servers login NAME`. Secrets are env:NAME references, never values.",
    )
    group.add_argument(
        "--auth", choices=AUTH_MODES, help="none, header (the --header values) or oauth (default: detected)"
    )
    group.add_argument("--oauth-grant", choices=GRANTS, help="default: authorization_code (a person logs in once)")
    group.add_argument("--oauth-client-id", metavar="ID", help="a pre-registered client (else dynamic registration)")
    group.add_argument("--oauth-client-secret", metavar="env:NAME", help="the pre-registered client's secret")
    group.add_argument("--oauth-private-key", metavar="env:NAME", help="a PEM key signing private_key_jwt assertions")
    group.add_argument("--oauth-signing-alg", metavar="ALG", help="the private key's JWT algorithm (default RS256)")
    group.add_argument("--oauth-token-auth", choices=TOKEN_AUTH_METHODS, help="how the client authenticates")
    group.add_argument("--oauth-client-metadata-url", metavar="URL", help="an https:// client ID metadata document")
    group.add_argument("--oauth-scope", action="append", metavar="SCOPE", help="a scope to ask for (repeatable)")
    group.add_argument("--oauth-issuer", metavar="URL", help="the authorization server the credentials belong to")
    group.add_argument("--oauth-idp-token-endpoint", metavar="URL", help="identity_assertion: the IdP's token URL")
    group.add_argument("--oauth-idp-client-id", metavar="ID", help="identity_assertion: our client at the IdP")
    group.add_argument("--oauth-idp-id-token", metavar="env:NAME", help="identity_assertion: the IdP's ID token")


def _oauth_from_args(args: argparse.Namespace) -> OAuthSettings | None:
    given = {field: getattr(args, flag) for flag, field in _OAUTH_FLAGS.items() if getattr(args, flag, None)}
    if "scopes" in given:
        given["scopes"] = " ".join(" ".join(given["scopes"]).split())
    if not given and args.auth != "oauth":
        return None
    return OAuthSettings(**given)


# Escape sequences (CSI, OSC, …) and every other control character but newline and tab: a server's text must not
# retitle, clear or reprogram the terminal it is printed to.
_TERMINAL_UNSAFE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI (7- and 8-bit): cursor, colours, clear screen
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC: window title, hyperlinks, clipboard
    r"|\x1b[ -/]*[0-~]"  # every other escape (reset, charset switches)
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # the remaining control characters
)


def printable(text: str) -> str:
    """What may be printed: known secrets scrubbed, control sequences removed."""
    return _TERMINAL_UNSAFE.sub("", scrub(text))


def _say(text: str) -> None:
    print(printable(text), flush=True)


def _note(text: str) -> None:
    print(printable(text), file=sys.stderr, flush=True)


async def cmd_migrate(reg: Registry, _: argparse.Namespace) -> None:
    applied = await reg.applied_migrations()
    _say(f"schema up to date: {', '.join(applied)}")


async def cmd_servers(reg: Registry, args: argparse.Namespace) -> None:
    if args.action == "add":
        command, command_args = args.command, list(args.arg)
        if args.command_line:
            if args.command or args.url or command_args:
                raise CliError("give the server's command either after -- or with --command/--arg, not both")
            command, command_args = args.command_line[0], args.command_line[1:]
        if not (command or args.url):
            raise CliError("say how to reach the server: --url URL, or its command line after --")
        cfg = ServerConfig(
            name=args.name,
            transport=args.transport or _transport_for(args.url),
            url=args.url,
            command=command,
            args=command_args,
            headers=_pairs(args.header, "--header"),
            env=_pairs(args.env, "--env"),
            allowed_tools=args.allow_tool,
            pinned_tools=args.pin_tool,
            allow_sampling=args.allow_sampling,
            roots=args.root,
            enabled=not args.disabled,
            timeout_ms=args.timeout,
            poll_interval=args.poll_interval,
            result_endpoint=args.result_endpoint,
            poll_profile=args.poll_profile,
        )
        cfg.oauth = _oauth_from_args(args)
        cfg.auth = args.auth or ("oauth" if cfg.oauth else "header" if cfg.headers else "none")
        if cfg.oauth is not None and cfg.auth != "oauth":
            raise CliError(f"--oauth-* settings need --auth oauth, not --auth {cfg.auth}")
        if cfg.transport == "stdio" and cfg.url:
            raise CliError("the stdio transport takes --command, not --url")
        if cfg.transport != "stdio" and cfg.command:
            raise CliError(f"the {cfg.transport} transport takes --url, not --command")
        _refuse_literal_secrets([cfg], allowed=args.allow_literal_secrets)
        cfg.validate()
        found = await detect_oauth(cfg) if cfg.transport in ("streamable-http", "sse") else None
        if found is not None and found.metadata and cfg.auth == "none" and args.auth is None:
            # It publishes OAuth metadata and was given no credentials: OAuth is what it wants.
            cfg.auth, cfg.oauth = "oauth", OAuthSettings()
        if found is not None and cfg.oauth is not None and cfg.oauth.grant == "identity_assertion":
            if cfg.oauth.issuer is None and found.issuer:
                # SEP-990 sends the ID-JAG only to a configured authorization server: the one the server named now,
                # shown here, and fixed from now on.
                cfg.oauth = dataclasses.replace(cfg.oauth, issuer=found.issuer)
        saved = await reg.add_server(cfg, replace=args.replace)
        for item in literal_secrets(saved):
            _note(f"warning: {item} of {saved.name!r} is stored as a literal; prefer env:NAME")
        _say(f"added {saved.name} ({saved.transport} {saved.label})")
        if found is not None and found.metadata:
            where = f" (authorization server {found.issuer})" if found.issuer else ""
            _say(f"{saved.name} asks for OAuth{where}")
            if saved.auth != "oauth":
                _say(f"to use it: servers add {saved.name} --replace --auth oauth … then servers login {saved.name}")
        if saved.auth == "oauth" and saved.oauth is not None:
            if saved.oauth.interactive:
                _say(f"next: python -m mcp_integration servers login {saved.name}")
            else:
                _say(f"{saved.name} uses the {saved.oauth.grant} grant: no login needed")
    elif args.action == "list":
        await _list_servers(reg, as_json=args.json)
    elif args.action == "remove":
        if not await reg.remove_server(args.name):
            raise CliError(f"no server named {args.name!r}")
        _say(f"removed {args.name}")
    elif args.action in ("enable", "disable"):
        if not await reg.set_enabled(args.name, args.action == "enable"):
            raise CliError(f"no server named {args.name!r}")
        _say(f"{args.action}d {args.name}")
    elif args.action == "check":
        async with _runtime(reg, args, args.name, quiet=True) as rt:
            reports = await rt.health.check(args.name)
        failed = [r for r in reports.values() if not r.ok]
        for r in reports.values():
            # The status is the breaker's: one failed check makes a server degraded, three in a row down.
            if not r.ok:
                _say(f"{r.server}: {r.status}, no answer ({r.error})")
            elif r.latency_ms is None:
                _say(f"{r.server}: {r.status}, busy with a call (it answers one request at a time)")
            else:
                _say(f"{r.server}: {r.status} ({r.latency_ms:.0f} ms)")
        if failed:
            raise CliError(f"{len(failed)} of {len(reports)} servers did not answer")
    elif args.action == "login":
        await _login(reg, args)
    elif args.action == "logout":
        cfg = await reg.get_server(args.name)
        if cfg is None:
            raise CliError(f"no server named {args.name!r}")
        forgot = await _oauth_store(reg, args).forget(args.name)
        _say(f"logged out of {args.name}" if forgot else f"{args.name} held no OAuth tokens")
    elif args.action == "import":
        cfgs = load_file(args.file)
        _refuse_literal_secrets(cfgs, allowed=args.allow_literal_secrets)
        if not args.replace:
            existing = {s.name for s in await reg.list_servers()}
            clash = [c.name for c in cfgs if c.name in existing]
            if clash:
                raise CliError(f"already registered: {', '.join(clash[:20])} (use --replace to update them)")
        # One transaction: every entry is stored, or none.
        for saved in await reg.add_servers(cfgs, replace=args.replace):
            for item in literal_secrets(saved):
                _note(f"warning: {item} of {saved.name!r} is stored as a literal; prefer env:NAME")
            _say(f"imported {saved.name} ({saved.transport} {saved.label})")


def _oauth_store(reg: Registry, args: argparse.Namespace) -> OAuthStore:
    return OAuthStore(reg, Vault.from_setting(args.settings.secret_key))


async def _login(reg: Registry, args: argparse.Namespace) -> None:
    from mcp_integration.oauth_login import LoginError, login

    cfg = await reg.get_server(args.name)
    if cfg is None:
        raise CliError(f"no server named {args.name!r}")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise CliError(f"--port must be from 1 to 65535, got {args.port}")
    store = _oauth_store(reg, args)
    try:
        outcome = await login(cfg, store, _say, port=args.port, open_browser=not args.no_browser)
    except LoginError as exc:
        raise CliError(str(exc)) from None
    state = outcome.state
    if not outcome.asked or state is None:
        _say(f"{cfg.name} let us in without asking for authorization; nothing was stored")
        return
    _say(f"logged in to {cfg.name}: {_oauth_summary(state, cfg)}")


def _oauth_summary(state: OAuthState, cfg: ServerConfig) -> str:
    parts = [f"scopes {state.scope!r}" if state.scope else "no scope named"]
    if state.issuer:
        parts.append(f"authorization server {state.issuer}")
    if state.subject:
        parts.append(f"as {state.subject} (the token says)")
    if cfg.oauth is not None:
        parts.append(f"{cfg.oauth.grant} grant")
    if state.expires_at is not None:
        left = (state.expires_at - datetime.now(UTC)).total_seconds()
        parts.append(f"token valid {_duration(left)}, refreshed by the workers as needed")
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0, int(seconds))} s"
    return f"{int(seconds // 60)} min" if seconds < 7200 else f"{int(seconds // 3600)} h"


def _auth_column(cfg: ServerConfig, state: OAuthState | None) -> str:
    if cfg.auth != "oauth":
        return cfg.auth
    if state is not None and state.needs_login:
        return f"oauth: needs login{f' (scope {state.needed_scope})' if state.needed_scope else ''}"
    if state is None or not state.has_tokens:
        interactive = cfg.oauth is None or cfg.oauth.interactive
        return "oauth: not logged in" if interactive else "oauth: no token yet"
    if state.expires_at is not None:
        left = (state.expires_at - datetime.now(UTC)).total_seconds()
        return f"oauth: token {_duration(left)} left" if left > 0 else "oauth: token expired (refreshed on use)"
    return "oauth: logged in"


def _transport_for(url: str | None) -> str:
    """The transport a URL most likely speaks, when --transport is not given."""
    if url is None:
        return "stdio"
    lowered = url.lower()
    if lowered.startswith(("ws://", "wss://")):
        return "websocket"
    return "sse" if lowered.split("?", 1)[0].rstrip("/").endswith("/sse") else "streamable-http"


_LITERAL_HELP = "store header/env values that look secret as given, not as env:NAME references (not advised)"


def _refuse_literal_secrets(cfgs: list[ServerConfig], *, allowed: bool) -> None:
    """Secrets belong in the environment, referenced as env:NAME (or {env:NAME} in a URL); a literal one is refused
    unless asked for."""
    found = [f"{c.name}: {item}" for c in cfgs for item in literal_secrets(c)]
    if found and not allowed:
        raise CliError(
            f"{'; '.join(found[:10])} holds a literal value that looks secret: put it in the environment and write "
            "env:NAME instead, or {env:NAME} inside a URL (or pass --allow-literal-secrets)"
        )


async def _list_servers(reg: Registry, *, as_json: bool) -> None:
    servers = await reg.list_servers()
    health = await reg.health()
    oauth = await OAuthStore(reg, None).states()
    if as_json:
        rows = []
        for s in servers:
            h = health.get(s.name)
            rows.append(
                {
                    "name": s.name,
                    "transport": s.transport,
                    "target": s.label,
                    "enabled": s.enabled,
                    "headers": redact(s.headers),
                    "env": redact(s.env),
                    "allowed_tools": s.allowed_tools,
                    "roots": s.roots,
                    "pinned_tools": s.pinned_tools,
                    "allow_sampling": s.allow_sampling,
                    "timeout_ms": s.timeout_ms,
                    "poll_interval": s.poll_interval,
                    "poll_profile": s.poll_profile,
                    "health": h.status if h else "unknown",
                    "auth": s.auth,
                    "oauth": _oauth_record(s, oauth.get(s.name)),
                }
            )
        _say(json.dumps(rows, indent=2))
        return
    if not servers:
        _say("no servers registered; add one with: python -m mcp_integration servers add NAME --transport …")
        return
    table = [("NAME", "TRANSPORT", "ENABLED", "HEALTH", "CHECKED", "AUTH", "TARGET")]
    for s in servers:
        h = health.get(s.name)
        status = h.status if h else "unknown"
        if h and h.latency_ms is not None and status in ("up", "degraded"):
            status += f" ({h.latency_ms:.0f} ms)"
        if h and h.consecutive_failures:
            status += f", {h.consecutive_failures} failed"
        checked = _ago(h.checked_at) if h and h.checked_at else "never"
        auth = _auth_column(s, oauth.get(s.name))
        table.append((s.name, s.transport, "yes" if s.enabled else "no", status, checked, auth, s.label))
    _say(_format_table(table))


def _oauth_record(cfg: ServerConfig, state: OAuthState | None) -> dict[str, Any] | None:
    """What `servers list --json` says of OAuth: settings (secrets as their env: references) and state, no token."""
    if cfg.auth != "oauth" or cfg.oauth is None:
        return None
    record: dict[str, Any] = {"settings": cfg.oauth.to_json()}
    if state is not None:
        record["state"] = {
            "logged_in": state.has_tokens,
            "needs_login": state.needs_login,
            "needed_scope": state.needed_scope,
            "reason": state.reason,
            "scope": state.scope,
            "issuer": state.issuer,
            "subject": state.subject,
            "expires_at": state.expires_at.isoformat() if state.expires_at else None,
            "refreshes": state.refreshes,
        }
    return record


def _ago(when: datetime) -> str:
    seconds = max(0, int((datetime.now(UTC) - when).total_seconds()))
    if seconds < 120:
        return f"{seconds} s ago"
    return f"{seconds // 60} min ago" if seconds < 7200 else f"{seconds // 3600} h ago"


def _format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@asynccontextmanager
async def _runtime(
    reg: Registry, args: argparse.Namespace, server: str | None, *, quiet: bool = False
) -> AsyncIterator[Runtime]:
    """The enabled servers (or the one named), discovered before the command goes on."""
    servers = await reg.list_servers(enabled_only=True)
    if server is not None:
        servers = [s for s in servers if s.name == server]
        if not servers:
            raise CliError(f"no enabled server named {server!r}")
    async with open_runtime(reg, args.settings, servers=servers, wait=True) as rt:
        for name, state in rt.dispatcher.servers.items():
            if quiet:
                break
            if state.error:
                _note(f"warning: {state.error}")
            for why in state.skipped:
                _note(f"warning: server {name!r}: skipped {why}")
        yield rt


def _unavailable(d: Dispatcher) -> list[str]:
    """Why each server that could not be discovered failed (the tools of such a server are missing)."""
    return [state.error for state in d.servers.values() if state.error]


async def cmd_tools(reg: Registry, args: argparse.Namespace) -> None:
    async with _runtime(reg, args, args.server) as rt:
        d = rt.dispatcher
        _list_tools(d, args)
        failed = _unavailable(d)
        if failed:
            raise CliError(f"{len(failed)} of {len(d.servers)} servers could not be listed: {'; '.join(failed)}")


def _list_tools(d: Dispatcher, args: argparse.Namespace) -> None:
    entries = d.tools
    if args.json:
        _say(
            json.dumps(
                [
                    {
                        "name": e.name,
                        "server": e.server,
                        "tool": e.spec.name,
                        "description": e.spec.description,
                        "input_schema": e.spec.input_schema,
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return
    if not entries:
        _say("no tools available")
        return
    table = [("NAME", "SERVER", "DESCRIPTION")]
    for e in entries:
        first = (e.spec.description.strip().splitlines() or [""])[0]
        table.append((e.name, e.server, first[:80]))
    _say(_format_table(table))


async def cmd_call(reg: Registry, args: argparse.Namespace) -> None:
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise CliError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    arguments = _json_object("--args", args.args, '\'{"text": "hi"}\'')
    asker = _asker(args.input)
    async with _runtime(reg, args, args.server, quiet=True) as rt:
        d = rt.dispatcher
        try:
            job = d.submit(args.tool, arguments, server=args.server, asker=asker)
        except ToolCallError as exc:
            failed = _unavailable(d)
            if exc.kind == "unknown_tool" and failed:
                # The tool may well be on a server that could not be reached: say which, and why.
                raise CliError(f"{exc}; {'; '.join(failed)}") from None
            raise
        job.add_listener(_print_event)
        result = await job.wait(args.timeout)
        if args.raw:
            _say(
                json.dumps(
                    {"text": result.text, "structured": result.structured, "content": result.content},
                    indent=2,
                    ensure_ascii=False,
                )
            )
        else:
            _say(result.text)


def _asker(given: str | None) -> Asker:
    if given is None:
        return ask_on_terminal if sys.stdin.isatty() else decline_all
    return from_values(
        _json_object("--input", given, '\'{"day": "2026-12-01"}\'', what="a JSON object of field values")
    )


def _json_object(flag: str, text: str, example: str, *, what: str = "a JSON object") -> dict[str, Any]:
    """A command-line JSON object, checked for size and depth before it is parsed."""
    if len(text.encode("utf-8", "replace")) > MAX_ARGUMENT_BYTES:
        raise CliError(f"{flag} is larger than {MAX_ARGUMENT_BYTES:,} bytes")
    if json_too_deep(text):
        raise CliError(f"{flag} nests deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{flag} is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise CliError(f"{flag} must be {what}, like {example}")
    return value


def _print_event(event: JobEvent) -> None:
    d = event.data
    if event.kind == "progress":
        total = f"/{d['total']:g}" if d.get("total") is not None else ""
        msg = f" {d['message']}" if d.get("message") else ""
        _note(f"… progress {d['progress']:g}{total}{msg}")
    elif event.kind == "accepted":
        ref = d.get("task_id") or d.get("receipt_id")
        _note(f"… accepted ({d.get('job_kind', 'plain')} call{f' {ref}' if ref else ''})")
    elif (event.kind == "status" and d.get("state") != "working") or (event.kind == "status" and d.get("message")):
        msg = f": {d['message']}" if d.get("message") else ""
        _note(f"… status {d.get('state')}{msg}")
    elif event.kind == "poll":
        extra = f" ({d['status']})" if d.get("status") else f" (error: {d['error']})" if d.get("error") else ""
        _note(f"… poll {d['n']}{extra}")
    elif event.kind == "queued":
        _note(f"… queued behind {d['ahead']} calls to this server")
    elif event.kind == "wait_timeout":
        _note(f"… still running after {d['waited_s']:g} s")
    elif event.kind == "asked":
        _note(f"… the server asks: {d['question'].message}")
    elif event.kind == "answered":
        why = f" ({d['why']})" if d.get("why") else ""
        _note(f"… answered: {d['action']}{why}")


async def cmd_jobs(reg: Registry, args: argparse.Namespace) -> None:
    if not 1 <= args.limit <= MAX_JOBS_LISTED:
        raise CliError(f"--limit must be from 1 to {MAX_JOBS_LISTED}, got {args.limit}")
    rows = await reg.recent_jobs(server=args.server, state=args.state, limit=args.limit)
    if args.json:
        _say(json.dumps([_job_record(r) for r in rows], indent=2, ensure_ascii=False))
        return
    if not rows:
        _say("no jobs recorded" + (" for this filter" if args.server or args.state else ""))
        return
    table = [("SUBMITTED", "SERVER", "TOOL", "KIND", "STATE", "TOOK", "POLLS", "ID", "ERROR")]
    for r in rows:
        took = _job_seconds(r)
        table.append(
            (
                r["submitted_at"].astimezone().strftime("%Y-%m-%d %H:%M:%S"),
                r["server_name"],
                r["tool"],
                r["kind"],
                r["state"] + (" (late)" if r["delivered_late"] else ""),
                "-" if took is None else f"{took:.1f} s",
                str(r["polls"]),
                str(r["id"]),
                _one_line(r["error"] or "", 60),
            )
        )
    _say(_format_table(table))


def _job_seconds(row: dict[str, Any]) -> float | None:
    return (row["finished_at"] - row["submitted_at"]).total_seconds() if row["finished_at"] else None


def _job_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "server": row["server_name"],
        "tool": row["tool"],
        "kind": row["kind"],
        "state": row["state"],
        "submitted_at": row["submitted_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
        "duration_s": _job_seconds(row),
        "polls": row["polls"],
        "delivered_late": row["delivered_late"],
        "error": row["error"],
    }


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def cmd_demo(reg: Registry, args: argparse.Namespace) -> None:
    from mcp_integration.demo import run_demo

    await run_demo(reg, args.settings, out=_say)


async def cmd_dashboard(reg: Registry, args: argparse.Namespace) -> None:
    from mcp_integration.web import BindingError, serve

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.check_interval > 0:
        raise CliError(f"--check-interval must be a positive number of seconds, got {args.check_interval:g}")
    token = args.settings.dashboard_token
    try:
        await serve(
            reg, host=args.host, port=args.port, token=token, check_interval_s=args.check_interval, announce=_note
        )
    except BindingError as exc:
        raise CliError(str(exc)) from None


async def cmd_secret_key(_: Registry | None, __: argparse.Namespace) -> None:
    _say(new_key())


COMMANDS = {
    "migrate": cmd_migrate,
    "servers": cmd_servers,
    "tools": cmd_tools,
    "call": cmd_call,
    "jobs": cmd_jobs,
    "demo": cmd_demo,
    "dashboard": cmd_dashboard,
    "secret-key": cmd_secret_key,
}


async def run(args: argparse.Namespace, settings: Settings) -> None:
    args.settings = settings
    if args.verb == "secret-key":
        await cmd_secret_key(None, args)
        return
    async with open_registry(settings) as reg:
        await COMMANDS[args.verb](reg, args)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """argparse, with two conventions of MCP clients' CLIs that argparse alone does not follow: everything after
    `--` is a server's command line (so `-y` or `--db-path` reach the server, not us), and `--arg` takes a value
    that starts with a dash (`--arg -y`)."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    command_line: list[str] = []
    if "--" in tokens:
        cut = tokens.index("--")
        tokens, command_line = tokens[:cut], tokens[cut + 1 :]
    joined: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] == "--arg" and i + 1 < len(tokens):
            joined.append(f"--arg={tokens[i + 1]}")
            i += 2
            continue
        joined.append(tokens[i])
        i += 1
    parser = build_parser()
    args = parser.parse_args(joined)
    if command_line and not (args.verb == "servers" and args.action == "add"):
        parser.error("a command line after -- is only taken by `servers add`")
    if command_line and not command_line[0]:
        parser.error("the command after -- is empty")
    args.command_line = command_line
    if getattr(args, "root", None):
        # A root is stored absolute: the server may be started from another directory (another worker, even).
        args.root = [r if r.startswith("file://") else os.path.abspath(r) for r in args.root]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_env()
    install_log_scrubber()
    try:
        # LOG_FORMAT=json: one JSON object per line, with the job's id, server and tool on lines about a call.
        quiet = logging.ERROR if args.verb != "dashboard" else settings.log_level
        setup_logging(settings.log_format, level=logging.INFO if args.verbose else quiet)
    except ValueError as exc:
        _note(f"error: {exc}")
        return 1
    try:
        asyncio.run(run(args, settings))
    except (CliError, VoiceMcpError) as exc:
        _note(f"error: {exc}")
        return 1
    except psycopg.OperationalError as exc:
        first = (str(exc).strip().splitlines() or ["connection failed"])[-1]
        _note(f"error: cannot use the database: {first}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
