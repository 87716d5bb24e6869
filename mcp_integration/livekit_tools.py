"""The LiveKit side: every MCP tool as a LiveKit function tool, run as a job, with filler speech and release.

Each server's tools form an `llm.AsyncToolset` (as LiveKit's own MCPToolset does), all held by one
session-scoped `McpToolbox` whose contents follow the dispatcher as servers come and go. A call:
submit a job → filler through `RunContext.with_filler` (after a threshold, by phase, progress-aware) →
if still waiting at the release point, `ctx.update(...)` frees the caller's turn and LiveKit delivers the
final answer later as a deferred reply → the answer is formatted for the ear (`speech.py`).

Also here, because only this module and agent.py may import LiveKit: `ScriptedLLM`, a stand-in for a cloud
LLM written against LiveKit's own LLM interface, for tests and the offline demo.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import AgentSession, RunContext, function_tool, llm
from livekit.agents.llm import ToolError, ToolFlag
from livekit.agents.llm.async_toolset import AsyncToolset
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from mcp_integration.dispatcher import Dispatcher, ToolEntry
from mcp_integration.fillers import FillerPolicy, FillerRun
from mcp_integration.jobs import Job, JobEvent, ToolCallError
from mcp_integration.speech import error_sentence, for_speech, humanise_name

log = logging.getLogger(__name__)

LATE_REPLY_TEMPLATE = (
    "New results arrived from background tool calls (call_ids: {call_ids}). Start with "
    '"About your earlier question:" and give the result in one or two spoken sentences. '
    "Do not repeat what you already told the caller."
)
UPDATE_TEMPLATE = (
    "The tool `{function_name}` is still running: {message}\n"
    "Tell the caller that in one short sentence. Do not make up a result; it will arrive later."
)


@dataclass
class VoiceOptions:
    max_chars: int = 600
    policy: FillerPolicy = field(default_factory=FillerPolicy.load)


class McpToolset(AsyncToolset):
    """The tools of one MCP server. Its `tools` follow the dispatcher's index, so a refresh needs no rebuild."""

    def __init__(self, toolbox: McpToolbox, server: str) -> None:
        super().__init__(
            id=f"mcp_{server}",
            tool_handling={
                "async_options": {
                    "reply_at_tail_template": LATE_REPLY_TEMPLATE,
                    "reply_maybe_covered_template": LATE_REPLY_TEMPLATE,
                    "update_template": UPDATE_TEMPLATE,
                }
            },
        )
        self.server = server
        self._toolbox = toolbox
        self._built: dict[str, tuple[ToolEntry, llm.Tool]] = {}

    @property
    def tools(self) -> list[llm.Tool | llm.Toolset]:
        out: list[llm.Tool | llm.Toolset] = []
        for entry in self._toolbox.dispatcher.tools:
            if entry.server != self.server:
                continue
            cached = self._built.get(entry.name)
            if cached is None or cached[0] != entry:
                cached = (entry, self._toolbox.make_tool(entry))
                self._built[entry.name] = cached
            out.append(cached[1])
        return out


