"""How the core reports while it works: plain-text messages and progress counts, through callbacks.

The library never prints. The CLI turns these into lines and progress bars (escaping whatever users or
models named); a program that embeds flowerx passes its own callbacks, or none.
"""

from __future__ import annotations

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
