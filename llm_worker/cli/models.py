"""``llm-worker models [list] | pull NAME | load NAME | unload NAME``: Ollama's models, by hand.

Talks to OLLAMA_BASE_URL directly (the first of its servers, or the one
``--endpoint`` names), with the settings of the other commands
(environment, ``--config``, flags). A load or unload made here is not the
model manager's: a running service sees it in /api/ps on its next turn and
treats the model like any other (an idle one is unloaded after
MODEL_UNLOAD_TIMEOUT).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from typing import IO, Any

import msgspec

from llm_worker import exitcodes
from llm_worker.cli.flags import add_setting_flags, settings_or_exit
from llm_worker.models.manager import PULL_TIMEOUT
from llm_worker.models.pullprogress import ProgressBar, PullProgress
from llm_worker.plugin.providers import Deadline, ProviderError
from llm_worker.plugins.ollama import OllamaProvider
from llm_worker.protocol.jobs import ErrorKind
from llm_worker.settings.config import Settings
from llm_worker.settings.urls import split_urls

ASK_TIMEOUT = 10.0
_ZERO = re.compile(r"(?:0+(?:\.0*)?|\.0+)(?:ns|us|µs|ms|s|m|h)?")  # a Go duration of zero
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def add_parser(subparsers: Any) -> None:
    """Add ``models`` to the ``llm-worker`` command line."""
    models = subparsers.add_parser("models", help="list Ollama's models, loaded or not; pull, load or unload one")
    models.add_argument("action", nargs="?", choices=["list", "pull", "load", "unload"], default="list")
    models.add_argument("name", nargs="?", metavar="NAME", help="the model to pull, load or unload")
    models.add_argument(
        "--endpoint",
        metavar="N|URL",
        help="which Ollama of OLLAMA_BASE_URL, when it names several: its place (1, 2, ...) or its URL (default: 1)",
    )
    models.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help="load: how long Ollama keeps it once idle, in its syntax (10m, 1h, -1 forever); default: Ollama's",
    )
    add_setting_flags(models, hidden=True)
    models.set_defaults(command=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    settings = settings_or_exit(args)
    if args.action != "list" and not args.name:
        print(f"llm-worker: say which model: llm-worker models {args.action} NAME", file=sys.stderr)
        return exitcodes.USAGE
    urls = split_urls(settings.ollama.base_url)
    url = _endpoint(urls, args.endpoint)
    if url is None:
        print(
            f"llm-worker: --endpoint {args.endpoint}: not one of OLLAMA_BASE_URL's {', '.join(urls)}", file=sys.stderr
        )
        return exitcodes.USAGE
    provider = OllamaProvider(_no_retries(settings), url)
    try:
        if args.action == "pull":
            return pull(provider, args.name, sys.stdout)
        if args.action == "load":
            keep_alive = _keep_alive(args.keep_alive)
            seconds = provider.load(args.name, Deadline(settings.models.load_timeout / 1000), keep_alive)
            if _unloads(keep_alive):  # Ollama unloads a model asked to stay for no time at all
                print(f"unloaded {args.name} (--keep-alive {args.keep_alive})")
            else:
                print(f"loaded {args.name} in {seconds:.2f}s")
        elif args.action == "unload":
            provider.unload(args.name, Deadline(ASK_TIMEOUT))
            print(f"unloaded {args.name}")
        else:
            list_models(provider, sys.stdout)
    except ProviderError as exc:
        if exc.kind == ErrorKind.NETWORK:
            reason = exc.message.rpartition(": ")[2]  # "GET /api/ps: cannot reach URL: <reason>"
            print(f"llm-worker: cannot reach Ollama at {url}: {reason}", file=sys.stderr)
        else:
            print(f"llm-worker: {exc.message}", file=sys.stderr)
        return 1
    finally:
        provider.close()
    return exitcodes.OK


def _endpoint(urls: list[str], chosen: str | None) -> str | None:
    """The URL ``--endpoint`` names (a place from 1, or a URL of the list); the first when it names none."""
    if chosen is None:
        return urls[0]
    if chosen.isdigit():
        return urls[int(chosen) - 1] if 1 <= int(chosen) <= len(urls) else None
    return chosen.rstrip("/") if chosen.rstrip("/") in urls else None


def _no_retries(settings: Settings) -> Settings:
    """A person at a terminal wants the answer now, not three retries of an Ollama that is down."""
    return msgspec.structs.replace(settings, ollama=msgspec.structs.replace(settings.ollama, max_retries=0))


def _keep_alive(text: str | None) -> int | str | None:
    if text is None:
        return None
    try:
        return int(text)  # Ollama reads a number as seconds
    except ValueError:
        return text


def _unloads(keep_alive: int | str | None) -> bool:
    """Whether a keep-alive is zero (``0``, ``0s``, ``0.0m``): Ollama then unloads the model at once."""
    if isinstance(keep_alive, str):
        return _ZERO.fullmatch(keep_alive.strip()) is not None
    return keep_alive == 0


def list_models(provider: OllamaProvider, out: IO[str]) -> None:
    deadline = Deadline(ASK_TIMEOUT)
    running = {m.name: m for m in provider.running(deadline)}
    rows = [("NAME", "SIZE", "LOADED", "MEMORY (VRAM)", "EXPIRES")]
    available = provider.available(deadline)
    for model in available + [m for m in running.values() if m.name not in {a.name for a in available}]:
        ps = running.get(model.name)
        rows.append(
            (
                model.name,
                _size(model.size),
                "yes" if ps else "no",
                _size(ps.vram) if ps else "",
                _expires(ps.expires_at) if ps else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
    out.write(f"{len(available)} available, {len(running)} loaded\n")


def pull(provider: OllamaProvider, name: str, out: IO[str]) -> int:
    """Pull with a bar redrawn in place on a terminal, a line per step and tenth otherwise."""

    def line(text: str, fields: dict[str, Any]) -> None:
        out.write(f"{text}\n")
        out.flush()

    bar = ProgressBar(out) if out.isatty() else None
    lines = PullProgress(line)
    try:
        provider.pull(name, Deadline(PULL_TIMEOUT), bar if bar is not None else lines)
    finally:
        if bar is not None:
            bar.close()
    out.write(f"pulled {name}\n")
    return exitcodes.OK


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _expires(stamp: str | None) -> str:
    """When Ollama will unload a model on its own: ``in 4m 12s``, ``forever`` or ``-``."""
    match = _STAMP.match(stamp or "")
    if match is None:
        return "-"
    base, fraction, zone = match.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    when = datetime.fromisoformat(f"{base}.{(fraction or '0')[:6].ljust(6, '0')}{zone}")
    if when.year >= 2200:  # Ollama's way of saying keep_alive < 0
        return "forever"
    left = int(when.timestamp() - time.time())
    if left <= 0:
        return "now"
    minutes, seconds = divmod(left, 60)
    hours, minutes = divmod(minutes, 60)
    return f"in {hours}h {minutes}m" if hours else (f"in {minutes}m {seconds}s" if minutes else f"in {seconds}s")