class McpToolbox(llm.Toolset):
    """All MCP tools of a session, one `McpToolset` per server, plus `more_details` for long answers."""

    def __init__(self, dispatcher: Dispatcher, options: VoiceOptions | None = None) -> None:
        super().__init__(id="mcp_toolbox")
        self.dispatcher = dispatcher
        self.options = options or VoiceOptions()
        self._toolsets: dict[str, McpToolset] = {}
        self._session: AgentSession | None = None
        self._rest: dict[str, str] = {}  # what did not fit in a spoken answer, by tool, for follow-ups
        self.jobs: list[Job] = []
        self.filler_runs: list[FillerRun] = []
        self.on_job: list[Callable[[Job], None]] = []
        self._more = function_tool(
            self._more_details,
            raw_schema={
                "name": "more_details",
                "description": "Get the rest of the previous tool answer when it was cut short.",
                "parameters": {"type": "object", "properties": {"tool": {"type": "string"}}},
            },
        )

    @property
    def tools(self) -> list[llm.Tool | llm.Toolset]:
        for server in self.dispatcher.servers:
            if server not in self._toolsets:
                self._add_toolset(server)
        for gone in set(self._toolsets) - set(self.dispatcher.servers):
            del self._toolsets[gone]
        return [*self._toolsets.values(), self._more]

    def bind(self, session: AgentSession) -> None:
        """Remember the session, so toolsets of servers added while it runs are wired like the first ones."""
        self._session = session

    def _add_toolset(self, server: str) -> None:
        ts = McpToolset(self, server)
        self._toolsets[server] = ts
        if self._session is not None:
            # What AgentActivity does for session toolsets at start (agent_activity.py, _setup_toolsets); a
            # toolset created later needs the same binding, and LiveKit has no public call for it.
            ts._attach_activity(activity=None, session=self._session)

    async def cancel_jobs(self) -> None:
        """Cancel what still runs: a job cancelled by the session ending is cancelled on the server too."""
        for job in self.jobs:
            if not job.done:
                await job.cancel()

    async def aclose(self) -> None:
        await self.cancel_jobs()
        await super().aclose()

    # -- one tool -------------------------------------------------------------------------------------------

    def make_tool(self, entry: ToolEntry) -> llm.Tool:
        toolbox = self

        async def handler(raw_arguments: dict[str, Any], ctx: RunContext) -> str:
            return await toolbox.run_tool(entry, raw_arguments, ctx)

        return function_tool(
            handler,
            raw_schema={
                "name": entry.name,
                "description": entry.spec.description or f"{entry.spec.name} on {entry.server}",
                "parameters": entry.spec.input_schema,
            },
            flags=ToolFlag.CANCELLABLE,
        )

    def label(self, server: str) -> str:
        return self.options.policy.for_server(server).label or humanise_name(server)

    async def run_tool(self, entry: ToolEntry, arguments: Any, ctx: RunContext) -> str:
        label = self.label(entry.server)
        try:
            job = self.dispatcher.submit(entry.name, arguments if isinstance(arguments, dict) else {})
            if not isinstance(arguments, dict):
                raise ToolCallError(
                    entry.server, entry.spec.name, "arguments must be a JSON object", "invalid_arguments"
                )
        except ToolCallError as exc:
            raise ToolError(error_sentence(exc, server_label=label)) from None
        self.jobs.append(job)
        for hook in self.on_job:
            hook(job)
        run = self.options.policy.run(entry.server)
        if self.filler_runs:
            run.last = self.filler_runs[-1].last  # no line twice in a row, across calls too
        self.filler_runs = [*self.filler_runs[-49:], run]
        progress: dict[str, Any] = {"fraction": None, "message": None}

        def on_event(event: JobEvent) -> None:
            if event.kind == "progress" and event.data.get("total"):
                progress["fraction"] = event.data["progress"] / event.data["total"]
                progress["message"] = event.data.get("message")

        job.add_listener(on_event)

        def filler(step: int) -> str | None:
            if job.done:
                return None
            line = run.line(step, elapsed_s=job.duration, progress=progress["fraction"], message=progress["message"])
            if line is not None:
                job.emit("filler", step=step)
            return line

        release_s = self.dispatcher.servers[entry.server].cfg.release_after_ms / 1000
        threshold = self.options.policy.threshold_s
        # LiveKit waits `delay` of idle again after each `interval`: subtract it, so lines are interval_s apart.
        interval = max(0.0, run.interval_s - threshold)
        try:
            try:
                async with ctx.with_filler(filler, delay=threshold, interval=interval):
                    # Released at the server's release point, or at the call's idle timeout if that comes first.
                    result = await job.wait(release_after=release_s)
            except ToolCallError as exc:
                if exc.kind != "timeout" or job.done:
                    raise
                # Still waiting at the release point: free the caller's turn; LiveKit delivers the final
                # return value later as a deferred reply.
                job.emit("released", after_s=round(job.duration, 3))
                await ctx.update(run.release_line())
                result = await job.outcome()
        except ToolCallError as exc:
            raise ToolError(error_sentence(exc, server_label=label)) from None
        except asyncio.CancelledError:
            await job.cancel()
            raise
        spoken = for_speech(result, max_chars=self.options.max_chars, server_label=label)
        text = spoken.text
        if spoken.rest:
            self._rest[entry.name] = spoken.rest
            text += " (More is available: call more_details.)"
        job.emit("handed_to_speech")
        return text

    async def _more_details(self, raw_arguments: dict[str, Any]) -> str:
        tool = raw_arguments.get("tool") if isinstance(raw_arguments, dict) else None
        key = tool if tool in self._rest else next(reversed(self._rest), None)
        if key is None:
            return "There is nothing more to add."
        spoken = for_speech(self._rest.pop(key), max_chars=self.options.max_chars)
        if spoken.rest:
            self._rest[key] = spoken.rest
        return spoken.text


# -- a scripted LLM ----------------------------------------------------------------------------------------------

Route = Callable[[str], "tuple[str, dict[str, Any] | str] | None"]


