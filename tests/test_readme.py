"""The README's commands for configuring servers, run as written: copied out of README.md, run by bash, in order.

They run from the project root against a fresh schema, with `python` the test's interpreter and `npx` finding the
pinned reference servers of package.json (installed by `.ci/run`), and a home folder holding the Claude Desktop
configuration that `servers import` reads. Each must exit 0; the servers a command reaches must really answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
from conftest import ROOT

README = ROOT / "README.md"
SHARED = Path("/srv/shared")  # the folder the README's filesystem server is given


def configure_block() -> str:
    text = README.read_text()
    section = text.split("## Configure MCP servers", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no bash block under 'Configure MCP servers'"
    return block[1]


def commands(block: str) -> list[str]:
    """Each command of the block: continuation lines joined, comments and blank lines left out."""
    out: list[str] = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_every_server_command_in_the_readme_runs_as_written(pg_url: str, tmp_path: Path) -> None:
    if not SHARED.is_dir():
        SHARED.mkdir(parents=True)  # CI runs as root; elsewhere create it once: sudo mkdir -p /srv/shared
    (SHARED / "welcome.txt").write_text("Hello from /srv/shared.\n")
    home = tmp_path / "home"
    claude = home / ".config" / "Claude" / "claude_desktop_config.json"
    claude.parent.mkdir(parents=True)
    claude.write_text(
        json.dumps(
            {"mcpServers": {"memory": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-memory"]}}}
        )
    )
    python_dir = Path(sys.executable).parent  # the venv's bin: `python` there is this interpreter, venv and all
    assert (python_dir / "python").exists(), f"no `python` beside {sys.executable}"
    node_bin = ROOT / "node_modules" / ".bin"
    assert (node_bin / "node").exists(), "run `npm ci` in the project root (.ci/run does)"
    npx = shutil.which("npx")
    assert npx, "npx (Node.js) is needed for the README's stdio example"
    env = {
        **os.environ,
        "HOME": str(home),
        "DATABASE_URL": pg_url,
        "PATH": os.pathsep.join([str(python_dir), str(node_bin), os.environ.get("PATH", "")]),
        "npm_config_offline": "true",  # the pinned install, never a download
    }
    ran = []
    for command in commands(configure_block()):
        proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{command}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        ran.append((command, proc.stdout))
    assert len(ran) >= 10
    out = dict(ran)
    listed = next(v for k, v in out.items() if k.startswith("python -m mcp_integration servers list"))
    for name in ("files", "crm", "n8n", "live", "memory", "linear", "reports"):
        assert re.search(rf"^{name}\s", listed, re.M), listed
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT command, args FROM mcp_servers WHERE name = 'files'").fetchone()
        assert row == ("npx", ["-y", "@modelcontextprotocol/server-filesystem", "/srv/shared"])
        auth = dict(conn.execute("SELECT name, auth FROM mcp_servers WHERE name IN ('linear', 'reports')").fetchall())
        assert auth == {"linear": "oauth", "reports": "oauth"}
        grant = conn.execute("SELECT oauth->>'grant' FROM mcp_servers WHERE name = 'reports'").fetchone()
        assert grant == ("client_credentials",)
        jobs = conn.execute("SELECT tool, state FROM mcp_jobs WHERE server_name = 'files'").fetchall()
    assert jobs and all(state == "completed" for _, state in jobs), jobs
    called = next(v for k, v in out.items() if " call " in f" {k} ")
    assert "welcome.txt" in called
