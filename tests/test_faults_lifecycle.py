"""Clean faults, piece by piece: SIGTERM unwinds the harness, workers die with it, their folders go.

None of these needs llama.cpp: the worker child serves its ``_sleep`` test hook without loading
the library.  The end-to-end check (SIGTERM at five moments of a real llama.cpp run) is
``tests/test_faults_sigterm.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness.core import lifecycle
from harness.core.lifecycle import Terminated
from harness.llamacpp.client import WORKDIR_PREFIX, WorkerClient
from tests.proc_tools import is_dead, wait_dead

ROOT = Path(__file__).resolve().parent.parent


def _signal_me_soon(signum: int, after: float = 0.3) -> threading.Timer:
    timer = threading.Timer(after, os.kill, (os.getpid(), signum))
    timer.start()
    return timer


def test_sigterm_inside_termination_handling_raises_terminated_with_exit_code_143() -> None:
    with pytest.raises(Terminated) as info, lifecycle.termination_handling():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert info.value.exit_code == 143
    assert str(info.value) == "terminated by SIGTERM"


def test_sigint_inside_termination_handling_raises_terminated_with_exit_code_130() -> None:
    with pytest.raises(Terminated) as info, lifecycle.termination_handling():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert info.value.exit_code == 130


def test_terminated_is_not_swallowed_by_except_exception() -> None:
    """Port-isolation code catches Exception; the harness's own termination must pass through."""
    with pytest.raises(Terminated), lifecycle.termination_handling():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception:  # the point of the test: it must not catch Terminated
            pytest.fail("Terminated was caught as an Exception")


def test_the_previous_handlers_are_restored_after_the_block() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with lifecycle.termination_handling():
        assert signal.getsignal(signal.SIGTERM) is not before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_second_signal_during_the_cleanup_does_not_interrupt_it() -> None:
    cleaned = False
    with lifecycle.termination_handling():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here and must not raise again
            cleaned = True
    assert cleaned


def test_stage_pauses_once_and_only_at_the_named_stage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(lifecycle.PAUSE_ENV, "comparing")
    monkeypatch.setenv(lifecycle.PAUSE_SECONDS_ENV, "0")
    monkeypatch.setattr(lifecycle, "_paused", set())
    lifecycle.stage("loading")
    assert capsys.readouterr().err == ""
    lifecycle.stage("comparing")
    assert capsys.readouterr().err == f"{lifecycle.PAUSE_MARKER} comparing (pid {os.getpid()})\n"
    lifecycle.stage("comparing")
    assert capsys.readouterr().err == ""


def test_a_worker_interrupted_mid_request_is_killed_at_once_and_its_folder_removed() -> None:
    """The child cannot read a polite close while it computes: no 10 s wait, a kill."""
    timer = _signal_me_soon(signal.SIGTERM)
    t0 = time.monotonic()
    with (
        pytest.raises(Terminated),
        lifecycle.termination_handling(),
        WorkerClient(timeout=60) as worker,
    ):
        proc, workdir = worker._proc, worker._workdir
        worker.request({"op": "_sleep", "seconds": 600}, doing="sleeping")
    timer.join()
    assert time.monotonic() - t0 < 5
    assert proc.returncode == -signal.SIGKILL
    assert not workdir.exists()


def test_release_children_stops_a_worker_that_nothing_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lifecycle, "_children", [])  # other modules' workers are not ours
    worker = WorkerClient(timeout=60)
    proc, workdir = worker._proc, worker._workdir
    lifecycle.release_children()
    assert proc.returncode is not None
    assert not workdir.exists()
    worker.close()  # closing again afterwards is harmless


def _run_py(code: str, tmp: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, text=True, **kw)


def test_a_worker_dies_with_its_harness_even_when_the_harness_is_sigkilled(
    tmp_path: Path,
) -> None:
    """Before: the child blocked in a request kept running under init after its parent died."""
    code = (
        "from harness.llamacpp.client import WorkerClient\n"
        "w = WorkerClient(timeout=600)\n"
        "w.request({'op': '_sleep', 'seconds': 0}, doing='starting')\n"
        "print(w._proc.pid, flush=True)\n"
        "w.request({'op': '_sleep', 'seconds': 600}, doing='sleeping')\n"
    )
    harness = _run_py(code, tmp_path, stdout=subprocess.PIPE)
    assert harness.stdout is not None
    child = int(harness.stdout.readline())
    assert not is_dead(child)
    harness.kill()
    harness.wait()
    try:
        assert wait_dead(child, timeout=10), f"worker {child} outlived its SIGKILLed harness"
    finally:
        if not is_dead(child):
            os.kill(child, signal.SIGKILL)


def test_the_next_worker_sweeps_the_folder_of_a_harness_killed_outright(tmp_path: Path) -> None:
    killed = _run_py(
        "import os\nfrom harness.core import lifecycle\n"
        f"lifecycle.owned_tempdir({WORKDIR_PREFIX!r})\nos._exit(0)\n",
        tmp_path,
    )
    assert killed.wait() == 0
    (left,) = tmp_path.glob(f"{WORKDIR_PREFIX}*")
    old_tempdir = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        with WorkerClient(timeout=60) as live:
            assert not left.exists()
            assert live._workdir.exists()  # the sweep spares a folder whose owner is alive
            assert lifecycle.sweep_orphaned_tempdirs(WORKDIR_PREFIX) == []
    finally:
        tempfile.tempdir = old_tempdir
    assert list(tmp_path.iterdir()) == []


def test_a_worker_survives_a_terminal_ctrl_c_meant_for_its_harness() -> None:
    """Ctrl-C reaches the whole process group; the parent decides, the child must not die first
    and look like a crashed port."""
    with WorkerClient(timeout=60) as worker:
        worker.request({"op": "_sleep", "seconds": 0.5}, doing="starting")
        worker._proc.send_signal(signal.SIGINT)
        assert worker.request({"op": "_sleep", "seconds": 0}, doing="after ^C") == {"ok": True}


def test_an_interrupted_group_run_kills_the_grandchildren_too(tmp_path: Path) -> None:
    """A build's pip -> cmake -> compiler chain: killing pip alone would orphan the rest."""
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n"
    )
    timer = threading.Thread(target=_signal_once_written, args=(pid_file,))
    timer.start()
    with pytest.raises(Terminated), lifecycle.termination_handling():
        lifecycle.run_as_group([sys.executable, "-c", code])
    timer.join()
    grandchild = int(pid_file.read_text())
    try:
        assert wait_dead(grandchild, timeout=5), f"grandchild {grandchild} outlived the run"
    finally:
        if not is_dead(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def _signal_once_written(path: Path, timeout: float = 30.0) -> None:
    """SIGTERM this process once ``path`` holds something (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (not path.is_file() or not path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
