"""A stdio MCP server written the way many are: one loop that reads a line, handles it, writes the answer, and
only then reads the next line. Nothing runs beside a request, so a `ping` sent during a call is answered when
the call has ended, and a tool that blocks (a synchronous HTTP request, a long computation) blocks everything.

    python tests/servers/serial_stdio_server.py [--pid-file PATH] [--record-initialize PATH] [--fork-child PATH]

Measured behaviour it reproduces (issue 11): on such a server, and on n8n's MCP Server Trigger, an idle `ping`
answers at once, while a `ping` sent 0.5 s into a 3 s call answers only when the call ends (tests/test_serial.py
checks this of this script with the bare SDK). It speaks the 2025-11-25 handshake (`server/discover` is an
unknown method, as on every server written before 2026-07-28).

Tools: `echo {text}`; `work {seconds}` blocks the loop (time.sleep) and answers "worked N s"; `big {mb}` answers
with `mb` megabytes of text in one line, which takes a while to write and to read. --record-initialize writes
the client's `initialize` params (clientInfo, capabilities) to a file as JSON. --fork-child starts a worker
process that outlives the server (writing its pid to PATH), as servers that fork helpers do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from raw_stdio_server import serve

PROTOCOLS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")

TOOLS = [
    {
        "name": "echo",
        "description": "Repeat the text.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    {
        "name": "work",
        "description": "Work for a number of seconds (blocking), then answer.",
        "inputSchema": {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]},
    },
    {
        "name": "big",
        "description": "Answer with a text of the given number of megabytes.",
        "inputSchema": {"type": "object", "properties": {"mb": {"type": "number"}}, "required": ["mb"]},
    },
]


def text_result(text: str) -> dict:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def call(name: str, args: dict) -> dict:
    if name == "echo":
        return text_result(f"echo: {args.get('text', '')}")
    if name == "work":
        seconds = float(args.get("seconds", 1))
        time.sleep(seconds)
        return text_result(f"worked {seconds:g} s")
    if name == "big":
        size = int(float(args.get("mb", 1)) * 1_000_000)
        return text_result("x" * size)
    return {"content": [{"type": "text", "text": f"unknown tool {name}"}], "isError": True}


def main() -> None:
    if "--pid-file" in sys.argv:
        with open(sys.argv[sys.argv.index("--pid-file") + 1], "w") as f:
            f.write(str(os.getpid()))

    if "--fork-child" in sys.argv:
        # A helper that stays in our process group and would run forever if nobody ended the group.
        child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(3600)"
        path = sys.argv[sys.argv.index("--fork-child") + 1]
        subprocess.Popen([sys.executable, "-c", child, path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def record(params: dict) -> None:
        if "--record-initialize" in sys.argv:
            with open(sys.argv[sys.argv.index("--record-initialize") + 1], "w") as f:
                json.dump(params, f)

    serve(TOOLS, call, name="serial", protocol=lambda v: v if v in PROTOCOLS else PROTOCOLS[0], on_initialize=record)


if __name__ == "__main__":
    main()
