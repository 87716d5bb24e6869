"""The MCP conformance suite's client under test: our CLI, and nothing else.

    npx conformance client --command "<python> tests/conformance/client.py" --scenario NAME

The suite starts a scenario server and runs this with the server's URL as the last argument
(`MCP_CONFORMANCE_SCENARIO` names the scenario). Like a user at a terminal, this registers the server, lists its
tools, calls each one with arguments made from its schema, and removes the server again — every step a
`python -m mcp_integration` command, so what is measured is the product, not a test harness. It makes no SDK
call of its own. The registry is DATABASE_URL's (tests give each run a schema of its own).

Authorization scenarios (`auth/*`) add the server as an OAuth server, with what the scenario's context
(`MCP_CONFORMANCE_CONTEXT`) gives as `servers add` flags (secrets through the environment, as env:NAME), then
run `servers login`. The person's part of a login is done headlessly: the authorization address the CLI prints
is fetched and its redirect followed to the CLI's loopback listener, as a browser would. A call refused with
"needs a login" (a scope only a person can grant) gets one more login and one more try.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
# CONFORMANCE_VERBOSE=1: the CLI logs what it does (into the scenario's stderr.txt).
VERBOSE = ["-v"] if os.environ.get("CONFORMANCE_VERBOSE") else []


# The client ID metadata document the suite's CIMD scenarios expect (the suite never fetches it).
CIMD_URL = "https://conformance-test.local/client-metadata.json"
ENV = dict(os.environ)
if not ENV.get("VOICE_MCP_SECRET_KEY"):
    from cryptography.fernet import Fernet

    ENV["VOICE_MCP_SECRET_KEY"] = Fernet.generate_key().decode()


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mcp_integration", *VERBOSE, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    # What the CLI printed goes to the suite's record of this client (its stdout.txt and stderr.txt).
    sys.stdout.write(f"$ mcp_integration {' '.join(args)}\n{proc.stdout}")
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(proc.returncode)
    return proc


def example(schema: dict[str, Any]) -> Any:
    """A value a schema accepts: its default, else its first enum value, else a plain one of its type."""
    if "default" in schema:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if kind in ("number", "integer"):
        return 2
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return arguments(schema)
    return "conformance"


def arguments(schema: dict[str, Any]) -> dict[str, Any]:
    props = schema.get("properties") or {}
    return {name: example(props.get(name) or {}) for name in schema.get("required") or []}


def oauth_flags(scenario: str, context: dict[str, Any]) -> list[str]:
    """`servers add` flags for an authorization scenario: what its context gives, secrets as env:NAME."""

    def secret(name: str, value: str) -> str:
        ENV[name] = value
        return f"env:{name}"

    flags = ["--auth", "oauth"]
    client_id, client_secret = context.get("client_id"), context.get("client_secret")
    if context.get("private_key_pem"):
        flags += ["--oauth-grant", "private_key_jwt", "--oauth-client-id", client_id]
        flags += ["--oauth-private-key", secret("CONFORMANCE_PRIVATE_KEY", context["private_key_pem"])]
        flags += ["--oauth-signing-alg", context.get("signing_algorithm", "ES256")]
    elif context.get("idp_id_token"):
        flags += ["--oauth-grant", "identity_assertion", "--oauth-client-id", client_id]
        flags += ["--oauth-client-secret", secret("CONFORMANCE_CLIENT_SECRET", client_secret)]
        flags += ["--oauth-idp-token-endpoint", context["idp_token_endpoint"]]
        flags += ["--oauth-idp-client-id", context["idp_client_id"]]
        flags += ["--oauth-idp-id-token", secret("CONFORMANCE_IDP_ID_TOKEN", context["idp_id_token"])]
    elif client_id and scenario.startswith("auth/client-credentials"):
        flags += ["--oauth-grant", "client_credentials", "--oauth-client-id", client_id]
        flags += ["--oauth-client-secret", secret("CONFORMANCE_CLIENT_SECRET", client_secret)]
    elif client_id:
        flags += ["--oauth-client-id", client_id]
        if client_secret:
            flags += ["--oauth-client-secret", secret("CONFORMANCE_CLIENT_SECRET", client_secret)]
    else:
        flags += ["--oauth-client-metadata-url", CIMD_URL]
    return flags


def login(name: str) -> bool:
    """`servers login`, with the browser's part done here: fetch the printed address and follow its redirect to
    the CLI's loopback listener."""
    cmd = [sys.executable, "-m", "mcp_integration", *VERBOSE, "servers", "login", name, "--no-browser"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read() if proc.stderr else ""))
    reader.start()
    sys.stdout.write(f"$ mcp_integration servers login {name}\n")
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        address = line.strip()
        if address.startswith(("http://", "https://")) and "response_type=code" in address:
            try:
                httpx.get(address, follow_redirects=True, timeout=30)
            except httpx.HTTPError as exc:
                sys.stdout.write(f"(browser step: {exc})\n")
    code = proc.wait(timeout=120)
    reader.join()
    sys.stderr.write("".join(errors))
    return code == 0


def main() -> int:
    url = sys.argv[-1]
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "?")
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    name = f"conformance-{uuid.uuid4().hex[:8]}"
    print(f"scenario {scenario} at {url}")
    extra = oauth_flags(scenario, context) if scenario.startswith("auth/") else []
    cli("servers", "add", name, "--transport", "streamable-http", "--url", url, *extra)
    try:
        if extra and not login(name):
            return 1
        listed = cli("tools", "--server", name, "--json")
        tools = json.loads(listed.stdout or "[]")
        for tool in tools:
            args = json.dumps(arguments(tool["input_schema"]))
            # --input '{}': a question from the server (elicitation) is accepted with the schema's defaults, as a
            # person pressing Enter at every prompt would.
            call = ["call", tool["tool"], "--server", name, "--args", args, "--timeout", "20", "--input", "{}"]
            done = cli(*call, check=False)
            if done.returncode != 0 and "needs a login" in done.stderr and login(name):
                done = cli(*call, check=False)
            if done.returncode != 0 and not scenario.startswith("auth/"):
                return done.returncode
    finally:
        cli("servers", "remove", name, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
