"""Progress of long work (the llama.cpp build, GGUF conversion, long reference runs).

On a terminal a live rich bar (as the sweep has); elsewhere (CI logs, pipes) one plain line at the
start, then at most one every ``interval_s`` seconds and one at the end, so a log shows that work is
going on within seconds.  ``BAILING_PARITY_PROGRESS=rich|plain|off`` overrides the choice.

Work that runs in a child process and writes a log (compilers, the converter) is followed with
:func:`follow_log`: a thread reads the log as it grows and turns lines into progress with a parser
(:func:`ninja_step` for the build, :func:`converter_tensor` for the converter) as
:class:`Event` values.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

MODE_ENV = "BAILING_PARITY_PROGRESS"
PLAIN_INTERVAL_S = 10.0


def _mode(stream: IO[str]) -> str:
    chosen = os.environ.get(MODE_ENV, "").strip().lower()
    if chosen in ("rich", "plain", "off"):
        return chosen
    return "rich" if getattr(stream, "isatty", lambda: False)() else "plain"


class Progress:
    """One task's progress: ``update(completed=, status=)`` from any thread."""

    def __init__(self, what: str, total: float | None = None, *, stream: IO[str] | None = None,
                 interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.what, self.total = what, total
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.mode = _mode(self.stream)
        self.completed: float = 0.0
        self.status = ""
        self._start = time.monotonic()
        self._last_line = float("-inf")
        self._lock = threading.Lock()
        self._rich: Any = None
        self._task: Any = None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                TaskProgressColumn(), TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                console=Console(file=self.stream), transient=False)
            self._rich.start()
            self._task = self._rich.add_task(self.what, total=self.total, status="")
        elif self.mode == "plain":
            self._line("started")
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._rich is not None:
            if exc_type is None and self.total is not None:
                self._rich.update(self._task, completed=self.total)
            self._rich.stop()
        elif self.mode == "plain":
            self._line("done" if exc_type is None else "stopped")

    # -- updates ----------------------------------------------------------------------------

    def update(self, completed: float | None = None, status: str | None = None,
               total: float | None = None) -> None:
        with self._lock:
            if total is not None:
                self.total = total
            if completed is not None:
                self.completed = completed
            if status is not None:
                self.status = status
            if self._rich is not None:
                self._rich.update(self._task, completed=self.completed, total=self.total,
                                  status=self.status)
            elif self.mode == "plain" and time.monotonic() - self._last_line >= self.interval_s:
                self._line()

    def fraction(self) -> float | None:
        return self.completed / self.total if self.total else None

    def _line(self, event: str = "") -> None:
        self._last_line = time.monotonic()
        elapsed = self._last_line - self._start
        done = self.fraction()
        parts = [f"[{self.what}]", event or (f"{done:.0%}" if done is not None else "running"),
                 self.status, f"({elapsed:.0f} s)"]
        print(" ".join(p for p in parts if p), file=self.stream, flush=True)


class LayerProgress:
    """A forward pass's progress, layer by layer (``callback(done, total)`` after each layer):
    shown only once a forward has run for ``after_s`` seconds, so the real checkpoint's streamed
    forwards (minutes each) report while tiny ones stay silent."""

    def __init__(self, what: str, *, after_s: float = 5.0, stream: IO[str] | None = None) -> None:
        self.what, self.after_s, self.stream = what, after_s, stream
        self._start: float | None = None
        self._progress: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done <= 1 or self._start is None:
            self._close()
            self._start = now
        if self._progress is None and now - self._start >= self.after_s:
            self._progress = Progress(self.what, total, stream=self.stream).__enter__()
        if self._progress is not None:
            self._progress.update(completed=done, status=f"layer {done}/{total}")
        if done >= total:
            self._close()
            self._start = None

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None


class Event(NamedTuple):
    """What one log line says: a status, and either a position (``done`` of ``total``) or, with
    ``count``, one more unit of work done."""

    status: str
    done: float | None = None
    total: float | None = None
    count: bool = False


def ninja_step(line: str) -> Event | None:
    """``[12/140] /usr/bin/g++ ... -c .../llama-model.cpp`` -> step 12 of 140, llama-model.cpp."""
    m = re.search(r"\[(\d+)/(\d+)\]\s*(.*)", line)
    if not m:
        return None
    rest = m.group(3)
    source = re.search(r"-c\s+(\S+)", rest) or re.search(r"-o\s+(\S+)", rest)
    return Event(Path(source.group(1)).name if source else "", int(m.group(1)), int(m.group(2)))


def converter_tensor(line: str) -> Event | None:
    """convert_hf_to_gguf's ``INFO:hf-to-gguf:blk.0.attn_norm.weight, torch.float32 --> F32``:
    one more tensor written."""
    m = re.search(r"hf-to-gguf:([^,\s]+),.*-->", line)
    return Event(m.group(1), count=True) if m else None


@contextlib.contextmanager
def follow_log(log: Path, progress: Progress, parse: Callable[[str], Event | None],
               *, poll_s: float = 0.5) -> Iterator[None]:
    """While the body runs, read ``log`` as it grows and report each line ``parse`` understands."""
    stop = threading.Event()

    def watch() -> None:
        count = 0
        position = 0
        while True:
            finished = stop.is_set()
            with contextlib.suppress(OSError):
                with open(log, "rb") as fh:
                    fh.seek(position)
                    chunk = fh.read()
                cut = chunk.rfind(b"\n") + 1
                position += cut
                for raw in chunk[:cut].splitlines():
                    event = parse(raw.decode(errors="replace"))
                    if event is None:
                        continue
                    count += event.count
                    progress.update(completed=count if event.count else event.done,
                                    total=event.total, status=event.status)
            if finished:
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=watch, name=f"progress:{log.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
