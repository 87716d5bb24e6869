"""The LiveKit side: every MCP tool as a LiveKit function tool, run as a job, with filler speech and release.

Each server's tools form an `llm.AsyncToolset` (as LiveKit's own MCPToolset does), all held by one
session-scoped `McpToolbox` whose contents follow the dispatcher as servers come and go. A call:
submit a job → filler through `RunContext.with_filler` (after a threshold, by phase, progress-aware) →
if still waiting at the release point, `ctx.update(...)` frees the caller's turn and LiveKit delivers the
final answer later as a deferred reply → the answer is formatted for the ear (`speech.py`).

The scripted LLM and the text-only session the offline demo (and the tests) drive it with are in
`livekit_text.py`, the other voice module.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from livekit.agents import AgentSession, RunContext, function_tool, llm
from livekit.agents.llm import ToolError, ToolFlag
from livekit.agents.llm.async_toolset import AsyncToolset

from mcp_integration.config import Settings
from mcp_integration.dispatcher import Dispatcher, ToolEntry
from mcp_integration.elicitation import ASK_TIMEOUT_S, Answer, Question, check
from mcp_integration.errors import ToolCallError
from mcp_integration.fillers import FillerPolicy, FillerRun
from mcp_integration.jobs import Job, JobEvent
from mcp_integration.results import ToolResult
from mcp_integration.sampling import Sampled, SamplingRequest
from mcp_integration.speech import Spoken, error_sentence, for_speech, humanise_name
from mcp_integration.tool_choice import DEFAULT_BUDGET, ToolChooser, ToolText, capped_description, capped_schema

__all__ = [
    "LATE_REPLY_TEMPLATE",
    "UPDATE_TEMPLATE",
    "McpToolbox",
    "McpToolset",
    "VoiceEventKind",
    "VoiceOptions",
    "VoiceQuestions",
    "llm_from_env",
]


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


VoiceEventKind = Literal["filler", "released", "handed_to_speech", "question"]

ANSWER_TOOL = "answer_question"
DECLINE_TOOL = "decline_question"
FIND_TOOL = "find_tools"
# Answers longer than this are made for the ear in a worker thread, off the event loop.
SPEAK_IN_THREAD_CHARS = 8_000
# LiveKit adds its own async-task tools (lk_agents_get_running_tasks, lk_agents_cancel_task) to every request
# that offers async tools; they count against the budget too.
LIVEKIT_TASK_TOOLS = 2
FOUND_KEPT = 8  # tools found through find_tools stay offered for this many more (newest first)
# Choices read out to the caller when there are this many or fewer; more are matched from what the caller says.
READ_OUT_CHOICES = 5


@dataclass
class VoiceOptions:
    max_chars: int = 600
    policy: FillerPolicy = field(default_factory=FillerPolicy.load)
    # How long a server's question waits for the caller before it is cancelled.
    ask_timeout_s: float = ASK_TIMEOUT_S
    # At most this many tools in one LLM request (OpenAI refuses more than 128; choice degrades long before).
    tool_budget: int = DEFAULT_BUDGET
    # The caller's language: how dates and numbers in answers are said (fillers: `for_language`).
    language: str = "en"

    @classmethod
    def for_language(cls, language: str, **options: Any) -> VoiceOptions:
        """Options whose filler lines and spoken formatting follow `language` (prompts/fillers.<lang>.yaml)."""
        return cls(policy=FillerPolicy.load(language=language), language=language, **options)


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
        offered = self._toolbox.offered
        for entry in self._toolbox.dispatcher.tools:
            if entry.server != self.server or (offered is not None and entry.name not in offered):
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
        # What happens to a job on the voice side, which the core Job knows nothing of: `filler` (a line was
        # spoken), `released` (the caller's turn was freed), `handed_to_speech` (the answer went to the LLM).
        self.voice_observers: list[Callable[[Job, VoiceEventKind, dict[str, Any]], None]] = []
        # The server's question being put to the caller, if any (elicitation by voice).
        self.asking = VoiceQuestions(self)
        # More tools than the budget: which are offered each turn, from what the caller said (`heard`).
        self.chooser = ToolChooser(self.options.tool_budget)
        self.offered: set[str] | None = None  # None: every tool
        self.heard: list[str] = []
        self._found: list[str] = []
        self._find = raw_tool(
            self._find_tools,
            FIND_TOOL,
            "Find more tools when none of the tools offered fits what the caller wants.",
            {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "what the tool should do, in words"}},
                "required": ["query"],
            },
        )
        self._more = raw_tool(
            self._more_details,
            "more_details",
            "Get the rest of the previous tool answer when it was cut short.",
            {"type": "object", "properties": {"tool": {"type": "string"}}},
        )

    @property
    def tools(self) -> list[llm.Tool | llm.Toolset]:
        for server in self.dispatcher.servers:
            if server not in self._toolsets:
                self._add_toolset(server)
        for gone in set(self._toolsets) - set(self.dispatcher.servers):
            del self._toolsets[gone]
        extras: list[llm.Tool | llm.Toolset] = [self._more, *self.asking.tools()]
        entries = self.dispatcher.tools
        budget = self.options.tool_budget - len(extras) - LIVEKIT_TASK_TOOLS
        if len(entries) <= budget:
            self.offered = None  # everything fits: nothing to choose
        else:
            extras.append(self._find)
            self.offered = set(self._choose(entries, budget - 1))
        return [*self._toolsets.values(), *extras]

    def _choose(self, entries: list[ToolEntry], budget: int) -> list[str]:
        by_spec = {(e.server, e.spec.name): e.name for e in entries}
        keep = [
            by_spec[(state.cfg.name, pinned)]
            for state in self.dispatcher.servers.values()
            for pinned in state.cfg.pinned_tools
            if (state.cfg.name, pinned) in by_spec
        ]
        keep += [by_spec[(j.server, j.tool)] for j in self.jobs if not j.done and (j.server, j.tool) in by_spec]
        keep += list(self._found)
        return self.chooser.choose(self._texts(entries), self.heard, keep=keep, budget=budget)

    def _texts(self, entries: list[ToolEntry]) -> list[ToolText]:
        return [ToolText(e.name, e.server, capped_description(e.spec.description, 300) or "") for e in entries]

    async def _find_tools(self, raw_arguments: dict[str, Any]) -> str:
        query = str(raw_arguments.get("query", "")) if isinstance(raw_arguments, dict) else ""
        entries = {e.name: e for e in self.dispatcher.tools}
        found = self.chooser.search(self._texts(list(entries.values())), query, FOUND_KEPT)
        if not found:
            return "No tool matches that; try other words."
        self._found = [*found, *(n for n in self._found if n not in found)][:FOUND_KEPT]
        lines = [f"{n}: {capped_description(entries[n].spec.description, 160) or n}" for n in found]
        return "These tools are now available; call the one that fits:\n" + "\n".join(lines)

    def bind(self, session: AgentSession) -> None:
        """Remember the session, so toolsets of servers added while it runs are wired like the first ones, and
        follow what the caller says, which decides the tools offered when there are more than the budget."""
        self._session = session
        session.on("conversation_item_added", self._on_item)
        if self.dispatcher.sampler is None:
            self.dispatcher.sampler = self._sample  # servers allowed to sample get this session's LLM

    async def _sample(self, request: SamplingRequest) -> Sampled:
        """A completion for a server (sampling), written by the session's LLM, capped at the request's tokens
        (about four characters each: the stream is cut there)."""
        model = self._session.llm if self._session is not None else None
        if not isinstance(model, llm.LLM):
            raise RuntimeError("the session has no LLM")
        chat = llm.ChatContext.empty()
        if request.system:
            chat.add_message(role="system", content=request.system)
        for role, text in request.messages:
            chat.add_message(role="assistant" if role == "assistant" else "user", content=text)
        limit, parts, stop = request.max_tokens * 4, [], "endTurn"
        async with model.chat(chat_ctx=chat, tools=[]) as stream:
            async for chunk in stream:
                if chunk.delta is not None and chunk.delta.content:
                    parts.append(chunk.delta.content)
                if sum(map(len, parts)) >= limit:
                    stop = "maxTokens"
                    break
        return Sampled("".join(parts)[:limit], model.model, stop)

    def _on_item(self, event: Any) -> None:
        item = getattr(event, "item", None)
        if getattr(item, "type", None) == "message" and getattr(item, "role", None) == "user":
            self.heard = [*self.heard[-9:], item.text_content or ""]

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

        return raw_tool(
            handler,
            entry.name,
            capped_description(entry.spec.description) or f"{entry.spec.name} on {entry.server}",
            capped_schema(entry.spec.input_schema),
            flags=ToolFlag.CANCELLABLE,
        )

    def label(self, server: str) -> str:
        return self.options.policy.for_server(server).label or humanise_name(server)

    async def run_tool(self, entry: ToolEntry, arguments: Any, ctx: RunContext) -> str:
        label = self.label(entry.server)
        try:
            # The caller's turn was freed (by a question, or at the release point); `notes`: what the caller must
            # hear with the answer (a browser step the call cannot do).
            freed: dict[str, Any] = {"turn": False, "notes": []}

            async def ask(question: Question) -> Answer:
                return await self.asking.ask(question, ctx, freed, job)  # `job`: assigned just below

            job = self.dispatcher.submit(entry.name, arguments if isinstance(arguments, dict) else {}, asker=ask)
            job.ask_timeout_s = self.options.ask_timeout_s
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
            if job.done or job.asking:
                return None  # nothing to fill while the caller is being asked
            line = run.line(step, elapsed_s=job.duration, progress=progress["fraction"], message=progress["message"])
            if line is not None:
                self._voice(job, "filler", step=step)
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
                # return value later as a deferred reply. (A question to the caller has freed it already.)
                if not freed["turn"]:
                    freed["turn"] = True
                    self._voice(job, "released", after_s=round(job.duration, 3))
                    await ctx.update(" ".join([*freed["notes"], run.release_line()]))
                    freed["notes"] = []
                result = await job.outcome()
        except ToolCallError as exc:
            raise ToolError(error_sentence(exc, server_label=label)) from None
        except asyncio.CancelledError:
            await job.cancel()
            raise
        spoken = await self._for_speech(result, label)
        text = " ".join([*freed["notes"], spoken.text])
        if spoken.rest:
            self._rest[entry.name] = spoken.rest
            text += " (More is available: call more_details.)"
        self._voice(job, "handed_to_speech")
        return text

    async def _for_speech(self, result: Any, label: str | None = None) -> Spoken:
        """An answer made for the ear; a long one in a worker thread, so parsing a 100,000-character answer never
        holds up the session's audio and timers (a markdown parse of one takes a few hundred ms)."""
        speak = functools.partial(
            for_speech, result, max_chars=self.options.max_chars, server_label=label, language=self.options.language
        )
        text = result.text if isinstance(result, ToolResult) else result if isinstance(result, str) else ""
        return await asyncio.to_thread(speak) if len(text) > SPEAK_IN_THREAD_CHARS else speak()

    def _voice(self, job: Job, kind: VoiceEventKind, **data: Any) -> None:
        for observe in list(self.voice_observers):
            try:
                observe(job, kind, data)
            except Exception:
                log.exception("job %s: voice observer failed", job.id)

    async def _more_details(self, raw_arguments: dict[str, Any]) -> str:
        tool = raw_arguments.get("tool") if isinstance(raw_arguments, dict) else None
        key = tool if tool in self._rest else next(reversed(self._rest), None)
        if key is None:
            return "There is nothing more to add."
        spoken = await self._for_speech(self._rest.pop(key))
        if spoken.rest:
            self._rest[key] = spoken.rest
        return spoken.text


