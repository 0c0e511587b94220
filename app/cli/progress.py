"""How an ingest's progress is shown: a step list redrawn in place on a terminal, one plain
line per event otherwise, or JSON lines for scripts."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, Protocol, TextIO

import msgspec

from app.cli.common import print_line
from app.client import StreamEvent

__all__ = ["JsonLines", "PlainLines", "ProgressDisplay", "StepList", "choose_display"]


class ProgressDisplay(Protocol):
    def show(self, ingest_id: str, event: StreamEvent) -> None: ...

    def note(self, text: str) -> None: ...

    def child(self, ingest_id: str, event: StreamEvent, done: int, total: int) -> None: ...


def _line(event: StreamEvent) -> str:
    data: dict[str, Any] = event.payload if isinstance(event.payload, dict) else {}
    message = data.get("message", "")
    if event.event == "requested":
        return f"requested: {data.get('type', '?')} {data.get('url', '')}"
    if event.event == "progress":
        return f"{data.get('step', 'progress')}: {message}"
    if event.event == "complete":
        return f"{data.get('status', '?')}: {message}"
    return f"{event.event}: {message}"


def _child_line(ingest_id: str, event: StreamEvent, done: int, total: int) -> str:
    return f"  [{done}/{total}] {ingest_id} {_line(event)}"


class JsonLines:
    """Each event as ``{"ingest_id", "id", "event", "data"}`` on a line of its own."""

    def show(self, ingest_id: str, event: StreamEvent) -> None:
        print_line(msgspec.json.encode({"ingest_id": ingest_id, **event.to_dict()}).decode())

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def child(self, ingest_id: str, event: StreamEvent, done: int, total: int) -> None:
        self.show(ingest_id, event)


class PlainLines:
    def show(self, ingest_id: str, event: StreamEvent) -> None:
        if event.event == "requested":
            print_line(f"ingest {ingest_id}")
        print_line(_line(event))

    def note(self, text: str) -> None:
        # Asides go to stderr: stdout stays one line per event, the outcome last.
        print(text, file=sys.stderr, flush=True)

    def child(self, ingest_id: str, event: StreamEvent, done: int, total: int) -> None:
        print_line(_child_line(ingest_id, event, done, total))


def _took(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


class StepList:
    """The steps so far, redrawn in place: done ones ticked with how long they took, the
    running one marked, the outcome last."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out or sys.stdout
        self._header = ""
        self._steps: list[list[Any]] = []  # [label, message, started, finished or None]
        self._footer: list[str] = []
        self._drawn = 0

    def show(self, ingest_id: str, event: StreamEvent) -> None:
        data: dict[str, Any] = event.payload if isinstance(event.payload, dict) else {}
        now = time.monotonic()
        if event.event == "requested":
            self._header = f"Ingesting {data.get('url', '')} ({data.get('type', '?')}, {ingest_id})"
        elif event.event in ("progress", "started", "interrupted"):
            self._finish_running(now)
            label = data.get("step", event.event) if event.event == "progress" else event.event
            self._steps.append([label, data.get("message", ""), now, None])
        elif event.event == "complete":
            self._finish_running(now)
            mark = "✔" if data.get("status") in ("success", "skipped", "queued") else "✘"
            self._footer = [f"{mark} {data.get('status', '?')}: {data.get('message', '')}"]
        self._draw()

    def note(self, text: str) -> None:
        self._footer.append(text)
        self._draw()

    def child(self, ingest_id: str, event: StreamEvent, done: int, total: int) -> None:
        self._footer.append(_child_line(ingest_id, event, done, total))
        self._draw()

    def _finish_running(self, now: float) -> None:
        if self._steps and self._steps[-1][3] is None:
            self._steps[-1][3] = now

    def _draw(self) -> None:
        lines = [self._header] if self._header else []
        for label, message, started, finished in self._steps:
            took = "" if finished is None else _took(finished - started)
            lines.append(f"  {'…' if finished is None else '✔'} {label:<16} {took:>7}  {message}")
        lines.extend(self._footer)
        # A wrapped line would throw the count of lines to go back up off.
        width = shutil.get_terminal_size().columns
        lines = [line if len(line) < width else line[: width - 2] + "…" for line in lines]
        # Back to the first line drawn last time, clear to the end, draw everything again.
        prefix = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self._out.write(prefix + "\n".join(lines) + "\n")
        self._out.flush()
        self._drawn = len(lines)


def choose_display(as_json: bool) -> ProgressDisplay:
    if as_json:
        return JsonLines()
    return StepList() if sys.stdout.isatty() else PlainLines()
