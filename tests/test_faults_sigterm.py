"""SIGTERM at five moments of a llama.cpp parity run leaves nothing behind, and the next run works.

For each moment (loading, converting, capturing, comparing, writing the report) the CLI runs in
its own session with ``BAILING_PARITY_PAUSE_AT`` set (:func:`harness.core.lifecycle.stage`), gets
SIGTERM when it says it paused, and must then: exit 143; leave no process of its session (the
capture worker, the converter); leave nothing in its private TMPDIR (``bailing-llamacpp-*``
folders, ``feed-*.npz``); leave no temporary GGUF in the conversion cache; leave no ``--out``
folder (the report is published whole or not at all); and a second run with the same ``--out``
passes.  Before the fix the worker and the converter were orphaned, their files stayed, and the
exit status was -15.

The converter's moment is a converter that pauses itself: every run here converts with
``llamacpp:tree=<pausing tree>``, the port's own converter (its ``conversion/`` and ``gguf-py``
linked in) wrapped so that, under ``BAILING_PARITY_PAUSE_AT=converting``, it pauses after
writing the whole GGUF into the cache's temporary folder.  Sharing that tree shares the
converted GGUF across the scenarios, so only the first run converts.

Needs the harness's llama-cpp-python build with our Ling-2.6 port (``python -m
harness.llamacpp.build --with-our-port --install``); skips without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.core.lifecycle import PAUSE_ENV, PAUSE_MARKER
from harness.llamacpp.client import WORKDIR_PREFIX
from tests.llamacpp_testing import require_llamacpp
from tests.proc_tools import session_members
from tests.upstream_writer import write_upstream_checkpoint

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("loading", "converting", "capturing", "comparing", "writing-report")
MARKER_ENV = "FAKE_CONVERTER_MARKER"
WAIT_S = 150.0
# Third-party caches created on import (torch's inductor), not temporary files of the harness.
FOREIGN_TMP = ("torchinductor_",)

PAUSING_CONVERTER = '''"""The port's converter; pauses once the GGUF is written (faults)."""
import os
import runpy
import time
from pathlib import Path

_REAL = runpy.run_path({real!r}, run_name="bailing_parity_convert")
globals().update({{k: v for k, v in _REAL.items() if not k.startswith("__")}})


def main():
    _REAL["main"]()
    if os.environ.get("BAILING_PARITY_PAUSE_AT") == "converting":
        Path(os.environ["{marker_env}"]).write_text(str(os.getpid()))
        time.sleep(600)
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_upstream_checkpoint(tmp_path_factory.mktemp("faults") / "ling26")


@pytest.fixture(scope="module")
def pausing_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_llamacpp()
    from harness.llamacpp.convert import default_tree

    real = default_tree()
    tree = tmp_path_factory.mktemp("pausing-tree")
    for part in ("conversion", "gguf-py"):
        if (real / part).exists():
            (tree / part).symlink_to(real / part)
    (tree / "convert_hf_to_gguf.py").write_text(
        PAUSING_CONVERTER.format(real=str(real / "convert_hf_to_gguf.py"), marker_env=MARKER_ENV)
    )
    return tree


def _private_cache(root: Path) -> Path:
    """A conversion cache (``BAILING_PARITY_CACHE``) of its own, linking the shared sdist so
    that nothing is downloaded; every GGUF the runs write lands here."""
    from harness.llamacpp.build import cache_root

    (root / "llamacpp").mkdir(parents=True)
    for name in ("sdist", "src"):
        if (cache_root() / name).exists():
            (root / "llamacpp" / name).symlink_to(cache_root() / name)
    return root


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _private_cache(tmp_path_factory.mktemp("cache"))


class Run:
    """One harness process in its own session, its stderr collected by a thread."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, start_new_session=True, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_until(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill_session()
                pytest.fail(f"the run never reached {what} (exit {self.proc.returncode}):\n"
                            f"{self.stderr[-3000:]}")
            time.sleep(0.1)

    def finish(self) -> int:
        rc = self.proc.wait(timeout=WAIT_S)
        self._reader.join(timeout=10)
        return rc

    def kill_session(self) -> None:
        """Test hygiene after a failure: whatever the fix did not stop is stopped here."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pid in session_members(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _command(checkpoint: Path, tree: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "harness", "parity", "--checkpoint", str(checkpoint),
            "--backends", f"llamacpp:tree={tree}", "--out", str(out)]


def _harness_leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if not p.name.startswith(FOREIGN_TMP))


def _temporary_ggufs(cache: Path) -> list[str]:
    """GGUFs, and hidden working folders, of the conversion cache that are not a finished entry
    (a finished entry is a visible folder holding ``conversion.json``)."""
    gguf_dir = cache / "llamacpp" / "gguf"
    if not gguf_dir.is_dir():
        return []
    bad = [p.name for p in gguf_dir.iterdir() if p.name.startswith(".") and p.is_dir()]
    bad += [str(g.relative_to(gguf_dir)) for g in gguf_dir.rglob("*.gguf")
            if g.parent.name.startswith(".") or not (g.parent / "conversion.json").is_file()]
    return bad


def _wait_for_moment(run: Run, stage: str, tmp: Path, cache: Path, marker: Path) -> None:
    """Until the run is paused at ``stage`` with the files that moment used to leave behind."""
    if stage == "converting":
        run.wait_until("the converter's pause", marker.is_file)
        assert _temporary_ggufs(cache), "the converter paused without a GGUF in the cache"
        return
    run.wait_until(f"the {stage} pause", lambda: f"{PAUSE_MARKER} {stage}" in run.stderr)
    if stage == "capturing":  # the worker has written its capture file into the temp dir
        run.wait_until("a feed file", lambda: any(tmp.glob(f"{WORKDIR_PREFIX}*/feed-*.npz")))


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigterm_leaves_no_orphan_no_temporary_file_no_report_and_the_next_run_passes(
    stage: str, checkpoint: Path, pausing_tree: Path, shared_cache: Path, tmp_path: Path
) -> None:
    tmp, out, marker = tmp_path / "tmp", tmp_path / "run", tmp_path / "converter-paused"
    tmp.mkdir()
    # the converter runs only where nothing is cached yet
    cache = _private_cache(tmp_path / "cache") if stage == "converting" else shared_cache
    env = dict(os.environ, TMPDIR=str(tmp), BAILING_PARITY_CACHE=str(cache),
               **{MARKER_ENV: str(marker)})
    env.pop(PAUSE_ENV, None)
    run = Run(_command(checkpoint, pausing_tree, out), {**env, PAUSE_ENV: stage})
    try:
        _wait_for_moment(run, stage, tmp, cache, marker)
        os.kill(run.proc.pid, signal.SIGTERM)
        rc = run.finish()
        orphans = session_members(run.proc.pid)
    finally:
        run.kill_session()
    assert rc == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert "terminated by SIGTERM" in run.stderr
    assert orphans == {}
    assert _harness_leftovers(tmp) == []
    assert _temporary_ggufs(cache) == []
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")] == []

    again = Run(_command(checkpoint, pausing_tree, out), env)
    try:
        rc = again.finish()
    finally:
        again.kill_session()
    assert rc == 0, again.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["passed"] is True
    assert _harness_leftovers(tmp) == []
