"""The shape of the code, checked: the import rules of docs/DECISIONS.md, its module map, and the SDK surface.

- No import cycle among the modules of `mcp_integration/` (imports made only for type checking do not count).
- LiveKit is imported only by the voice modules: agent.py, livekit_tools.py and livekit_text.py.
- Storage (registry, registry_watch, snapshot, job_store) does not import the layers above it.
- Every module of the package has its line in the module map of docs/DECISIONS.md, and the map names no
  module that is not there.
- The `mcp` SDK's private names that `mcp_compat.py` uses exist in the installed SDK, which is the tested one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

from mcp_integration import mcp_compat

PACKAGE = ROOT / "mcp_integration"
VOICE = {"agent", "mcp_integration.livekit_tools", "mcp_integration.livekit_text"}
STORAGE = {
    "mcp_integration.registry",
    "mcp_integration.registry_watch",
    "mcp_integration.snapshot",
    "mcp_integration.oauth_store",
    "mcp_integration.signals",
    "mcp_integration.relay",
    "mcp_integration.health_lease",
    "mcp_integration.fleet",
}
ABOVE_STORAGE = {
    "mcp_integration.dispatcher",
    "mcp_integration.connection",
    "mcp_integration.health",
    "mcp_integration.runtime",
    "mcp_integration.jobs",
    "mcp_integration.job_store",
}


def modules() -> dict[str, Path]:
    found = {"agent": ROOT / "agent.py"}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module a file imports at run time (module level or inside functions; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}


def test_no_import_cycle_inside_the_package() -> None:
    graph = {k: v for k, v in package_graph().items() if k != "agent"}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_livekit_is_imported_only_by_the_voice_modules() -> None:
    offenders = sorted(
        name
        for name, path in modules().items()
        if name not in VOICE and any(m == "livekit" or m.startswith("livekit.") for m in imports(path))
    )
    assert not offenders, f"LiveKit imported outside the voice modules: {offenders}"


def test_storage_does_not_import_the_layers_above_it() -> None:
    graph = package_graph()
    wrong = {name: sorted(graph[name] & ABOVE_STORAGE) for name in STORAGE if graph[name] & ABOVE_STORAGE}
    assert not wrong, f"storage modules importing upward: {wrong}"


def test_the_module_map_matches_the_code() -> None:
    text = (ROOT / "docs" / "DECISIONS.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    bullets = "\n".join(line for line in section.splitlines() if line.startswith(("- ", "  ")))
    mapped = set(re.findall(r"`([\w/]+\.py)`", bullets))
    present = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    present -= {"__main__.py", "examples/__init__.py"}
    assert mapped == present, f"not in the map: {sorted(present - mapped)}; no such module: {sorted(mapped - present)}"


def test_the_sdk_has_what_mcp_compat_uses_and_is_the_tested_one() -> None:
    assert mcp_compat.missing() == []
    assert mcp_compat.mcp_version() == mcp_compat.TESTED_MCP
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    assert pins["mcp"] == mcp_compat.TESTED_MCP
    private = [
        name
        for name, path in modules().items()
        if name != "mcp_integration.mcp_compat" and any(m.startswith("mcp.client._") for m in imports(path))
    ]
    assert not private, f"the SDK's private modules imported outside mcp_compat: {private}"
