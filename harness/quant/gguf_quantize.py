"""Quantize a GGUF with llama.cpp's own quantizer, and name a GGUF's real quantization type.

A quantized port is judged against the weights it actually runs, so the quantization must be
llama.cpp's (its per-tensor type choices, fallbacks and rounding), not a re-implementation: it
runs through llama-cpp-python's ``llama_model_quantize`` in a child process, so that a crash or
abort of the quantizer becomes a :class:`PortFailure` instead of killing the harness.  The child
gets ``PYTHONPATH=<site>:<repo root>`` like the capture worker (:mod:`harness.llamacpp.client`):
a ``site`` from ``build.ensure_site(patches=ports.llamacpp.port.patches())`` is our patched
build, the only one that knows Ling-2.6's ``bailing_hybrid``.

Results are cached under ``build.cache_root() / "quant"`` by a content key (see
:func:`cache_key`), written atomically and built under a lock, so two pytest-xdist workers
asking for the same quantization run the quantizer once.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from harness.core import lifecycle
from harness.core.atomic import locked
from harness.core.cache import file_key
from harness.core.errors import InputError, PortFailure
from harness.llamacpp import build

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 3600.0
LOG_TAIL_LINES = 20
_EXIT_UNKNOWN_TYPE = 3  # the child's llama_cpp lacks the requested LLAMA_FTYPE_* constant


def file_types() -> dict[str, int]:
    """Quantization type name -> llama.cpp ``llama_ftype`` value (``LLAMA_FTYPE_MOSTLY_*``,
    plus ``F32`` for ``LLAMA_FTYPE_ALL_F32``), from gguf-py's mirror of ``llama.h``."""
    from gguf import LlamaFileType

    out: dict[str, int] = {}
    for member in LlamaFileType:
        if member.name.startswith("MOSTLY_"):
            out[member.name.removeprefix("MOSTLY_")] = int(member.value)
        elif member.name.startswith("ALL_"):
            out[member.name.removeprefix("ALL_")] = int(member.value)
    return out


def normalize_qtype(qtype: str) -> str:
    """The canonical (upper-case) type name, or InputError listing the known ones."""
    name = str(qtype).strip().upper()
    known = file_types()
    if name not in known:
        raise InputError(
            f"unknown quantization type {qtype!r}; known: {', '.join(sorted(known))}"
        )
    return name


def gguf_file_type(path: Path | str) -> str:
    """The GGUF's type as llama.cpp names it (``Q4_K_M``, ``IQ4_NL``, ``F32`` ...).

    ``general.file_type`` says what the quantizer was asked for (a mix like Q4_K_M is no single
    tensor type); a GGUF without it is named by its most common tensor type.
    """
    from gguf import GGUFReader, LlamaFileType

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # truncated, or not a GGUF at all
        raise InputError(f"{path}: not a readable GGUF ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.file_type")
    if field is not None:
        with contextlib.suppress(ValueError, TypeError):
            name = LlamaFileType(int(field.contents())).name
            if name != "GUESSED":
                return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    if not counts:
        raise InputError(f"{path}: a GGUF without tensors has no quantization type")
    return counts.most_common(1)[0][0]


def _site_version(site: Path | None) -> str:
    """The llama-cpp-python version (and build key) the child would import."""
    if site is None:
        try:
            from importlib.metadata import version

            return f"installed-{version('llama_cpp_python')}"
        except Exception:
            return "installed-unknown"
    init = Path(site) / "llama_cpp" / "__init__.py"
    text = init.read_text() if init.is_file() else ""
    found = next((ln.split("=", 1)[1].strip().strip("\"'") for ln in text.splitlines()
                  if ln.startswith("__version__")), "unknown")
    return f"{found}-{Path(site).name}"  # the site dir is named by its build key (patches)


def cache_key(src: Path, qtype: str, site: Path | None) -> str:
    """Content key: the source's size, mtime and first and last MiB (harness.core.cache), the
    type and the llama-cpp-python version (with the site's build key) that quantizes."""
    return file_key(src, qtype, _site_version(site))


def cache_dir() -> Path:
    """Where quantized GGUFs are kept (next to the llama.cpp builds, outside the repo)."""
    return build.cache_root() / "quant"


# Runs in the child: our patched llama_cpp first on sys.path (PYTHONPATH), nothing else.
_DRIVER = r"""
import ctypes, sys
from harness.core import lifecycle
lifecycle.die_with_parent()
lifecycle.ignore_terminal_interrupts()
import llama_cpp
src, dst, name, value = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
const = "LLAMA_FTYPE_" + ("ALL_" if name == "F32" else "MOSTLY_") + name
if getattr(llama_cpp, const, None) != value:
    print(f"llama_cpp {llama_cpp.__version__} has no {const} = {value}", file=sys.stderr)
    sys.exit(3)
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = value
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
print(f"llama_model_quantize returned {rc}", file=sys.stderr)
sys.exit(0 if rc == 0 else 1)
"""


def _describe_exit(rc: int) -> str:
    if rc < 0:
        return f"killed by signal {-rc}"
    return f"exited with code {rc}"


def _run_quantizer(
    src: Path, dst: Path, qtype: str, site: Path | None, timeout: float
) -> None:
    """One quantizer run in a child; every failure is a PortFailure naming type and file."""
    env = lifecycle.child_env(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(
        [*([str(site)] if site else []), str(_REPO_ROOT)]
        + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.setdefault("PYTHONFAULTHANDLER", "1")
    env.setdefault("GGML_NO_BACKTRACE", "1")
    cmd = [sys.executable, "-c", _DRIVER, str(src), str(dst), qtype, str(file_types()[qtype])]
    doing = f"llama.cpp quantizing {src} to {qtype}"
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PortFailure(f"{doing}: no result after {timeout:.0f} s (killed)") from None
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-LOG_TAIL_LINES:])
    if proc.returncode == _EXIT_UNKNOWN_TYPE:
        raise InputError(f"{doing}: this llama.cpp build lacks the type:\n{tail}")
    if proc.returncode != 0:
        raise PortFailure(f"{doing}: {_describe_exit(proc.returncode)}:\n{tail}")
    if not dst.is_file() or dst.stat().st_size == 0:
        raise PortFailure(f"{doing}: the quantizer reported success but wrote nothing:\n{tail}")


def quantize(
    src_gguf: Path | str,
    qtype: str,
    *,
    site: Path | None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """``src_gguf`` (f32/f16) quantized to ``qtype`` by llama.cpp, cached; returns the path.

    ``site`` is the llama_cpp build to quantize with (None: the installed one, which knows only
    upstream architectures).  Unknown type or unreadable source: InputError; a quantizer that
    fails, crashes or aborts: PortFailure naming the type and the file.
    """
    name = normalize_qtype(qtype)
    src = Path(src_gguf).expanduser().resolve()
    if not src.is_file():
        raise InputError(f"{src}: no such GGUF to quantize")
    out = cache_dir() / f"{src.stem}-{name}-{cache_key(src, name, site)}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out.with_name(f".{out.name}.lock")):
        if out.is_file():  # another process quantized it while we waited
            return out
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            tmp.unlink()  # the quantizer creates the file itself
            _run_quantizer(src, tmp, name, site, timeout)
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return out
