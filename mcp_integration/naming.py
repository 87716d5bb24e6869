"""Tool names an LLM can call (`^[a-zA-Z0-9_-]{1,64}$`), unique across all servers, stable for a given set."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable

__all__ = [
    "MAX_LEN",
    "SAFE_RE",
    "assign_names",
    "sanitize",
]


MAX_LEN = 64
_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]+")
SAFE_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def sanitize(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("_") or "tool"


def _fit(name: str, server: str, original: str) -> str:
    if len(name) <= MAX_LEN:
        return name
    digest = hashlib.sha1(f"{server}\0{original}".encode()).hexdigest()[:8]
    return f"{name[: MAX_LEN - 9]}_{digest}"


def assign_names(tools: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Map each (server, tool) to a safe name.

    A name offered by one server only keeps its own (sanitised) name; a name that two servers offer becomes
    `server__name` for each of them, so both stay reachable. Anything still clashing gets a short hash.
    """
    pairs = sorted(set(tools))
    base = {p: sanitize(p[1]) for p in pairs}
    servers_per_base: dict[str, set[str]] = {}
    for (server, _), b in base.items():
        servers_per_base.setdefault(b, set()).add(server)
    names: dict[tuple[str, str], str] = {}
    for (server, tool), b in base.items():
        shared = len(servers_per_base[b]) > 1
        names[(server, tool)] = _fit(f"{server}__{b}" if shared else b, server, tool)
    counts = Counter(names.values())
    for (server, tool), name in names.items():
        if counts[name] > 1:
            digest = hashlib.sha1(f"{server}\0{tool}".encode()).hexdigest()[:8]
            names[(server, tool)] = f"{name[: MAX_LEN - 9]}_{digest}"
    return names
