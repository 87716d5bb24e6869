"""voice-mcp: a LiveKit voice agent that uses the tools of every MCP server in the registry.

    python agent.py download-files   # the Silero VAD model (and turn detector, if configured)
    python agent.py console --text   # talk to it in the terminal (needs PortAudio's libportaudio2)
    python agent.py dev              # join LiveKit rooms as a worker, reloading on change
    python agent.py start            # production worker

Plugins are built inside the entrypoint, never at import, so `--help`, the tests and the demo need no keys.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from dotenv import load_dotenv
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli
from livekit.plugins import deepgram, openai, silero

from mcp_integration.config import PROJECT_ROOT, Settings
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.embedded_db import EmbeddedPostgres
from mcp_integration.health import HealthMonitor
from mcp_integration.livekit_tools import McpToolbox, VoiceOptions
from mcp_integration.logs import bind, install_context_filter, log_format, use_json_on
from mcp_integration.metrics import process_metrics
from mcp_integration.registry import Registry
from mcp_integration.registry_watch import RegistryWatcher
from mcp_integration.secrets import install_log_scrubber
from mcp_integration.snapshot import save_soon, start_dispatcher

load_dotenv(PROJECT_ROOT / ".env")
log = logging.getLogger("voice-mcp")


def instructions() -> str:
    return (PROJECT_ROOT / "prompts" / "system.md").read_text(encoding="utf-8")


def prewarm(proc: JobProcess) -> None:
    """Once per worker process: the VAD model, and the settings the database pool is opened from."""
    proc.userdata["vad"] = silero.VAD.load()
    proc.userdata["settings"] = Settings.from_env()
    # LiveKit owns the handlers (here, the one forwarding records to the worker); ours adds the job's fields, and
    # every record is scrubbed of the secrets this process resolves as it is made.
    install_context_filter()
    install_log_scrubber()
    process_metrics()  # registered now, so the worker's /metrics carries ours before the first session


async def process_registry(proc: JobProcess) -> Registry:
    """The process's one registry (pool), opened on first use: the event loop only exists from here on.

    Opened without waiting: a database that is down must not stop a session (it starts from the on-disk copy of
    the registry), and the pool keeps reconnecting, so job records land once the database is back. Migrations
    run at each session start that reaches the database (`start_dispatcher`)."""
    registry = proc.userdata.get("registry")
    if registry is None:
        settings: Settings = proc.userdata.get("settings") or Settings.from_env()
        url = settings.database_url
        if url is None:
            embedded = EmbeddedPostgres(settings.data_dir)
            url = await embedded.start()
            proc.userdata["embedded_pg"] = embedded
        registry = await Registry.open(url, wait=False)
        proc.userdata["registry"] = registry
    return registry


def build_session(proc: JobProcess, toolbox: McpToolbox) -> AgentSession:
    return AgentSession(
        stt=deepgram.STT(model=os.environ.get("STT_MODEL", "nova-3")),
        llm=openai.LLM(model=os.environ.get("LLM_MODEL", "gpt-4.1-mini"), base_url=os.environ.get("OPENAI_BASE_URL")),
        tts=openai.TTS(voice=os.environ.get("TTS_VOICE", "alloy")),
        vad=proc.userdata["vad"],
        tools=[toolbox],
    )


METRICS_PORT = int(os.environ["METRICS_PORT"]) if os.environ.get("METRICS_PORT") else None
# prometheus_client picks multiprocess mode when first imported: only a directory set before start covers the
# worker's own (LiveKit) metrics as well as the job processes'.
MULTIPROC_PRESET = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
server = AgentServer(
    setup_fnc=prewarm,
    prometheus_port=METRICS_PORT,
    # Calls run in job processes: their metrics reach the worker's /metrics only in multiprocess mode.
    prometheus_multiproc_dir=(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        or os.path.join(tempfile.gettempdir(), f"voice-mcp-prom-{METRICS_PORT}")
        if METRICS_PORT
        else None
    ),
)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    ctx.log_context_fields = {"room": ctx.room.name}
    bind(room=ctx.room.name)  # for our formatter too; tasks created from here on inherit it
    registry = await process_registry(ctx.proc)
    settings: Settings = ctx.proc.userdata.get("settings") or Settings.from_env()
    dispatcher = Dispatcher(registry)
    metrics = process_metrics()
    metrics.attach(dispatcher)
    metrics.sessions.inc()
    # From the tool cache at once (the on-disk copy if the database is down): a slow server never delays the
    # greeting; discovery goes on behind it.
    await start_dispatcher(dispatcher, settings.snapshot_path, timeout=settings.db_start_timeout_s)
    toolbox = McpToolbox(dispatcher, VoiceOptions())
    session = build_session(ctx.proc, toolbox)
    toolbox.bind(session)
    watcher = RegistryWatcher(
        registry, dispatcher, on_change=lambda: save_soon(dispatcher, settings.snapshot_path)
    ).start()
    # Pings every server and drives its circuit breaker: a dead one is refused at once, not waited out.
    # Each session checks on its own, but writes to the registry only when a server's status changes.
    dispatcher.record_every_check = False
    monitor = HealthMonitor(dispatcher, interval_s=settings.health_interval_s).start()

    async def shutdown() -> None:
        metrics.sessions.dec()
        await monitor.aclose()
        await watcher.aclose()
        await dispatcher.aclose()

    ctx.add_shutdown_callback(shutdown)
    await session.start(agent=Agent(instructions=instructions()), room=ctx.room)
    log.info("session started with %d MCP tools", len(dispatcher.tools))
    await session.generate_reply(instructions="Greet the caller in one short sentence and offer help.")


if __name__ == "__main__":
    try:
        json_logs = log_format() == "json"
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if json_logs:
        # LiveKit installs its handler when the worker starts; switching its formatter keeps one handler.
        server.on("worker_started", lambda: use_json_on())
    if METRICS_PORT and not MULTIPROC_PRESET:
        server.on(
            "worker_started",
            lambda: log.warning("set PROMETHEUS_MULTIPROC_DIR before start to serve LiveKit's worker metrics too"),
        )
    cli.run_app(server)
