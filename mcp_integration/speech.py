"""Tool results as something a voice can say (DESIGN: "Speech is a format").

Pure functions, no I/O: markdown (read by a CommonMark parser, markdown-it-py), HTML, URLs and JSON become short
plain prose under a hard length cap, and a failed call becomes one honest sentence. What did not fit is kept
for follow-up questions.

Dates, times and grouped numbers are said the caller's way: English as below, other languages through Babel's
CLDR data (`language=` of `for_speech`, carried to the formatters in a context variable for the one call).
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import unicodedata
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, time
from typing import Any
from urllib.parse import urlsplit

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_time
from babel.numbers import format_decimal, get_decimal_symbol
from markdown_it import MarkdownIt

from mcp_integration.errors import ToolCallError
from mcp_integration.results import ToolResult

__all__ = [
    "LANGUAGES",
    "LIST_SHOWN",
    "MAX_DEPTH",
    "MAX_KEYS",
    "REASON_CHARS",
    "Spoken",
    "error_sentence",
    "for_speech",
    "humanise_name",
]


@dataclass(frozen=True)
class Spoken:
    text: str
    rest: str | None  # what did not fit under the cap, kept for follow-up questions


log = logging.getLogger(__name__)

LIST_SHOWN = 3
# The languages fillers and formatting are made for (prompts/fillers.<lang>.yaml); any language Babel knows
# gets its dates and numbers, English fillers otherwise.
LANGUAGES = ("en", "es", "de", "fr")
_LOCALE: ContextVar[Locale | None] = ContextVar("speech_locale", default=None)  # None: English, as written below
MAX_DEPTH = 6  # deeper structure is never worth saying aloud, and the limit keeps recursion safe
MAX_KEYS = 30
REASON_CHARS = 120
_MORE_AFTER_SENTENCE, _MORE_MID = " There is more.", "… there is more."
_MISSING = object()

_PRIORITY = "name title summary status result message answer description total count date time price eta".split()
_BARE = frozenset("message summary answer result text response reply".split())  # the label would add nothing
_LEAD = frozenset("name title label".split())  # inside a list item the name alone says which item it is
_WRAPPERS = frozenset("data result response payload output body".split())  # "data city" says no more than "city"
_ID_WORDS, _NOISE_WORDS = {"id", "uuid", "guid"}, {"hash", "etag", "checksum", "sha", "cursor", "digest", "nonce"}
# Numbers that name rather than count: "order 123456" must not become "order 123,456", nor "version 3.10" "3.1".
_IDENT_WORDS = frozenset(
    "id order number no ref code pin phone tel account booking invoice ticket room version".split()
)
_SECRET_KEY = re.compile(r"passw(or)?d|secret|apikey|token$|authori[sz]ation|cookie|credential|privatekey|signature")
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = "January February March April May June July August September October November December".split()

# CommonMark with HTML blocks (said through their text) and GFM tables and strikethrough; no linkify: bare
# addresses are found by _URL, which also knows schemeless ones ("www.", "//").
_MD = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\ufffd\ud800-\udfff]")
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\u2300-\u23ff\u2600-\u27bf\u2b00-\u2bff\ufe00-\ufe0f\u20e3\ue000-\uf8ff"
    "\U000e0000-\U000e007f]"
)
_SCRIPT = re.compile(r"<(script|style)\b.*?(?:</\1\s*>|\Z)|<!--.*?(?:-->|\Z)", re.I | re.S)  # unclosed: to the end
_BLOCK_TAG = re.compile(r"<br\s*/?>|</(?:p|div|li|tr|h[1-6]|ul|ol|table|blockquote)\s*>", re.I)
_LI = re.compile(r"<li\b[^>]*>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][\w:-]*(?:\s[^<>]*)?/?>")
_URL = re.compile(
    r"(?:\b(?:https?|ftp)://|(?<![\w:/])//(?=[\w-]+\.)|\bwww\.)[^\s<>\"'`\[\](){}|]*[^\s<>\"'`\[\](){}|.,;:!?]", re.I
)
_SECRET = re.compile(
    r"\bBearer\s+[\w.~+/=-]{16,}|\b(?:sk|pk|rk)[-_](?:live_|test_|proj-)?[\w-]{12,}|\bgh[pousr]_\w{20,}"
    r"|\bxox[abprs]-[\w-]{10,}|\bAKIA[0-9A-Z]{16}\b|\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*"
    r"|\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
    r"|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{20,}\b"
    r"|(?<![\w/+=-])(?=[\w/+=-]*\d)(?=[\w/+=-]*[a-z])(?=[\w/+=-]*[A-Z])[\w/+=-]{32,}"
)
_MASKED = re.compile(r"(?i)\b(?:bearer|basic)\s+\*{3}|\b([a-z_][\w-]*)\s*[=:]\s*\*{3}|\*{3}")
# Only values with a digit count as leaked secrets, so "invalid token: expired" keeps its meaning. The digit is
# looked for in the first 200 characters only: an unbounded look-ahead made a run of "token=" quadratic.
_KEYVAL = re.compile(
    r"(?i)\b(api[_-]?key|access[_-]?token|token|secret|password|passwd)\s*[=:]\s*"
    r"(?=[^\s)\]}>,;'\"]{0,200}\d)[^\s)\]}>,;'\"]{6,}"
)
_DATE = re.compile(
    r"(?<![\w-])(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::\d{2}(?:[.,]\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?(?![\w-]|:\d)"
)
_NUMBER = re.compile(r"(?<![\w#+])(?<!\w[.,:/-])(\d+)(\.\d+)?(?![\w/:-]|[.,]\d)")
_MONEY_BEFORE = re.compile(r"(?:[$€£¥₹]|\b(?:USD|EUR|GBP|NOK|SEK|DKK|CHF|kr))\s?$")
_MONEY_AFTER = re.compile(r"\s?(?:USD|EUR|GBP|NOK|SEK|DKK|CHF|kr|dollars?|euros?|pounds?|cents?)\b", re.I)
_SENTENCE_END = re.compile(r"[.!?…](?=\s)")
_CLAUSE_END = re.compile(r"[,;:](?=\s)|\s[-–—](?=\s)")


def humanise_name(name: str) -> str:
    """`lookup_weather` → "lookup weather", `etaDate` → "eta date"; acronyms stay capitals so TTS spells them."""
    split = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", str(name))
    words = [w for w in re.split(r"[\W_]+", split) if w]
    return " ".join(w if len(w) > 1 and w.isupper() else w.lower() for w in words)


def for_speech(
    result: ToolResult | str | Any, *, max_chars: int = 600, server_label: str | None = None, language: str = "en"
) -> Spoken:
    """A tool's answer as short plain prose, never longer than `max_chars`; never raises. `language` (a BCP 47
    tag such as "de" or "es-MX") decides how dates and numbers are said."""
    token = _LOCALE.set(_locale(language))
    try:
        return _for_speech(result, max_chars, server_label)
    finally:
        _LOCALE.reset(token)


def _locale(language: str) -> Locale | None:
    tag = (language or "en").replace("-", "_")
    if tag.split("_")[0].lower() == "en":
        return None
    try:
        return Locale.parse(tag)
    except (UnknownLocaleError, ValueError):
        log.warning("unknown language %r: dates and numbers are said in English", language)
        return None


def _for_speech(result: Any, max_chars: int, server_label: str | None) -> Spoken:
    try:
        text = _tidy(_render(result)) or f"{_system(None, server_label)[0]} returned nothing."
        return _cap(text, max_chars)
    except Exception:  # one odd answer must never break a call in progress
        try:
            return _cap("The answer could not be read.", max_chars)
        except Exception:
            return Spoken("", None)


def error_sentence(err: ToolCallError, *, server_label: str | None = None) -> str:
    """One honest sentence about a failed call, naming the system in plain words and never a secret."""
    try:
        start, mid = _system(getattr(err, "server", None), server_label)
        kind, reason = getattr(err, "kind", ""), _reason(getattr(err, "reason", ""))
        because = f": {reason}." if reason else "."
        return {
            "timeout": f"{start} did not answer in time.",
            "unreachable": f"{start} is not answering right now.",
            "unauthorized": f"{start} is refusing my access; someone needs to sign it in again.",
            "needs_login": f"I can't use {mid} until someone signs it in again.",
            "tool_error": f"{start} could not do that{because}",
            "invalid_arguments": f"I could not send that request{because}",
            "unknown_tool": "I do not have a tool for that.",
            "cancelled": "That request was cancelled.",
        }.get(kind, f"Something went wrong with {mid}.")
    except Exception:
        return "Something went wrong with that request."


def _system(server: str | None, label: str | None) -> tuple[str, str]:
    """The system's name at the start and in the middle of a sentence; a capitalised label is a proper name."""
    name = " ".join(str(label).split()) if label else humanise_name(server or "")
    if not name:
        return "The tool", "the tool"
    if name[0].isupper() or name.lower().startswith("the "):
        return name[0].upper() + name[1:], name
    return f"The {name}", f"the {name}"


