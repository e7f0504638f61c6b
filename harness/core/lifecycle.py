"""Clean faults: a terminated harness unwinds like an exception and leaves nothing behind.

By default SIGTERM ends a Python process on the spot: no ``finally`` runs, so a llama.cpp worker
or the GGUF converter is orphaned (it keeps running under init) and its temporary files stay.
:func:`termination_handling` turns SIGTERM and SIGINT into :class:`Terminated`, a
``BaseException`` (so the ``except Exception`` that isolates a port's failures cannot swallow
it): every ``finally`` and context manager then runs, children are killed and reaped, temporary
folders and half-written outputs removed, and the CLI exits with ``128 + signal``.

Children must not outlive the harness even when it is killed outright (SIGKILL, OOM killer):
a worker calls :func:`die_with_parent` first thing (Linux ``PR_SET_PDEATHSIG``), and the worker
folders of a dead harness are swept by the next run (:func:`owned_tempdir`,
:func:`sweep_orphaned_tempdirs`).

Fault injection for the tests: ``BAILING_PARITY_PAUSE_AT=<stage>`` makes :func:`stage` print
``bailing-parity: paused at <stage> (pid N)`` to stderr and sleep (at most
``BAILING_PARITY_PAUSE_SECONDS``, default 600), once per process, so that a test can send a
signal at that exact moment.  Stages: ``loading`` (a backend loads a model), ``capturing`` (a
llama.cpp worker is alive and computing a feed), ``comparing`` (before a pair is compared),
``writing-report`` (tables written, HTML not yet).  The converter's moment needs no hook: the
test runs a converter that pauses itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PAUSE_ENV = "BAILING_PARITY_PAUSE_AT"
PAUSE_SECONDS_ENV = "BAILING_PARITY_PAUSE_SECONDS"
PAUSE_MARKER = "bailing-parity: paused at"
STAGES = ("loading", "capturing", "comparing", "writing-report")
PARENT_PID_ENV = "BAILING_PARITY_PARENT_PID"
_OWNER_FILE = ".owner"
_PR_SET_PDEATHSIG = 1

_terminating = False
_paused: set[str] = set()


class Terminated(BaseException):
    """The harness received SIGTERM or SIGINT; raised in the main thread to unwind everything."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a death by signal, so callers still see which one."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    """Raise once; a second signal during the cleanup is ignored so the cleanup can finish."""
    global _terminating
    if _terminating:
        return
    _terminating = True
    raise Terminated(signum)


@contextlib.contextmanager
def termination_handling() -> Iterator[None]:
    """SIGTERM/SIGINT raise :class:`Terminated` inside the block; the old handlers come back
    after it.  Only the main thread can install handlers; elsewhere this does nothing."""
    global _terminating
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in TERMINATION_SIGNALS}
    _terminating = False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _terminating = False


def stage(name: str) -> None:
    """A fault-injection point: pause here when ``BAILING_PARITY_PAUSE_AT`` names this stage."""
    if os.environ.get(PAUSE_ENV) != name or name in _paused:
        return
    _paused.add(name)
    print(f"{PAUSE_MARKER} {name} (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get(PAUSE_SECONDS_ENV, "600")))


# --- children -----------------------------------------------------------------------------------
_children: list[weakref.finalize] = []


def track_child(release: weakref.finalize) -> None:
    """Register the finalizer that kills a child and removes its files, for
    :func:`release_children`; it also runs at interpreter exit if nothing ran it before."""
    _children[:] = [f for f in _children if f.alive]
    _children.append(release)


def release_children() -> None:
    """Kill, reap and clean up every child still running: the harness is terminating, and a
    ``finally`` cannot reach a worker held by a model that nothing will close."""
    while _children:
        _children.pop()()


def child_env(env: dict[str, str]) -> dict[str, str]:
    """A child's environment naming this process as the parent it must not outlive."""
    return {**env, PARENT_PID_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """In a child: be killed when the parent dies, however it dies (Linux; elsewhere a no-op).

    The parent's pid comes from :func:`child_env`; if it is already gone (it died before the
    request took effect) the child exits at once.  Note that Linux signals the death of the
    parent *thread* that started the child: the harness starts workers from its main thread.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)


def run_as_group(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a command that starts its own children (pip -> cmake -> the
    compilers): it runs in a process group of its own, and the whole group is killed if the
    wait is interrupted (:class:`Terminated`, KeyboardInterrupt), not only its first process."""
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode)


def ignore_terminal_interrupts() -> None:
    """In a child: Ctrl-C reaches the whole process group, but only the parent decides; it
    kills the child while it cleans up, so the child must not die first and look like a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- temporary folders that outlive nothing ------------------------------------------------------
def owned_tempdir(prefix: str) -> tuple[Path, int]:
    """A new folder in the system temp dir and an open fd locking its owner file.

    The lock (``flock``, not inherited by children) is held until this process closes the fd
    or dies, so :func:`sweep_orphaned_tempdirs` can tell a folder whose owner was killed
    outright from one in use.  The owner file is locked before it appears under its name.
    """
    sweep_orphaned_tempdirs(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    staging = path / f"{_OWNER_FILE}.tmp"
    fd = os.open(staging, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, str(os.getpid()).encode())
    os.rename(staging, path / _OWNER_FILE)
    return path, fd


def sweep_orphaned_tempdirs(prefix: str) -> list[Path]:
    """Remove ``<tmp>/<prefix>*`` folders whose owner process is gone; returns what went."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            fd = os.open(path / _OWNER_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # not ours, or its owner is still creating it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: its owner is alive
            os.close(fd)
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        removed.append(path)
    return removed
