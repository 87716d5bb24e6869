"""The filler policy: what to say while a tool works, and when. Pure: no LiveKit, no I/O beyond loading YAML.

The voice layer asks `FillerRun.line(step, ...)` each time LiveKit's filler scheduler fires; this module
decides the words (by phase, progress-aware, never the same line twice in a row) and the rhythm.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcp_integration.config import PROJECT_ROOT

__all__ = [
    "DEFAULT_FILE",
    "PHASES",
    "FillerLines",
    "FillerPolicy",
    "FillerRun",
]


log = logging.getLogger(__name__)

DEFAULT_FILE = PROJECT_ROOT / "prompts" / "fillers.yaml"
PHASES = ("start", "still_working", "progress", "halfway", "almost_done", "taking_long", "release")


@dataclass(frozen=True)
class FillerLines:
    lines: dict[str, list[str]]
    late_prefix: str = "About your earlier question: "
    label: str | None = None


@dataclass
class FillerPolicy:
    threshold_s: float = 1.0
    interval_s: tuple[float, float] = (6.0, 8.0)
    taking_long_after_s: float = 20.0
    default: FillerLines = field(default_factory=lambda: FillerLines({p: [] for p in PHASES}))
    servers: dict[str, FillerLines] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str = DEFAULT_FILE, *, language: str = "en") -> FillerPolicy:
        """The policy of `path`; for a language other than English, its lines from `<stem>.<lang>.yaml` beside it
        (a phase it lacks keeps the English lines; a language without a file keeps them all, with a warning)."""
        path = Path(path)
        doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        raw = doc.get("lines") or {}
        lang = (language or "en").replace("_", "-").split("-")[0].lower()
        if lang != "en":
            translated = path.with_name(f"{path.stem}.{lang}{path.suffix}")
            if translated.is_file():
                raw = raw | ((yaml.safe_load(translated.read_text(encoding="utf-8")) or {}).get("lines") or {})
            else:
                log.warning("no filler lines in %r (%s); the English ones are used", language, translated.name)
        late_prefix = str(raw.get("late_prefix", "About your earlier question: "))
        base = FillerLines({p: [] for p in PHASES} | _phases(raw), late_prefix)
        servers = {}
        for name, override in (doc.get("servers") or {}).items():
            # A server overrides only the phases it names; the rest fall back to the defaults.
            merged = base.lines | _phases(override.get("lines") or {})
            servers[name] = FillerLines(merged, late_prefix, override.get("label"))
        low, high = doc.get("interval_s", [6.0, 8.0])
        return cls(
            threshold_s=float(doc.get("threshold_s", 1.0)),
            interval_s=(float(low), float(high)),
            taking_long_after_s=float(doc.get("taking_long_after_s", 20.0)),
            default=base,
            servers=servers,
        )

    def for_server(self, server: str) -> FillerLines:
        return self.servers.get(server, self.default)

    def run(self, server: str, *, rng: random.Random | None = None) -> FillerRun:
        rng = rng or random.Random()
        return FillerRun(self.for_server(server), self, rng, rng.uniform(*self.interval_s))


def _phases(raw: dict[str, Any]) -> dict[str, list[str]]:
    return {p: [str(x) for x in raw[p]] for p in PHASES if raw.get(p)}


@dataclass
class FillerRun:
    """The filler of one tool call: remembers what it said so lines never repeat back to back."""

    lines: FillerLines
    policy: FillerPolicy
    rng: random.Random
    interval_s: float
    last: str | None = None
    spoken: list[str] = field(default_factory=list)

    def phase(self, step: int, elapsed_s: float, progress: float | None) -> str:
        if step == 0:
            return "start"
        if elapsed_s >= self.policy.taking_long_after_s:
            return "taking_long"
        if progress is not None:
            if progress >= 0.8:
                return "almost_done"
            if 0.4 <= progress < 0.6:
                return "halfway"
            return "progress"
        return "still_working"

    def line(self, step: int, *, elapsed_s: float, progress: float | None = None, message: str | None = None) -> str:
        phase = self.phase(step, elapsed_s, progress)
        choices = self.lines.lines.get(phase) or self.lines.lines.get("still_working") or ["Still working on it."]
        rendered = []
        for template in choices:
            if "{message}" in template and not message:
                continue
            percent = round((progress or 0) * 100)
            rendered.append(template.format(percent=percent, message=(message or "").rstrip(".")))
        fresh = [c for c in rendered if c != self.last] or [c for c in self.default_pool() if c != self.last]
        text = self.rng.choice(fresh) if fresh else "Still working on it."
        self.last = text
        self.spoken.append(text)
        return text

    def default_pool(self) -> list[str]:
        return [x for p in ("still_working", "start") for x in self.lines.lines.get(p, [])]

    def release_line(self) -> str:
        return (self.lines.lines.get("release") or ["This is taking a little longer; I'll tell you when it's ready."])[
            0
        ]