class VoiceQuestions:
    """A server's question (elicitation) put to the caller by the session's LLM, on LiveKit's own machinery.

    `ctx.update` hands the LLM the question with how to ask it (and frees the caller's turn, or arrives as a
    deferred reply when the turn was freed already). While the question is open, two short-lived function tools
    join the toolbox: `answer_question`, whose parameters are the requested schema itself (so the LLM maps what
    the caller said onto the fields: dates, numbers, yes/no, one of the choices), and `decline_question`. An
    answer that does not fit is handed back to the LLM to ask once more; a second misfit declines. URL-mode
    questions are declined with a sentence saying what the caller can do instead. One question at a time per
    session: another server's question waits its turn.
    """

    def __init__(self, toolbox: McpToolbox) -> None:
        self.toolbox = toolbox
        self.open: Question | None = None
        self._answer: asyncio.Future[Answer] | None = None
        self._misfits = 0
        self._tools: list[llm.Tool] = []
        self._turn = asyncio.Lock()

    def tools(self) -> list[llm.Tool]:
        return list(self._tools) if self.open is not None else []

    async def ask(self, question: Question, ctx: RunContext, freed: dict[str, Any], job: Job) -> Answer:
        label = self.toolbox.label(question.server)
        if question.mode == "url":
            # Said with the answer (or at the release point), not as an update of its own: declined at once, the
            # call usually ends at once too, and an answer landing while an update is being spoken was dropped.
            if freed["turn"]:
                await ctx.update(url_sentence(question, label))
            else:
                freed["notes"].append(url_sentence(question, label))
            return Answer("decline", why="a browser step cannot be done on a call")
        async with self._turn:
            self.open, self._misfits = question, 0
            self._answer = asyncio.get_running_loop().create_future()
            self._tools = self._make_tools(question)
            try:
                self.toolbox._voice(job, "question", message=question.message)
                await self._update(ctx, freed, ask_prompt(question, label))
                return await self._answer
            finally:
                self.open, self._answer, self._tools = None, None, []

    async def _update(self, ctx: RunContext, freed: dict[str, Any], message: str) -> None:
        freed["turn"] = True
        await ctx.update(message)

    def _make_tools(self, question: Question) -> list[llm.Tool]:
        schema = {
            "type": "object",
            "properties": question.schema.get("properties", {}),
            "required": question.schema.get("required", []),
        }
        answer = raw_tool(
            self._on_answer,
            ANSWER_TOOL,
            f"Send the caller's answer to the question: {question.message}",
            schema,
        )
        decline = raw_tool(
            self._on_decline,
            DECLINE_TOOL,
            "The caller does not want to answer the question (or wants to stop): say so.",
            {
                "type": "object",
                "properties": {"stop": {"type": "boolean", "description": "true: stop the whole request"}},
            },
        )
        return [answer, decline]

    async def _on_answer(self, raw_arguments: dict[str, Any]) -> str:
        question, pending = self.open, self._answer
        if question is None or pending is None or pending.done():
            return "There is no open question any more."
        content, problems = check(question, raw_arguments if isinstance(raw_arguments, dict) else {})
        if problems:
            self._misfits += 1
            if self._misfits < 2:
                return (
                    "That answer does not fit: " + "; ".join(problems) + ". Ask the caller again, briefly, "
                    f"then call {ANSWER_TOOL} once more."
                )
            pending.set_result(Answer("decline", why="the answer did not fit twice: " + "; ".join(problems)))
            return "That still does not fit, so I could not pass it on. Tell the caller briefly."
        pending.set_result(Answer("accept", content))
        return "Thank you, I have passed that on."

    async def _on_decline(self, raw_arguments: dict[str, Any]) -> str:
        pending = self._answer
        if pending is None or pending.done():
            return "There is no open question any more."
        stop = isinstance(raw_arguments, dict) and raw_arguments.get("stop") is True
        pending.set_result(Answer("cancel" if stop else "decline", why="the caller said no"))
        return "Understood, I have told them."