def _reason(reason: Any) -> str:
    text = _tidy(_render(reason))
    # The SDK's own servers prefix "Error executing tool NAME: "; a caller needs only the reason.
    text = re.sub(r"^(?:(?:error|exception|failed)\s*:\s*|error executing tool \S+\s*:\s*)+", "", text, flags=re.I)
    if len(text) > REASON_CHARS:
        cut = text.rfind(" ", 0, REASON_CHARS)
        text = text[: cut if cut > REASON_CHARS // 2 else REASON_CHARS]
    return text.rstrip(" .!?,;:-…")


def _render(result: Any) -> str:
    if isinstance(result, ToolResult):
        if result.structured is not None and (summary := _summary(result.structured)).strip():
            return summary
        result = result.text
    if isinstance(result, bytes | bytearray | memoryview):
        result = bytes(result).decode("utf-8", "replace")
    if result is None:
        return ""
    if isinstance(result, str):
        parsed = _json_like(result)
        return _clean(result) if parsed is _MISSING else _summary(parsed)
    if isinstance(result, dict | list | tuple | int | float):
        return _summary(result)
    return _clean(str(result))


def _json_like(text: str) -> Any:
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[":
        return _MISSING
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        return _MISSING


# -- JSON -------------------------------------------------------------------------------------------------------


def _summary(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(
            _end(f"{label[:1].upper()}{label[1:]}: {v}" if label else v) for label, v in _facts(value, "", 1, _BARE)
        )
    if isinstance(value, list | tuple) and not value:
        return ""
    return _end(_speak(value, 0))


def _facts(obj: dict[Any, Any], prefix: str, depth: int, bare: frozenset[str]) -> list[tuple[str, str]]:
    """(label, phrase) pairs, key facts first; nested dicts flatten into labels like "address city"."""
    if depth > MAX_DEPTH:
        return []
    items = sorted(((str(k), v) for k, v in obj.items()), key=lambda kv: _rank(kv[0]))
    facts: list[tuple[str, str]] = []
    for key, val in items[:MAX_KEYS]:
        human = humanise_name(key)
        words = human.lower().split()
        if not words or _SECRET_KEY.search("".join(words)) or words[-1] in _NOISE_WORDS:
            continue
        label = f"{prefix} {human}".strip()
        if isinstance(val, str) and isinstance(parsed := _json_like(val), dict):  # JSON sent as a string
            val = parsed
        if isinstance(val, dict) and val:
            facts += _facts(val, prefix if "".join(words) in _WRAPPERS else label, depth + 1, bare)
            continue
        if words[-1] in _ID_WORDS and len(str(val)) > 8:  # long ids cannot be said usefully
            continue
        if spoken := _speak(val, depth, plain=words[-1] in _IDENT_WORDS):
            facts.append(("" if not prefix and "".join(words) in bare else label, spoken))
    if len(items) > MAX_KEYS:
        facts.append(("", f"and {len(items) - MAX_KEYS} more details"))
    return facts


def _rank(key: str) -> int:
    return min((_PRIORITY.index(w) for w in humanise_name(key).lower().split() if w in _PRIORITY), default=99)


def _speak(value: Any, depth: int, *, plain: bool = False) -> str:
    """One value as a phrase; strings are cleaned like any text (and may themselves hold JSON)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return _num(value, plain)
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        parsed = _json_like(value) if depth < MAX_DEPTH else _MISSING
        return _clean(value).replace('"', "") if parsed is _MISSING else _speak(parsed, depth + 1)
    if depth > MAX_DEPTH:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{lb}: {v}" if lb else v for lb, v in _facts(value, "", depth + 1, _BARE | _LEAD))
    if isinstance(value, list | tuple | set | frozenset):
        return _list(list(value), depth + 1)
    return _clean(str(value))


def _list(items: list[Any], depth: int) -> str:
    if not items:
        return "none"
    shown: list[str] = []
    used = 0
    for used, item in enumerate(items, 1):  # noqa: B007 - `used` counts what was looked at, for "and N more"
        if phrase := _speak(item, depth):
            shown.append(phrase)
        if len(shown) == LIST_SHOWN:
            break
    more = sum(1 for item in items[used:] if item is not None)
    sep = "; " if any("," in s or ":" in s for s in shown) else ", "
    if more:
        return sep.join(shown) + sep.strip(" ,") + f" and {more} more"
    if sep == ", " and len(shown) > 1:
        return ", ".join(shown[:-1]) + " and " + shown[-1]
    return sep.join(shown)


def _num(x: int | float, plain: bool) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return ""
        if x.is_integer() and abs(x) < 1e15:
            return _num(int(x), plain)
        if abs(x) >= 1e15 or abs(x) < 1e-4:
            return f"{x:.3g}"
        locale = _LOCALE.get()
        if locale is not None and not plain:
            if abs(x) >= 1:
                return format_decimal(round(x, 2), locale=locale)
            return f"{x:.3g}".replace(".", get_decimal_symbol(locale))
        text = f"{x:{',' if abs(x) >= 10_000 and not plain else ''}.2f}" if abs(x) >= 1 else f"{x:.3g}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    try:
        return str(x) if plain or abs(x) < 10_000 else _grouped(x)
    except ValueError:  # beyond Python's int-to-str limit
        return "a very large number"


# -- text -------------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _markdown(_SCRIPT.sub("", text))
    text = _CONTROL.sub("", _EMOJI.sub("", text))
    # A value the scrubber masked ("Bearer ***", "token=***") is said as its name alone, like a secret found here.
    text = _MASKED.sub(lambda m: m[1] or "", text)
    text = _URL.sub(lambda m: _site(m[0]), re.sub(r"[*`]|~~", "", text))
    text = _SECRET.sub("", _KEYVAL.sub(r"\1", text))
    return _NUMBER.sub(_number, _DATE.sub(_date, text))


def _site(url: str) -> str:
    try:
        host = urlsplit(url if "//" in url else f"//{url}").hostname or ""
    except ValueError:
        return ""
    return host.removeprefix("www.")


def _markdown(text: str, *, depth: int = 0) -> str:
    """Markdown (and the HTML in it) to sentences, through a CommonMark parser: headings, table rows and code
    stand alone, list items run on with "; ", paragraphs end with a full stop; emphasis, escapes and link
    syntax go, a link is said by its text (or its site), an image by its alt text."""
    units: list[tuple[str, str]] = []
    kinds: list[str] = []  # the open blocks that decide what a paragraph inside them is
    row: list[str] = []
    for token in _MD.parse(text):
        kind = token.type
        if kind in ("heading_open", "list_item_open", "tr_open", "blockquote_open"):
            kinds.append(kind)
            row = [] if kind == "tr_open" else row
        elif kind in ("heading_close", "list_item_close", "blockquote_close"):
            kinds.pop()
        elif kind == "tr_close":
            kinds.pop()
            units.append(("row", ", ".join(c for c in row if c)))
        elif kind == "inline":
            said = _inline(token.children or []).strip()
            if "tr_open" in kinds:
                row.append(said)
            elif kinds and kinds[-1] == "heading_open":
                units.append(("head", said))
            elif "list_item_open" in kinds:
                units.append(("item", said))
            else:
                units.append(("para", said))
        elif kind in ("fence", "code_block"):
            units.append(("head", "(code omitted)"))
        elif kind == "html_block" and depth == 0:
            inner = _TAG.sub("", html.unescape(_TAG.sub("", _BLOCK_TAG.sub("\n", _LI.sub("\n- ", token.content)))))
            units.append(("html", _markdown(inner, depth=1)))
    return _join(units)


def _inline(children: list[Any]) -> str:
    out: list[str] = []
    link: list[tuple[str, int]] = []  # open links: their target, and where their text starts in `out`
    for child in children:
        kind = child.type
        if kind in ("text", "code_inline"):
            out.append(child.content)
        elif kind in ("softbreak", "hardbreak"):
            out.append(" ")
        elif kind == "link_open":
            link.append((str(child.attrs.get("href", "")), len(out)))
        elif kind == "link_close" and link:
            href, start = link.pop()
            said = "".join(out[start:]).strip()
            # An autolink (or a link whose text is its address) is said by its site, like any bare address.
            if not said or child.markup == "autolink" or said == href:
                del out[start:]
                out.append(_site(href))
        elif kind == "image":
            alt = "".join(c.content for c in child.children or [] if c.type in ("text", "code_inline")).strip()
            out.append(alt or _site(str(child.attrs.get("src", ""))))
        elif kind == "html_inline" and child.content.lower().startswith(("<br", "<li")):
            out.append(" ")
    return "".join(out)


def _join(units: list[tuple[str, str]]) -> str:
    out, prev = "", ""
    for kind, content in units:
        content = content.strip()
        if not content:
            continue
        if out:
            out += " " if out[-1] in ".!?:;,…" else "; " if prev == kind == "item" else ". "
        out, prev = out + content, kind
    return out + "." if prev in ("item", "head", "row") and out[-1:] not in (".", "!", "?", "…") else out


def _date(m: re.Match[str]) -> str:
    try:
        d = date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return m[0]
    locale = _LOCALE.get()
    spoken = f"{_DAYS[d.weekday()]} {d.day} {_MONTHS[d.month - 1]} {d.year}"
    if locale is not None:
        spoken = format_date(d, format="full", locale=locale)
    if m[4] is None:
        return spoken
    if int(m[4]) > 23 or int(m[5]) > 59:
        return m[0]
    utc = " UTC" if m[6] in ("Z", "+00:00", "+0000", "-00:00") else ""  # other offsets: the local time as written
    if locale is not None:
        return f"{spoken}, {format_time(time(int(m[4]), int(m[5])), format='short', locale=locale)}{utc}"
    return f"{spoken} at {m[4]}:{m[5]}{utc}"


def _number(m: re.Match[str]) -> str:
    whole, frac = m[1], m[2] or ""
    before, after = m.string[max(0, m.start() - 16) : m.start()], m.string[m.end() : m.end() + 12]
    money = _MONEY_BEFORE.search(before) or _MONEY_AFTER.match(after)
    prev = re.search(r"([A-Za-z]+)\W*$", before)
    if prev and prev[1].lower() in _IDENT_WORDS:
        return m[0]
    if frac and len(frac) <= 3 and not money:  # "1.000" may be a European thousand, so three decimals stay
        frac = frac.rstrip("0").rstrip(".")
    # Seven digits and more in free text are too often phone or reference numbers to group.
    if not (5 <= len(whole) <= 6 and whole[0] != "0"):
        return whole + frac
    return _grouped(int(whole)) + frac


def _grouped(n: int) -> str:
    locale = _LOCALE.get()
    return f"{n:,}" if locale is None else format_decimal(n, locale=locale, group_separator=True)


def _tidy(text: str) -> str:
    """Last pass for anything earlier steps let through or created: markup leftovers and stray punctuation."""
    text = _CONTROL.sub("", _EMOJI.sub("", text))
    text = re.sub(r"\(\s*\)", "", re.sub(r"[{}\[\]]", " ", re.sub(r"[*`]|~~", "", text)))
    text = re.sub(r"\s*\|\s*", ", ", re.sub(r"\s+", " ", text))
    text = re.sub(r" +(?=[.,;:!?])", "", re.sub(r"(?<=[.,;:!?]) +[.,;:](?=\s|$)", "", text))
    text = re.sub(r"\( +| +\)", lambda m: m[0].strip(), text).strip()
    # Markers that only now start the text (junk before them was removed) would read as markup next time.
    return re.sub(r"^(?:#+ |[.,;:>]+ ?|[-*+•] |\d{1,3}[.)] )+", "", text).strip()


def _end(text: str) -> str:
    text = text.rstrip()
    return text + "." if text and text[-1] not in ".!?…" else text


def _cap(text: str, max_chars: int) -> Spoken:
    if len(text) <= max_chars:
        return Spoken(text, None)
    if max_chars < 2 * len(_MORE_MID):  # too small for a marker and something worth saying
        limit = max(max_chars, 0)
        cut = text.rfind(" ", 0, limit + 1)
        cut = cut if cut > 0 else limit
        return Spoken(text[:cut].rstrip(), text[cut:].strip() or None)
    budget = max_chars - len(_MORE_MID)
    cut = _cut_point(text, budget)
    head = text[:cut].rstrip(" ,;:-–—")
    more = _MORE_AFTER_SENTENCE if head.endswith((".", "!", "?", "…")) else _MORE_MID
    return Spoken(head + more, text[cut:].strip() or None)


def _cut_point(text: str, budget: int) -> int:
    """Where to cut: the last sentence end, else clause end, else space in the second half of the budget."""
    window, floor = text[: budget + 1], budget // 2
    for pattern in (_SENTENCE_END, _CLAUSE_END):
        ends = [m.end() for m in pattern.finditer(window) if floor <= m.end() <= budget]
        if ends:
            return ends[-1]
    space = window.rfind(" ", floor, budget + 1)
    return space if space > 0 else budget
