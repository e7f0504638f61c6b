"""Parent side of the llama.cpp worker: every native failure becomes a ``PortFailure``.

The worker (:mod:`harness.llamacpp.worker`) runs llama.cpp in a child process.  A reply that
never comes (hang), a child that dies (SIGABRT from GGML_ASSERT, SIGSEGV) or a request the child
reports as failed is turned into :class:`harness.core.errors.PortFailure` naming what was being
done,
the signal or exit code, and the last lines of llama.cpp's log; the child is always reaped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.core import lifecycle
from harness.core.errors import InputError, PortFailure

_REPO_ROOT = Path(__file__).resolve().parents[2]
WORKDIR_PREFIX = "bailing-llamacpp-"  # in the system temp dir
STDERR_TAIL_LINES = 20
KEY_LINES = 8
_KEY_LINE = re.compile(r"GGML_ASSERT|GGML_ABORT|error|failed|Fatal|terminate called", re.IGNORECASE)


@dataclass(frozen=True)
class ContextParams:
    """Everything that changes llama.cpp's numbers; recorded with each result.

    Defaults favour parity over speed: f32 KV cache (the default f16 cache alone costs ~1e-4
    relative error), flash attention off, and one ubatch for the whole context so that a
    prefill is one graph.
    """

    n_ctx: int = 512
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f32"
    type_v: str = "f32"
    n_threads: int | None = None
    flash_attn: bool = False
    n_gpu_layers: int = 0
    load_mtp: bool = False
    check_tensors: bool = True
    # recurrent rollback planes: llama_memory_seq_rm may then undo up to n_rs_seq tokens of a
    # recurrent sequence (llama.cpp clamps it to 0 for architectures without snapshots)
    n_rs_seq: int = 0

    def record(self) -> dict[str, Any]:
        """The parameters as a plain dict for result metadata."""
        return asdict(self)


@dataclass
class FeedResult:
    """What one ``feed`` returned.

    ``tensors`` are keyed by llama.cpp names and shaped ``(ne3, ne2, ne1, ne0)`` (float32, or
    int32 for ids); ``logits`` is ``[T, n_vocab]`` from ``llama_get_logits_ith``;
    ``graph_names`` lists every node name the graph offered to the callback, in graph order.
    """

    tensors: dict[str, np.ndarray]
    logits: np.ndarray
    graph_names: list[str]
    n_past: int
    n_graphs: int = 1
    unreadable: dict[str, str] = field(default_factory=dict)  # wanted but of a quantised type


def squeeze_to(arr: np.ndarray, ndim: int) -> np.ndarray:
    """Drop leading size-1 axes of a 4-D ggml capture until ``ndim`` remain (token axis kept)."""
    lead = arr.ndim - ndim
    if lead < 0 or any(s != 1 for s in arr.shape[:lead]):
        raise ValueError(f"cannot squeeze shape {arr.shape} to {ndim} dims")
    return arr.reshape(arr.shape[lead:])


def _token_axis(parts: Sequence[np.ndarray], lengths: Sequence[int]) -> int:
    """The outermost axis whose size equals each graph's token count (ggml puts tokens last)."""
    for ax in range(parts[0].ndim):
        if all(p.shape[ax] == n for p, n in zip(parts, lengths, strict=True)):
            return ax
    raise ValueError(f"no token axis in shapes {[p.shape for p in parts]} for lengths {lengths}")


def _release(proc: subprocess.Popen | None, stderr: Any, lock_fd: int, workdir: Path) -> None:
    """Kill and reap the child if it still runs, close the pipes, remove the work dir (its npz
    files and log with it) and drop the folder's owner lock.  Safe during interpreter exit."""
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    stderr.close()
    shutil.rmtree(workdir, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(lock_fd)


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name} ({-rc})"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