def ask_prompt(question: Question, label: str) -> str:
    """What the LLM is told when a server asks: the question to put in its own words, the fields, and how to
    hand the answer back."""
    parts = [f'{label} needs an answer from the caller first. Ask the caller: "{question.message}"']
    for f in question.fields:
        hint = ""
        if f.kind in ("choice", "choices") and len(f.options) <= READ_OUT_CHOICES:
            hint = " — read out the choices: " + ", ".join(f.labels)
        elif f.kind in ("choice", "choices"):
            hint = " — one of the listed values; do not read them all out"
        elif f.format in ("date", "date-time"):
            hint = " — turn what the caller says into YYYY-MM-DD"
        elif f.kind == "boolean":
            hint = " — yes or no"
        default = f" (if not said: {f.default})" if f.has_default and not f.secret else ""
        parts.append(f"- {f.title}{'' if f.required else ' (optional)'}{hint}{default}")
    parts.append(
        f"If it commits the caller (an amount, a booking), repeat what they said back before sending. Then call "
        f"{ANSWER_TOOL} with their answer, or {DECLINE_TOOL} if they do not want to answer."
    )
    return "\n".join(parts)


def url_sentence(question: Question, label: str) -> str:
    host = urlsplit(question.url or "").hostname or "their website"
    return (
        f'{label} asks the caller to continue in a web browser ("{question.message}"), which cannot be done '
        f"during a call. Tell the caller they can finish it themselves at {host}, and that the request goes on "
        "without it."
    )


def raw_tool(
    handler: Callable[..., Any], name: str, description: str, parameters: dict[str, Any], **options: Any
) -> llm.Tool:
    """A LiveKit function tool from a JSON schema (MCP tools, and our own: more_details, find_tools, a question's)."""
    return function_tool(
        handler, raw_schema={"name": name, "description": description, "parameters": parameters}, **options
    )


def llm_from_env(settings: Settings) -> llm.LLM | None:
    """The real OpenAI (or OpenAI-compatible) LLM when a key or base URL is configured, else None. The one
    place the LLM is built: the worker and the demo both ask here."""
    if not settings.openai_configured:
        return None
    from livekit.plugins import openai

    return openai.LLM(model=settings.llm_model, base_url=settings.openai_base_url)
