"""The MCP conformance suite's client under test: our CLI, and nothing else.

    npx conformance client --command "<python> tests/conformance/client.py" --scenario NAME

The suite starts a scenario server and runs this with the server's URL as the last argument
(`MCP_CONFORMANCE_SCENARIO` names the scenario). Like a user at a terminal, this registers the server, lists its
tools, calls each one with arguments made from its schema, and removes the server again — every step a
`python -m mcp_integration` command, so what is measured is the product, not a test harness. It makes no SDK
call of its own. The registry is DATABASE_URL's (tests give each run a schema of its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# CONFORMANCE_VERBOSE=1: the CLI logs what it does (into the scenario's stderr.txt).
VERBOSE = ["-v"] if os.environ.get("CONFORMANCE_VERBOSE") else []


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mcp_integration", *VERBOSE, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
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


def main() -> int:
    url = sys.argv[-1]
    name = f"conformance-{uuid.uuid4().hex[:8]}"
    print(f"scenario {os.environ.get('MCP_CONFORMANCE_SCENARIO', '?')} at {url}")
    cli("servers", "add", name, "--transport", "streamable-http", "--url", url)
    try:
        listed = cli("tools", "--server", name, "--json")
        tools = json.loads(listed.stdout or "[]")
        for tool in tools:
            args = json.dumps(arguments(tool["input_schema"]))
            cli("call", tool["tool"], "--server", name, "--args", args, "--timeout", "20")
    finally:
        cli("servers", "remove", name, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
