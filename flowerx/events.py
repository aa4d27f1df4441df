"""How the core reports while it works: plain-text messages and progress counts, through callbacks.

The library never prints. The CLI turns these into lines and progress bars (escaping whatever users or
models named); a program that embeds flowerx passes its own callbacks, or none.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("info", "step", "warning", "detail")  # detail: shown with -v; step: the periodic training lines


def _ignore(*args) -> None:
    pass


@dataclass
class Events:
    message: Callable[[str, str], None] = _ignore  # (kind, text): text is plain, never markup
    # (task, done, total or None, unit): absolute counts; unit "img", "B" (bytes) or "" (a step of work)
    progress: Callable[..., None] = _ignore

    def info(self, text: str) -> None:
        self.message("info", text)

    def step(self, text: str) -> None:
        self.message("step", text)

    def warning(self, text: str) -> None:
        self.message("warning", text)

    def detail(self, text: str) -> None:
        self.message("detail", text)


QUIET = Events()


# Control characters, line separators, bidi marks/embeddings/overrides/isolates, zero-width space and BOM,
# undecodable bytes (surrogates). Zero-width (non-)joiners stay: scripts and emoji use them.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def _escape_char(match: re.Match) -> str:
    c = match.group()
    if "\ud800" <= c <= "\udfff":  # a byte of a name that is not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: object) -> str:
    """text with control characters, bidi overrides and undecodable bytes shown as escapes (\\x1b, \\n):
    a name can neither drive the terminal nor break a line. Print it as plain text (Text), not markup."""
    return _UNPRINTABLE.sub(_escape_char, str(text))
