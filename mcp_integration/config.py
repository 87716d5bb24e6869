"""Settings from the environment (and a .env file, through python-dotenv)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dotenv import load_dotenv

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    data_dir: Path
    log_level: str
    connect_timeout_s: float
    # How long a session start waits for the database before starting from the on-disk copy of the registry.
    db_start_timeout_s: float = 3.0
    # Seconds between health checks of each server (the breaker probes a down one sooner).
    health_interval_s: float = 15.0

    @property
    def snapshot_path(self) -> Path:
        """The last-known registry and tool cache, for a session that starts while the database is down."""
        return self.data_dir / "registry-snapshot.json"

    @classmethod
    def from_env(cls, *, dotenv: bool = True) -> Settings:
        if dotenv:
            # An explicit environment wins over .env, as twelve-factor tools expect.
            load_dotenv(PROJECT_ROOT / ".env", override=False)
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            data_dir=Path(os.environ.get("VOICE_MCP_DATA_DIR") or PROJECT_ROOT / ".data"),
            log_level=os.environ.get("LOG_LEVEL", "INFO").upper(),
            connect_timeout_s=float(os.environ.get("MCP_CONNECT_TIMEOUT_S", "10")),
            db_start_timeout_s=float(os.environ.get("DB_START_TIMEOUT_S", "3")),
            health_interval_s=float(os.environ.get("HEALTH_INTERVAL_S", "15")),
        )
