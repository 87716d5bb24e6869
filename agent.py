"""voice-mcp: a LiveKit voice agent that uses the tools of every MCP server in the registry.

    python agent.py download-files   # the Silero VAD model (and turn detector, if configured)
    python agent.py console --text   # talk to it in the terminal (needs PortAudio's libportaudio2)
    python agent.py dev              # join LiveKit rooms as a worker, reloading on change
    python agent.py start            # production worker

Plugins are built inside the entrypoint, never at import, so `--help`, the tests and the demo need no keys.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import os
import sys
import tempfile
from contextlib import AsyncExitStack

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli
from livekit.plugins import deepgram, openai, silero

from mcp_integration import transports
from mcp_integration.aio import spawn
from mcp_integration.config import PROJECT_ROOT, Settings
from mcp_integration.embedded_db import EmbeddedPostgres
from mcp_integration.fleet import Fleet
from mcp_integration.livekit_tools import McpToolbox, VoiceOptions, llm_from_env
from mcp_integration.logs import bind, install_context_filter, log_format, use_json_on
from mcp_integration.metrics import process_metrics
from mcp_integration.registry import Registry
from mcp_integration.relay import Relay
from mcp_integration.runtime import open_runtime
from mcp_integration.scrubber import install_log_scrubber

SETTINGS = Settings.from_env()  # reads .env too
log = logging.getLogger("voice-mcp")


def prewarm(proc: JobProcess) -> None:
    """Once per worker process: the VAD model and the metrics; every log record scrubbed of secrets from now."""
    proc.userdata["vad"] = silero.VAD.load()
    # LiveKit owns the handlers (here, the one forwarding records to the worker); ours adds the job's fields.
    install_context_filter()
    install_log_scrubber()
    process_metrics(SETTINGS.prometheus_multiproc_dir)  # registered now, so /metrics has ours from the start
    transports.prewarm()  # the TLS context: its CA bundle costs the first connect ~17 ms otherwise
    # Everything loaded so far lives as long as the process: the collector's full passes during a session (one
    # took 46 ms amid a session start) no longer walk it.
    gc.freeze()


async def process_fleet(proc: JobProcess) -> tuple[Registry, Fleet]:
    """The process's one registry (pool) and its share of the fleet (signals, health leases), opened on first
    use: the event loop only exists from here on.

    Opened without waiting: a database that is down must not stop a session (it starts from the on-disk copy of
    the registry), and the pool keeps reconnecting, so job records land once the database is back. The pool holds
    no connection while the session is quiet (README: "Connection budget")."""
    registry = proc.userdata.get("registry")
    if registry is None:
        url = SETTINGS.database_url
        if url is None:
            embedded = EmbeddedPostgres(SETTINGS.data_dir)
            url = await embedded.start()
            proc.userdata["embedded_pg"] = embedded
        registry = proc.userdata["registry"] = await Registry.open(
            url, min_size=0, max_size=SETTINGS.db_pool_max, max_idle=SETTINGS.db_pool_idle_s, wait=False
        )
        proc.userdata["fleet"] = Fleet.open(registry, SETTINGS)
    return registry, proc.userdata["fleet"]


def start_relay() -> None:
    """In the worker's main process: one PostgreSQL listener for all its job processes (relay.py). They find
    it through VOICE_MCP_RELAY, set before they are started so they inherit it."""
    path = os.environ.get("VOICE_MCP_RELAY")
    if not (path and SETTINGS.database_url):
        return  # an embedded database lives in the job processes: each listens on its own
    relay = Relay(SETTINGS.database_url, path)
    _relays.append(relay)
    spawn(relay.start(), _starting)
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))  # the worker's loop is gone by then


_relays: list[Relay] = []  # the main process's relay, kept alive for the worker's life
_starting: set[asyncio.Task[object]] = set()  # its start, held until done (the loop holds tasks only weakly)


server = AgentServer(
    setup_fnc=prewarm,
    prometheus_port=SETTINGS.metrics_port,
    # Calls run in job processes: their metrics reach the worker's /metrics only in multiprocess mode.
    prometheus_multiproc_dir=(
        SETTINGS.prometheus_multiproc_dir
        or os.path.join(tempfile.gettempdir(), f"voice-mcp-prom-{SETTINGS.metrics_port}")
        if SETTINGS.metrics_port
        else None
    ),
)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    ctx.log_context_fields = {"room": ctx.room.name}
    bind(room=ctx.room.name)  # for our formatter too; tasks created from here on inherit it
    stack = AsyncExitStack()
    ctx.add_shutdown_callback(stack.aclose)
    # From the tool cache at once (the on-disk copy if the database is down): a slow server never delays the
    # greeting; discovery goes on behind it. The registry is followed live; servers are checked once for the
    # whole fleet, by whichever session holds each one's lease, and every session hears each change of status.
    registry, fleet = await process_fleet(ctx.proc)
    rt = await stack.enter_async_context(
        open_runtime(registry, SETTINGS, snapshot=True, watch=True, monitor=True, fleet=fleet)
    )
    metrics = process_metrics(SETTINGS.prometheus_multiproc_dir)
    metrics.attach(rt.dispatcher, rt.health)
    metrics.sessions.inc()
    stack.callback(metrics.sessions.dec)

    toolbox = McpToolbox(rt.dispatcher, VoiceOptions.for_language(SETTINGS.language))
    toolbox.voice_observers.append(metrics.observe_voice)
    model = llm_from_env(SETTINGS) or openai.LLM(model=SETTINGS.llm_model)
    session = AgentSession(
        stt=deepgram.STT(model=SETTINGS.stt_model, language=SETTINGS.language),
        llm=model,
        tts=openai.TTS(voice=SETTINGS.tts_voice),
        vad=ctx.proc.userdata["vad"],
        tools=[toolbox],
    )
    toolbox.bind(session)
    instructions = (PROJECT_ROOT / "prompts" / "system.md").read_text(encoding="utf-8")
    if SETTINGS.language.split("-")[0].lower() != "en":
        instructions += f"\n\nSpeak with the caller in this language: {SETTINGS.language}."
    await session.start(agent=Agent(instructions=instructions), room=ctx.room)
    log.info("session started with %d MCP tools", len(rt.dispatcher.tools))
    await session.generate_reply(instructions="Greet the caller in one short sentence and offer help.")


if __name__ == "__main__":
    try:
        json_logs = log_format(SETTINGS.log_format) == "json"
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if json_logs:
        # LiveKit installs its handler when the worker starts; switching its formatter keeps one handler.
        server.on("worker_started", lambda: use_json_on())
    if SETTINGS.database_url and not SETTINGS.relay_socket:
        # Before any job process starts, so all inherit it; started with the worker (whichever process runs it).
        os.environ["VOICE_MCP_RELAY"] = os.path.join(tempfile.gettempdir(), f"voice-mcp-relay-{os.getpid()}.sock")
        SETTINGS = Settings.from_env()
        server.on("worker_started", start_relay)
    if SETTINGS.metrics_port and not SETTINGS.prometheus_multiproc_dir:
        server.on(
            "worker_started",
            lambda: log.warning("set PROMETHEUS_MULTIPROC_DIR before start to serve LiveKit's worker metrics too"),
        )
    cli.run_app(server)
