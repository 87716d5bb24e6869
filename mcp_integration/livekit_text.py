"""Text-only LiveKit sessions with a scripted LLM: the offline demo's voice path, which the tests and the voice
benchmark drive too.

`ScriptedLLM` stands in for a cloud LLM, written against LiveKit's own LLM interface: it calls a tool when a rule
matches what the caller said, and answers from the tool output it gets back. `TextCall` runs a real
`AgentSession` in text mode (no STT, TTS, VAD or room) over the real toolbox and dispatcher, and keeps a
timeline of what the caller said, the agent said, the fillers, and the jobs. In the package (not tests/) because
`python -m mcp_integration demo` needs both; a voice module, so it may import LiveKit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livekit.agents import AgentSession, llm
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.jobs import Job, JobEvent
from mcp_integration.livekit_tools import ANSWER_TOOL, DECLINE_TOOL, McpToolbox, VoiceEventKind, VoiceOptions

__all__ = ["Line", "Route", "ScriptedLLM", "TextCall"]


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
            if last.name in (ANSWER_TOOL, DECLINE_TOOL):
                return ("text", last.output)
            return ("text", _answer_from(last.output, is_error=last.is_error))
        if last.role == "system" and "New results arrived" in (last.text_content or ""):
            # The results the instructions name (`call_ids: a, b`), not merely the newest output: a reply to
            # another tool (an answer to the server's question) may have landed after them.
            named = re.search(r"call_ids: ([^)]*)\)", last.text_content or "")
            ids = set(re.findall(r"[\w.:-]+", named.group(1))) if named else set()  # LiveKit renders a list
            outputs = [i for i in items if i.type == "function_call_output"]
            chosen = [o for o in outputs if o.call_id in ids] or outputs
            answer = chosen[-1].output if chosen else "Nothing new."
            return ("text", f"About your earlier question: {answer}")
        text = last.text_content or ""
        if last.role == "user" and tool_choice != "none":
            routed = self._route(text)
            if routed is not None:
                name, args = routed
                return ("tool", (name, args, f"call_{next(self._ids)}"))
        return ("text", self._small_talk(text))


def _answer_from(output: str, *, is_error: bool) -> str:
    asked = re.search(r'Ask the caller: "(.*?)"\n', output)
    if asked:
        return asked.group(1)  # a server's question, put to the caller as it stands
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


# -- a text-only session, for tests, the offline demo and benchmarks -----------------------------------------


@dataclass
class Line:
    at: float  # seconds since the call started
    who: str  # caller | agent | filler | tool
    text: str


# How long a caller's next line waits for a result that is on its way to being spoken.
OWED_WAIT_S = 5.0


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
        # Jobs whose call freed the caller's turn (their result comes as a reply), and those that asked a question.
        self._freed: dict[str, Job] = {}  # by Job.key
        self._asked: set[str] = set()
        self._owed = 0  # such jobs done and their answer not yet spoken
        self._paid = asyncio.Event()  # set whenever none is owed

    async def start(self, greeting: str | None = "Hello, how can I help?") -> TextCall:
        from livekit.agents import Agent

        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self.session = AgentSession(llm=self.model, tools=[self.toolbox])
        self.toolbox.bind(self.session)
        self.toolbox.on_job.append(self._watch_job)
        self.toolbox.voice_observers.append(self._on_voice)
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
            elif event.kind == "done":
                if self._freed.pop(job.key, None) is not None:  # its answer (or error) is on its way as a reply
                    self._owed += 1
                    self._paid.clear()
                late = " (late)" if event.data.get("late") else ""
                self._add("tool", f"{job.tool}: {event.data['state']}{late} after {job.duration:.1f} s")

        job.add_listener(on_event)

    def _on_voice(self, job: Job, kind: VoiceEventKind, data: dict[str, Any]) -> None:
        if kind in ("released", "question"):
            self._freed[job.key] = job
        if kind == "question":
            self._asked.add(job.key)
        if kind == "released":
            self._add("tool", f"{job.tool}: still waiting after {data['after_s']:g} s; the caller's turn is freed")
        elif kind == "question":
            self._add("tool", f"{job.tool}: the server asks the caller: {data['message']}")

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
        elif who == "agent" and self._owed:
            self._owed -= 1
            if not self._owed:
                self._paid.set()
        self._add(who, text)

    def _filler_texts(self) -> set[str]:
        return {line for run in self.toolbox.filler_runs for line in run.spoken}

    async def say(self, text: str) -> Any:
        assert self.session is not None
        # A caller waits to hear an answer that is on its way (a released call's result, handed over as the
        # caller answered something else): spoken into the new turn, LiveKit would drop it as interrupted.
        # A call the caller just answered a question for usually ends at once: its answer is worth the wait.
        answered = [j for j in self._freed.values() if j.key in self._asked and not j.asking and not j.done]
        if answered:
            waits = [asyncio.ensure_future(j.outcome()) for j in answered]
            await asyncio.wait(waits, timeout=OWED_WAIT_S)
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if self._owed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._paid.wait(), OWED_WAIT_S)
        self._owed = 0
        return await self.session.run(user_input=text)

    def spoken(self, who: str | None = None) -> list[Line]:
        return [line for line in self.lines if who is None or line.who == who]

    async def aclose(self) -> None:
        # Jobs first, so no deferred reply is still on its way while the session shuts down; the session
        # then closes its toolsets (ours included) itself.
        await self.toolbox.cancel_jobs()
        if self.session is not None:
            await self.session.aclose()
