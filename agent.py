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

from dotenv import load_dotenv
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli
from livekit.plugins import deepgram, openai, silero

from mcp_integration.config import PROJECT_ROOT, Settings
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.embedded_db import EmbeddedPostgres
from mcp_integration.livekit_tools import McpToolbox, VoiceOptions
from mcp_integration.registry import Registry
from mcp_integration.registry_watch import RegistryWatcher

load_dotenv(PROJECT_ROOT / ".env")
log = logging.getLogger("voice-mcp")


def instructions() -> str:
    return (PROJECT_ROOT / "prompts" / "system.md").read_text(encoding="utf-8")


def prewarm(proc: JobProcess) -> None:
    """Once per worker process: the VAD model, and the settings the database pool is opened from."""
    proc.userdata["vad"] = silero.VAD.load()
    proc.userdata["settings"] = Settings.from_env()


async def process_registry(proc: JobProcess) -> Registry:
    """The process's one registry (pool), opened on first use: the event loop only exists from here on."""
    registry = proc.userdata.get("registry")
    if registry is None:
        settings: Settings = proc.userdata.get("settings") or Settings.from_env()
        url = settings.database_url
        if url is None:
            embedded = EmbeddedPostgres(settings.data_dir)
            url = await embedded.start()
            proc.userdata["embedded_pg"] = embedded
        registry = await Registry.open(url)
        await registry.migrate()
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


server = AgentServer(
    setup_fnc=prewarm,
    prometheus_port=int(os.environ["METRICS_PORT"]) if os.environ.get("METRICS_PORT") else None,
)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    ctx.log_context_fields = {"room": ctx.room.name}
    registry = await process_registry(ctx.proc)
    dispatcher = Dispatcher(registry)
    # From the tool cache at once: a slow server never delays the greeting; discovery goes on behind it.
    await dispatcher.start(wait=False)
    toolbox = McpToolbox(dispatcher, VoiceOptions())
    session = build_session(ctx.proc, toolbox)
    toolbox.bind(session)
    watcher = RegistryWatcher(registry, dispatcher).start()

    async def shutdown() -> None:
        await watcher.aclose()
        await dispatcher.aclose()

    ctx.add_shutdown_callback(shutdown)
    await session.start(agent=Agent(instructions=instructions()), room=ctx.room)
    log.info("session started with %d MCP tools", len(dispatcher.tools))
    await session.generate_reply(instructions="Greet the caller in one short sentence and offer help.")


if __name__ == "__main__":
    cli.run_app(server)