class ScriptedLLM(llm.LLM):
    """A stand-in for a cloud LLM, on LiveKit's own LLM interface: it calls a tool when a rule matches what
    the caller said, then answers from the tool output it receives, as a real model would."""

    def __init__(self, route: Route, *, small_talk: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self._route = route
        self._small_talk = small_talk or (lambda text: f"Sure. You said: {text}")
        self._ids = itertools.count(1)

    @property
    def model(self) -> str:
        return "scripted"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        return _ScriptedStream(
            self,
            chat_ctx=chat_ctx,
            tools=tools or [],
            conn_options=conn_options,
            reply=self._decide(chat_ctx, tool_choice),
        )

    def _decide(self, chat_ctx: llm.ChatContext, tool_choice: Any) -> tuple[str, Any]:
        items = [i for i in chat_ctx.items if i.type in ("message", "function_call_output")]
        last = items[-1] if items else None
        if last is None:
            return ("text", "Hello, how can I help?")
        if last.type == "function_call_output":
            return ("text", _answer_from(last.output, is_error=last.is_error))
        if last.role == "system" and "New results arrived" in (last.text_content or ""):
            outputs = [i for i in items if i.type == "function_call_output"]
            answer = outputs[-1].output if outputs else "Nothing new."
            return ("text", f"About your earlier question: {answer}")
        text = last.text_content or ""
        if last.role == "user" and tool_choice != "none":
            routed = self._route(text)
            if routed is not None:
                name, args = routed
                return ("tool", (name, args, f"call_{next(self._ids)}"))
        return ("text", self._small_talk(text))


def _answer_from(output: str, *, is_error: bool) -> str:
    updated = re.match(r"The tool `[^`]+` is still running: (.*?)\n", output)
    if updated:
        return updated.group(1)
    return output if is_error else f"Here is what I found: {output}"


class _ScriptedStream(llm.LLMStream):
    def __init__(
        self,
        owner: ScriptedLLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
        reply: tuple[str, Any],
    ) -> None:
        super().__init__(owner, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._reply = reply

    async def _run(self) -> None:
        kind, payload = self._reply
        chunk_id = f"scripted_{id(self)}"
        if kind == "tool":
            name, args, call_id = payload
            # A string is sent as is: tests use it to play a model that emits invalid JSON.
            arguments = args if isinstance(args, str) else json.dumps(args)
            call = llm.FunctionToolCall(name=name, arguments=arguments, call_id=call_id)
            delta = llm.ChoiceDelta(role="assistant", tool_calls=[call])
        else:
            delta = llm.ChoiceDelta(role="assistant", content=payload)
        self._event_ch.send_nowait(llm.ChatChunk(id=chunk_id, delta=delta))


def llm_from_env() -> llm.LLM | None:
    """The real OpenAI (or OpenAI-compatible) LLM when a key or base URL is configured, else None."""
    import os

    if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")):
        return None
    from livekit.plugins import openai

    return openai.LLM(model=os.environ.get("LLM_MODEL", "gpt-4.1-mini"), base_url=os.environ.get("OPENAI_BASE_URL"))


# -- a text-only session, for tests, the offline demo and benchmarks -----------------------------------------


@dataclass
class Line:
    at: float  # seconds since the call started
    who: str  # caller | agent | filler | tool
    text: str


class TextCall:
    """A real `AgentSession` in text mode (no STT, TTS, VAD or room) over the real toolbox and dispatcher."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        model: llm.LLM,
        *,
        options: VoiceOptions | None = None,
        instructions: str = "You are a helpful voice assistant.",
        on_line: Callable[[Line], None] | None = None,
    ) -> None:
        self.toolbox = McpToolbox(dispatcher, options)
        self.on_line = on_line
        self.model = model
        self.instructions = instructions
        self.session: AgentSession | None = None
        self.lines: list[Line] = []
        self._t0 = 0.0

    async def start(self, greeting: str | None = "Hello, how can I help?") -> TextCall:
        from livekit.agents import Agent

        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self.session = AgentSession(llm=self.model, tools=[self.toolbox])
        self.toolbox.bind(self.session)
        self.toolbox.on_job.append(self._watch_job)
        self.session.on("conversation_item_added", self._on_item)
        await self.session.start(Agent(instructions=self.instructions))
        if greeting:
            await self.session.say(greeting)
        return self

    def _watch_job(self, job: Job) -> None:
        def on_event(event: JobEvent) -> None:
            if event.kind == "accepted":
                ref = event.data.get("task_id") or event.data.get("receipt_id")
                self._add(
                    "tool", f"{job.tool}: {event.data.get('job_kind')} job started" + (f" ({ref})" if ref else "")
                )
            elif event.kind == "released":
                self._add(
                    "tool", f"{job.tool}: still waiting after {event.data['after_s']:g} s; the caller's turn is freed"
                )
            elif event.kind == "done":
                late = " (late)" if event.data.get("late") else ""
                self._add("tool", f"{job.tool}: {event.data['state']}{late} after {job.duration:.1f} s")

        job.add_listener(on_event)

    def _add(self, who: str, text: str) -> None:
        line = Line(self.now(), who, text)
        self.lines.append(line)
        if self.on_line is not None:
            self.on_line(line)

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    def _on_item(self, event: Any) -> None:
        item = event.item
        if item.type != "message" or item.role not in ("user", "assistant"):
            return
        text = item.text_content or ""
        who = "caller" if item.role == "user" else "agent"
        if who == "agent" and any(text == f for f in self._filler_texts()):
            who = "filler"
        self._add(who, text)

    def _filler_texts(self) -> set[str]:
        return {line for run in self.toolbox.filler_runs for line in run.spoken}

    async def say(self, text: str) -> Any:
        assert self.session is not None
        return await self.session.run(user_input=text)

    def spoken(self, who: str | None = None) -> list[Line]:
        return [line for line in self.lines if who is None or line.who == who]

    async def aclose(self) -> None:
        # Jobs first, so no deferred reply is still on its way while the session shuts down; the session
        # then closes its toolsets (ours included) itself.
        await self.toolbox.cancel_jobs()
        if self.session is not None:
            await self.session.aclose()
