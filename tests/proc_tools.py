"""Process facts from ``/proc`` (Linux), for the fault tests: is a process gone, who is left in a
session.  psutil would do it too, but it is not a dependency of the harness."""

from __future__ import annotations

import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # field 3 (state) onwards


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its reaper."""
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def wait_dead(pid: int, timeout: float) -> bool:
    """Whether ``pid`` is dead within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not is_dead(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def session_members(sid: int) -> dict[int, str]:
    """Live processes of session ``sid`` (pid -> command line): a process started with
    ``start_new_session=True`` and every descendant that did not leave its session."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        # after "(comm) ": state ppid pgrp session ...
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                cmd = "?"
            found[int(entry.name)] = cmd
    return found
