"""ABI check of a user's own libllama before the worker drives it with llama-cpp-python's structs.

llama-cpp-python mirrors ``llama_context_params`` / ``llama_model_params`` of ONE llama.cpp commit
in ctypes.  A libllama from another commit (``LLAMA_CPP_LIB_PATH`` or the backend option
``lib_path``) may lay these structs out differently, and then every field the worker sets lands in
the wrong place: silent garbage or a crash far from the cause.  So before loading, a child process
(``python -m harness.llamacpp.abi``) imports llama_cpp against that library and round-trips
``llama_context_default_params()`` and ``llama_model_default_params()``:

- fields: read through the ctypes struct and compared with the same probe of the vendored library
  (a field out of place reads as a wrong default);
- size: the function is called with a return buffer far larger than any real struct (safe on
  every ABI: both are returned through a hidden pointer), and on x86-64 additionally with a
  sentinel-filled buffer passed as that hidden pointer (rdi on SysV, rcx on Win64), so the bytes
  the library actually writes are measured and compared with ``ctypes.sizeof``.

A crash during the probe (a truly foreign library) kills only the child; every outcome other than
"compatible" is an :class:`~harness.core.errors.InputError` saying why.  (The probe runs in its own
child rather than as a worker op because it must happen before a worker trusts the library.)
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.errors import InputError

_REPO_ROOT = Path(__file__).resolve().parents[2]
STRUCTS = {
    "llama_context_params": "llama_context_default_params",
    "llama_model_params": "llama_model_default_params",
}
PROBE_BYTES = 4096
PROBE_TIMEOUT = 120.0
_SENTINELS = (0xA5, 0x5A)


@dataclass(frozen=True)
class AbiProbe:
    """What one library returned: per struct, ctypes size, bytes written (or None), fields."""

    library: str
    llama_cpp_version: str
    structs: dict[str, dict[str, Any]]


# --- child side ---------------------------------------------------------------------------------
def _scalar(v: Any) -> Any:
    """A field value comparable across processes: numbers as is, pointers as null/non-null."""
    if isinstance(v, bool | int | float) or v is None:
        return v if v is not None else "null"
    return "non-null" if bool(ctypes.cast(v, ctypes.c_void_p).value) else "null"


def _written_extent(lib: ctypes.CDLL, fname: str) -> int | None:
    """Bytes the function writes into its hidden return pointer (x86-64 only, else None)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    extent = 0
    for s in _SENTINELS:
        buf = (ctypes.c_uint8 * PROBE_BYTES)(*([s] * PROBE_BYTES))
        fn = lib[fname]  # a fresh function object: llama_cpp's own binding stays untouched
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_void_p
        fn(ctypes.addressof(buf))
        last = max((i for i in range(PROBE_BYTES) if buf[i] != s), default=-1)
        extent = max(extent, last + 1)
    return extent


def probe_here() -> AbiProbe:
    """Import llama_cpp (honouring LLAMA_CPP_LIB_PATH) and probe both default-params structs."""
    import llama_cpp
    import llama_cpp.llama_cpp as raw

    lib: ctypes.CDLL = raw._lib

    class Big(ctypes.Structure):
        _fields_ = [("b", ctypes.c_uint8 * PROBE_BYTES)]

    structs: dict[str, dict[str, Any]] = {}
    for sname, fname in STRUCTS.items():
        cls = getattr(llama_cpp, sname)
        size = ctypes.sizeof(cls)
        fn = lib[fname]
        fn.argtypes = []
        fn.restype = Big
        raw_bytes = bytes(fn().b)
        value = cls.from_buffer_copy(raw_bytes[:size])
        structs[sname] = {
            "sizeof": size,
            "align": ctypes.alignment(cls),
            "extent": _written_extent(lib, fname),
            "fields": {f[0]: _scalar(getattr(value, f[0])) for f in cls._fields_},
        }
    return AbiProbe(str(getattr(lib, "_name", "?")), llama_cpp.__version__, structs)


def _child_main() -> int:
    try:
        p = probe_here()
        print(json.dumps({"ok": True, "library": p.library, "version": p.llama_cpp_version,
                          "structs": p.structs}))
    except Exception as e:  # import failure (missing symbol, wrong file): reported, not raised
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
    return 0


# --- parent side --------------------------------------------------------------------------------
def run_probe(lib_dir: Path | None, *, site: Path | None = None) -> AbiProbe:
    """Probe in a child: ``lib_dir`` as LLAMA_CPP_LIB_PATH (None: llama_cpp's own library)."""
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if lib_dir is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    env["PYTHONPATH"] = os.pathsep.join(
        [*([str(site)] if site else []), str(_REPO_ROOT)]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    env.setdefault("GGML_NO_BACKTRACE", "1")
    where = f"libllama in {lib_dir}" if lib_dir else "the vendored libllama"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "harness.llamacpp.abi"],
            env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise InputError(f"{where}: the ABI probe hung (> {PROBE_TIMEOUT:g} s); refused") from None
    tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
    if proc.returncode != 0:
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        raise InputError(
            f"{where} crashed the ABI probe ({how}) while llama-cpp-python read its default "
            f"params: it is not a build this llama-cpp-python can drive; refused."
            + (f"\n{tail}" if tail else "")
        )
    try:
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise InputError(f"{where}: the ABI probe gave no answer; refused\n{tail}") from None
    if not reply["ok"]:
        raise InputError(
            f"{where}: llama-cpp-python cannot bind this library ({reply['error']}); refused"
        )
    return AbiProbe(reply["library"], reply["version"], reply["structs"])


@functools.lru_cache(maxsize=4)
def vendored_probe(site: Path | None = None) -> AbiProbe:
    """The reference probe: llama-cpp-python with the library it was built with."""
    return run_probe(None, site=site)


def compare(reference: AbiProbe, candidate: AbiProbe) -> list[str]:
    """Every difference that makes the candidate library unsafe to drive (empty: compatible)."""
    problems = []
    for sname, ref in reference.structs.items():
        got = candidate.structs.get(sname)
        if got is None:
            problems.append(f"{sname}: not probed")
            continue
        extent, size, align = got["extent"], got["sizeof"], got["align"]
        if extent is not None and not size - align < extent <= size:
            problems.append(
                f"{sname}: the library writes {extent} bytes, llama-cpp-python's ctypes struct "
                f"has {size}"
            )
        diffs = [
            f"{f}={got['fields'].get(f)!r} (expected {v!r})"
            for f, v in ref["fields"].items()
            if got["fields"].get(f) != v
        ]
        if diffs:
            problems.append(f"{sname} defaults read back wrong: " + ", ".join(diffs[:8]))
    return problems


def check_library(lib_dir: Path | str, *, site: Path | None = None) -> AbiProbe:
    """Probe ``lib_dir``'s libllama; InputError unless it matches the vendored ABI."""
    lib_dir = Path(lib_dir).expanduser().resolve()
    if not lib_dir.is_dir():
        raise InputError(f"LLAMA_CPP_LIB_PATH / lib_path {lib_dir}: not a directory")
    candidate = run_probe(lib_dir, site=site)
    problems = compare(vendored_probe(site), candidate)
    if problems:
        raise InputError(
            f"libllama in {lib_dir} is not ABI-compatible with llama-cpp-python "
            f"{candidate.llama_cpp_version} (its ctypes structs mirror the vendored llama.cpp); "
            "refused instead of crashing:\n  " + "\n  ".join(problems)
            + "\nBuild that llama.cpp as a patch series instead: python -m harness.llamacpp.build "
            "--patch FILE.patch"
        )
    return candidate


if __name__ == "__main__":
    raise SystemExit(_child_main())