class WorkerClient:
    """A running llama.cpp worker; use as a context manager so the child is always reaped."""

    def __init__(
        self,
        *,
        timeout: float = 300.0,
        load_timeout: float = 900.0,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        site: Path | None = None,
        backtrace: bool = False,
        label: str = "llama.cpp",
        module: str = "harness.llamacpp.worker",
    ) -> None:
        """Start the worker.

        ``site``: a dir from ``build.ensure_site`` to run that build instead of the installed
        one.  ``module``: the child's server module (same protocol; e.g. the MTP server).
        ``backtrace``: let ggml print a native backtrace on abort (it attaches gdb when
        present: slow, and hundreds of lines), off by default.
        """
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.label = label
        # The child's npz files and log live in this folder; it is removed with the child, and
        # a folder left by a harness killed outright is swept by the next one (its lock is free).
        self._workdir, lock_fd = lifecycle.owned_tempdir(WORKDIR_PREFIX)
        self._stderr_path = self._workdir / "worker.stderr"
        self._stderr = self._stderr_path.open("wb")
        child_env = lifecycle.child_env(dict(os.environ if env is None else env))
        child_env["PYTHONPATH"] = os.pathsep.join(
            [*([str(site)] if site else []), str(_REPO_ROOT)]
            + [p for p in [child_env.get("PYTHONPATH")] if p]
        )
        child_env.setdefault("PYTHONFAULTHANDLER", "1")  # Python-level tracebacks on SIGSEGV
        if not backtrace:
            child_env.setdefault("GGML_NO_BACKTRACE", "1")
        try:
            self._proc = subprocess.Popen(
                [python, "-m", module, str(self._workdir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=child_env,
                cwd=str(self._workdir),
            )
        except BaseException:
            _release(None, self._stderr, lock_fd, self._workdir)
            raise
        # Runs once: from close(), when the client is collected, or at interpreter exit.
        self._finalizer = weakref.finalize(
            self, _release, self._proc, self._stderr, lock_fd, self._workdir
        )
        lifecycle.track_child(self._finalizer)
        self._busy = False  # a request is in flight: the child cannot answer a polite close
        self._buf = b""
        self.info: dict[str, Any] = {}
        self.params: ContextParams | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ask an idle child to exit, kill it otherwise, reap it and remove the temp dir.

        A child interrupted mid-request (the harness is terminating, or the request raised)
        is still computing and would not read a close before it finishes: it is killed.
        """
        proc = self._proc
        if proc.poll() is None and not self._busy and self._finalizer.alive:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "close"}\n')
                proc.stdin.flush()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _stderr_lines(self) -> list[str]:
        try:
            self._stderr.flush()
            return self._stderr_path.read_bytes().decode(errors="replace").splitlines()
        except (OSError, ValueError):  # ValueError: closed, the worker is released
            return []

    def stderr_tail(self, n: int = STDERR_TAIL_LINES) -> str:
        """The last ``n`` lines of the worker's stderr (llama.cpp's log, GGML_ASSERT text)."""
        return "\n".join(self._stderr_lines()[-n:])

    def _failure(self, doing: str, what: str) -> PortFailure:
        """PortFailure text: what happened, the log's key lines (assert/error) and its tail.

        Key lines are pulled from the whole log because a backtrace or faulthandler dump can
        push the GGML_ASSERT line out of the tail.
        """
        lines = self._stderr_lines()
        tail = lines[-STDERR_TAIL_LINES:]
        key = [ln for ln in lines[:-STDERR_TAIL_LINES] if _KEY_LINE.search(ln)][-KEY_LINES:]
        msg = f"{self.label} worker {what} while {doing}"
        if key:
            msg += "\n--- key lines of its stderr ---\n" + "\n".join(key)
        if tail:
            msg += f"\n--- last {len(tail)} lines of its stderr ---\n" + "\n".join(tail)
        return PortFailure(msg)

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def request(
        self, req: dict[str, Any], *, doing: str, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request and wait for its reply; PortFailure on crash, hang or error reply."""
        if not self.alive:
            raise self._failure(doing, f"is not running ({_describe_exit(self._proc.returncode)})")
        self._busy = True
        reply = self._exchange(req, doing=doing, timeout=timeout)
        self._busy = False
        if not reply.get("ok"):
            kind, err = reply.get("kind", "error"), reply.get("error", "")
            if kind == "input":
                raise InputError(err)
            raise self._failure(doing, f"reported a {kind} error: {err}")
        return reply

    def _exchange(self, req: dict[str, Any], *, doing: str, timeout: float | None) -> dict:
        """Write one request line and read one reply line (PortFailure if the child dies or
        hangs).  Any exception leaves ``_busy`` set: the child's answer is still owed."""
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write((json.dumps(req) + "\n").encode())
            proc.stdin.flush()
        except BrokenPipeError:
            proc.wait()
            raise self._failure(doing, _describe_exit(proc.returncode)) from None
        if req.get("op") == "feed":
            lifecycle.stage("capturing")
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise self._failure(doing, f"hung (no reply within {limit:g} s; killed)")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                proc.wait()
                raise self._failure(doing, _describe_exit(proc.returncode))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    # --- API --------------------------------------------------------------------------------
    def load(self, gguf: Path, params: ContextParams | None = None) -> dict[str, Any]:
        """Load a GGUF into the worker; returns model facts (arch, n_layer, n_vocab, ...)."""
        params = params or ContextParams()
        gguf = Path(gguf)
        if not gguf.is_file():
            raise InputError(f"GGUF file not found: {gguf}")
        reply = self.request(
            {"op": "load", "model": str(gguf.resolve()), "params": params.record()},
            doing=f"loading {gguf.name}",
            timeout=self.load_timeout,
        )
        reply.pop("ok")
        reply["n_past"] = 0
        self.info, self.params = reply, params
        return reply

    def feed(
        self, tokens: Sequence[int], wanted: Collection[str] = (), *, timeout: float | None = None
    ) -> FeedResult:
        """Decode ``tokens`` after everything fed so far; capture the ``wanted`` tensor names."""
        tokens = [int(t) for t in tokens]
        reply = self.request(
            {"op": "feed", "tokens": tokens, "wanted": sorted(wanted)},
            doing=f"decoding {len(tokens)} token(s) at position {self.info.get('n_past', '?')}",
            timeout=timeout,
        )
        path = Path(reply["npz"])
        try:
            with np.load(path) as npz:
                logits = npz["logits"]
                parts = {name: [npz[k] for k in keys] for name, keys in reply["keys"].items()}
        finally:
            path.unlink(missing_ok=True)
        self.info["n_past"] = reply["n_past"]
        n_ub = int(self.info.get("n_ubatch") or len(tokens))
        lengths = [len(tokens[i : i + n_ub]) for i in range(0, len(tokens), n_ub)]
        tensors: dict[str, np.ndarray] = {}
        for name, arrs in parts.items():
            if len(arrs) == 1:
                tensors[name] = arrs[0]
            elif len(arrs) == len(lengths):
                tensors[name] = np.concatenate(arrs, axis=_token_axis(arrs, lengths))
            # else: a name present in only some graphs is dropped rather than mis-stacked
        return FeedResult(
            tensors=tensors,
            logits=logits,
            graph_names=reply["graph_names"],
            n_past=reply["n_past"],
            n_graphs=reply["n_graphs"],
            unreadable=reply.get("unreadable", {}),
        )

    def reset(self) -> None:
        """Start a new sequence: KV cache and recurrent state cleared."""
        self.request({"op": "reset"}, doing="resetting the sequence")
        self.info["n_past"] = 0
