"""Settings from the environment (and a .env file, through python-dotenv): every variable the project reads is
read here, once, and each one is used.

Secrets the registry refers to (`env:NAME`) are not settings: they are resolved where a connection needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import load_dotenv

__all__ = ["PROJECT_ROOT", "Settings"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None  # DATABASE_URL; unset: an embedded PostgreSQL under data_dir
    data_dir: Path = PROJECT_ROOT / ".data"  # VOICE_MCP_DATA_DIR
    log_level: str = "WARNING"  # LOG_LEVEL, for the status page (the CLI says only errors unless -v)
    log_format: str = "text"  # LOG_FORMAT: text | json
    connect_timeout_s: float = 10.0  # MCP_CONNECT_TIMEOUT_S: an MCP handshake, and a server's tool listing
    # DB_START_TIMEOUT_S: how long a session start waits for the database before starting from the on-disk copy.
    db_start_timeout_s: float = 3.0
    # HEALTH_INTERVAL_S: seconds between health checks of each server (the breaker probes a down one sooner).
    health_interval_s: float = 15.0
    # VOICE_MCP_RELAY: the Unix socket of the machine's relay (relay.py), which listens to PostgreSQL for every job
    # process of a worker; unset: each process listens on a connection of its own. agent.py sets it for its job
    # processes.
    relay_socket: str | None = None
    # DB_POOL_MAX / DB_POOL_IDLE_S: a voice process's pool: at most this many connections, each closed after this
    # long unused (none is kept open while a session is quiet).
    db_pool_max: int = 2
    db_pool_idle_s: float = 10.0
    dashboard_token: str | None = None  # DASHBOARD_TOKEN: required to serve the status page off loopback
    # VOICE_MCP_SECRET_KEY: Fernet key(s), comma-separated, sealing OAuth tokens in the registry (vault.py).
    secret_key: str | None = field(default=None, repr=False)
    metrics_port: int | None = None  # METRICS_PORT: the worker's Prometheus endpoint
    prometheus_multiproc_dir: str | None = None  # PROMETHEUS_MULTIPROC_DIR: metrics of every job process
    # The voice pipeline: OpenAI (or an OpenAI-compatible server at OPENAI_BASE_URL) and Deepgram.
    openai_configured: bool = False  # OPENAI_API_KEY or OPENAI_BASE_URL is set: a real LLM can be used
    openai_base_url: str | None = None
    llm_model: str = "gpt-4.1-mini"  # LLM_MODEL
    stt_model: str = "nova-3"  # STT_MODEL
    tts_voice: str = "alloy"  # TTS_VOICE
    # VOICE_LANGUAGE: the caller's language (BCP 47: en, es, de, fr, es-MX…): filler lines, dates and numbers,
    # and the language the speech-to-text listens for.
    language: str = "en"

    @property
    def snapshot_path(self) -> Path:
        """The last-known registry and tool cache, for a session that starts while the database is down."""
        return self.data_dir / "registry-snapshot.json"

    @classmethod
    def from_env(cls, *, dotenv: bool = True) -> Settings:
        if dotenv:
            # An explicit environment wins over .env, as twelve-factor tools expect.
            load_dotenv(PROJECT_ROOT / ".env", override=False)
        env = os.environ
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            data_dir=Path(env.get("VOICE_MCP_DATA_DIR") or PROJECT_ROOT / ".data"),
            log_level=env.get("LOG_LEVEL", "WARNING").upper(),
            log_format=(env.get("LOG_FORMAT") or "text").strip().lower(),
            connect_timeout_s=float(env.get("MCP_CONNECT_TIMEOUT_S", "10")),
            db_start_timeout_s=float(env.get("DB_START_TIMEOUT_S", "3")),
            health_interval_s=float(env.get("HEALTH_INTERVAL_S", "15")),
            relay_socket=env.get("VOICE_MCP_RELAY") or None,
            db_pool_max=int(env.get("DB_POOL_MAX", "2")),
            db_pool_idle_s=float(env.get("DB_POOL_IDLE_S", "10")),
            dashboard_token=env.get("DASHBOARD_TOKEN") or None,
            secret_key=env.get("VOICE_MCP_SECRET_KEY") or None,
            metrics_port=int(env["METRICS_PORT"]) if env.get("METRICS_PORT") else None,
            prometheus_multiproc_dir=env.get("PROMETHEUS_MULTIPROC_DIR") or None,
            openai_configured=bool(env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL")),
            openai_base_url=env.get("OPENAI_BASE_URL") or None,
            llm_model=env.get("LLM_MODEL") or "gpt-4.1-mini",
            stt_model=env.get("STT_MODEL") or "nova-3",
            tts_voice=env.get("TTS_VOICE") or "alloy",
            language=(env.get("VOICE_LANGUAGE") or "en").strip(),
        )
