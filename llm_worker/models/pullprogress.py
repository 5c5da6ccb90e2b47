"""Pull progress as a person reads it: a few lines in a log, or a bar redrawn on a terminal.

Ollama's /api/pull streams a line per chunk of each layer it fetches
(``{"status": "pulling 1a2b3c4d5e6f", "total": ..., "completed": ...}``),
hundreds for a large model; both views here take those lines as they come.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

BAR_WIDTH = 30


class PullProgress:
    """Turns Ollama's pull progress lines into a few: one per status change and per tenth of a layer.

    ``emit(text, fields)`` gets ``pulling 1a2b3c4d5e6f: 40% (808 of 2019 MB)`` or a bare status.
    """

    def __init__(self, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.emit = emit
        self.status = ""
        self.tenth = -1

    def __call__(self, line: dict[str, Any]) -> None:
        status = str(line.get("status", ""))
        total, completed = line.get("total"), line.get("completed")
        changed = status != self.status
        if changed:
            self.status, self.tenth = status, -1
        if isinstance(total, int) and total > 0 and isinstance(completed, int):
            tenth = completed * 10 // total
            if changed or tenth > self.tenth:
                self.tenth = tenth
                self.emit(f"{status}: {percent(completed, total)}", {"completed": completed, "total": total})
        elif changed:
            self.emit(status, {})


def percent(completed: int, total: int) -> str:
    share = min(round(completed * 100 / total), 100 if completed >= total else 99)
    return f"{share}% ({completed / 1e6:.0f} of {total / 1e6:.0f} MB)"


class ProgressBar:
    """``pulling 1a2b3c4d5e6f [#########        ]  30% (606 of 2019 MB)``, redrawn with ``\\r``."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.status = ""
        self.drawn = False

    def __call__(self, line: dict[str, Any]) -> None:
        status = str(line.get("status", ""))
        total, completed = line.get("total"), line.get("completed")
        changed = status != self.status
        if changed:
            self.close()
            self.status = status
        if isinstance(total, int) and total > 0 and isinstance(completed, int):
            filled = BAR_WIDTH * completed // total
            self.out.write(f"\r{status} [{'#' * filled}{' ' * (BAR_WIDTH - filled)}] {percent(completed, total)}")
            self.drawn = True
        elif changed:
            self.out.write(f"{status}\n")
        self.out.flush()

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.drawn = False
