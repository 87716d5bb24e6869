"""A server's question asked on a terminal (`call` run by a person): one prompt per field, typed by the schema,
defaults shown and taken on Enter, secrets read without echo, the answer checked and asked again once.

Ctrl-D or Ctrl-C at a prompt cancels; answering "n" to the last confirmation declines. Prompts go to stderr, so
the tool's answer alone goes to stdout.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import threading
from typing import Any

from mcp_integration.elicitation import Answer, Field, Question, check

__all__ = ["ask_on_terminal"]


class _Cancelled(Exception):
    pass


def _read(prompt: str, *, secret: bool = False) -> str:
    try:
        if secret:
            return getpass.getpass(prompt, stream=sys.stderr)
        sys.stderr.write(prompt)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    except (EOFError, KeyboardInterrupt):
        raise _Cancelled from None


def _prompt(f: Field) -> str:
    hint = ""
    if f.kind == "choice":
        hint = " (" + " / ".join(f.labels) + ")"
    elif f.kind == "choices":
        hint = " (any of, comma-separated: " + ", ".join(f.labels) + ")"
    elif f.kind == "boolean":
        hint = " (yes / no)"
    elif f.format:
        hint = {"date": " (YYYY-MM-DD)", "date-time": " (YYYY-MM-DDTHH:MM:SSZ)"}.get(f.format, f" ({f.format})")
    default = ""
    if f.has_default and not f.secret:
        shown = ", ".join(map(str, f.default)) if isinstance(f.default, list) else f.default
        default = f" [{str(shown).lower() if isinstance(f.default, bool) else shown}]"
    need = "" if f.required or f.has_default else " (optional)"
    about = f" — {f.description}" if f.description and f.description != f.title else ""
    return f"  {f.title}{about}{hint}{need}{default}: "


def _form(question: Question) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in question.fields:
        text = _read(_prompt(f), secret=f.secret).strip()
        if text:
            values[f.name] = text
    return values


def _ask(question: Question) -> Answer:
    out = sys.stderr
    out.write(f"\n{question.server} asks: {question.message}\n")
    try:
        if question.mode == "url":
            out.write(f"  Open this address to continue: {question.url}\n")
            done = _read("  Press Enter when done there, or type n to decline: ").strip().lower()
            return Answer("decline", why="declined at the terminal") if done in ("n", "no") else Answer("accept")
        for attempt in range(2):
            content, problems = check(question, _form(question))
            if not problems:
                break
            out.write("  That does not fit: " + "; ".join(problems) + "\n")
            if attempt == 1:
                return Answer("decline", why="the answers did not fit twice")
        sure = _read("  Send these answers? [Y/n]: ").strip().lower()
        if sure in ("n", "no"):
            return Answer("decline", why="declined at the terminal")
        return Answer("accept", content)
    except _Cancelled:
        out.write("\n")
        return Answer("cancel", why="cancelled at the terminal")


async def ask_on_terminal(question: Question) -> Answer:
    # A daemon thread, not the default executor: the event loop keeps the connection alive while the person types,
    # and a question given up on (its time ran out) does not keep the process from exiting on a blocked read.
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[Answer] = loop.create_future()

    def run() -> None:
        try:
            result: Answer | BaseException = _ask(question)
        except BaseException as exc:  # handed to the loop, raised there
            result = exc
        loop.call_soon_threadsafe(_settle, answer, result)

    threading.Thread(target=run, name="terminal-question", daemon=True).start()
    return await answer


def _settle(future: asyncio.Future[Answer], result: Answer | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
