"""Build llama-cpp-python from its sdist, optionally patched, once per (version, patches, flags).

The sdist vendors the exact llama.cpp commit its ctypes structs mirror, so the harness builds
from it rather than from an arbitrary llama.cpp checkout (an ABI mismatch in
``llama_context_params`` would corrupt memory silently).  Patches are applied onto
``vendor/llama.cpp`` so that a port under development (a patch series) is built the same way.

Layout under the cache root (:mod:`harness.core.cache`), subdir ``llamacpp/``::

    sdist/<ver>/llama_cpp_python-<ver>.tar.gz   the downloaded sdist
    src/<ver>/                                  pristine extracted tree (converter, gguf-py)
    work/<ver>-<flags hash>/src, build/         patched tree + persistent CMake build dir
    wheels/<key>/llama_cpp_python-*.whl         finished wheels, one per cache key

The work tree is synced file-by-file (only changed files are rewritten), so a different patch
series rebuilds only what it touches instead of the whole library (~7 min on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.core import cache, lifecycle
from harness.core.atomic import locked, staged_dir
from harness.core.progress import Event, Progress, follow_log, ninja_step

DEFAULT_VERSION = "0.3.36"
# What the harness never needs: mtmd (multimodal), llama.cpp's tests/tools/examples/server.
# Skipping them is the main saving on a 2-core machine; user flags come after and win.
BASE_CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
)
_BUILD_INFO = "bailing_parity_build.json"  # written next to the wheel and into site-packages


class BuildError(RuntimeError):
    """The sdist could not be fetched, patched or built; the message carries the log tail."""


def cache_root() -> Path:
    """The llama.cpp part of the one cache root (:func:`harness.core.cache.root`)."""
    return cache.root() / "llamacpp"


def missing_llamacpp() -> str | None:
    """Why llama.cpp cannot run here (None when it can), with how to install what is missing;
    imports nothing native."""
    for mod, how in (
        ("llama_cpp", "python -m harness.llamacpp.build --install"),
        ("gguf", "pip install gguf"),
    ):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not importable; install with: {how}"
    return None


def _run(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    what: str,
    watch: Callable[[str], Event | None] | None = None,
) -> None:
    """Run a command; on failure raise BuildError with the log tail (full log kept on disk).
    With ``watch`` and a log, the log is followed as it grows and shown as progress."""
    with (tempfile.TemporaryFile() if log is None else log.open("w+b") as fh,
          Progress(what) if watch else contextlib.nullcontext() as progress,
          follow_log(log, progress, watch) if watch and log else contextlib.nullcontext()):
        # its own process group: a SIGTERM of the harness stops pip, cmake and the compilers
        proc = lifecycle.run_as_group(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            fh.seek(0)
            tail = fh.read().decode(errors="replace").splitlines()[-40:]
            where = f" (full log: {log})" if log else ""
            raise BuildError(
                f"{what} failed with exit code {proc.returncode}{where}:\n" + "\n".join(tail)
            )


def _download_sdist(version: str) -> Path:
    """The sdist tarball, downloaded once with pip (no binary, no deps)."""
    dest = cache_root() / "sdist" / version
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            str(dest),
        ],
        what="pip download of the sdist",
    )
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise BuildError(f"pip download left no llama_cpp_python sdist in {dest}")
    return found[0]


def _extract(tarball: Path, into: Path) -> Path:
    """Extract the sdist into ``into`` (atomically via a sibling temp dir); return its root."""
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=into.parent))
    try:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="tar")
        (top,) = list(tmp.iterdir())
        if into.exists():
            shutil.rmtree(into)
        top.rename(into)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return into


def sdist_tree(version: str = DEFAULT_VERSION) -> Path:
    """The pristine extracted sdist; ``vendor/llama.cpp`` in it has the converter and gguf-py."""
    tree = cache_root() / "src" / version
    if not (tree / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        _extract(_download_sdist(version), tree)
    return tree


def _effective_cmake_args(cmake_args: str) -> str:
    return f"{BASE_CMAKE_ARGS} {cmake_args}".strip()


def cache_key(version: str, cmake_args: str = "", patches: Sequence[Path] = ()) -> str:
    """Hash of everything that changes the built library (patch bytes, not patch paths)."""
    h = hashlib.sha256()
    h.update(f"{version}\0{_effective_cmake_args(cmake_args)}\0{platform.machine()}\0".encode())
    for p in patches:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()[:16]


def _apply_patches(llama_dir: Path, patches: Sequence[Path]) -> None:
    """Apply each patch (git-style, paths relative to llama.cpp's root) in order."""
    # git apply inside some enclosing repository would apply relative to ITS root and silently
    # skip paths outside the cwd; the ceiling keeps git from discovering one.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(llama_dir.resolve().parent))
    for p in patches:
        p = Path(p).resolve()
        if shutil.which("git"):
            cmd = ["git", "apply", "--whitespace=nowarn", "-p1", str(p)]
        else:
            cmd = ["patch", "-p1", "--forward", "--batch", "-i", str(p)]
        _run(cmd, cwd=llama_dir, env=env, what=f"applying patch {p}")


def _sync_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` equal to ``src``, rewriting only files whose bytes differ.

    Unchanged files keep their mtimes, so ninja in the persistent build dir recompiles only
    what a patch touched (re-extracting would restore archive mtimes that ninja cannot see).
    """
    dst.mkdir(parents=True, exist_ok=True)
    src_names = set(os.listdir(src))
    for name in os.listdir(dst):
        if name not in src_names:
            target = dst / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
    for name in src_names:
        s, d = src / name, dst / name
        if s.is_dir() and not s.is_symlink():
            if d.exists() and not d.is_dir():
                d.unlink()
            _sync_tree(s, d)
        elif not d.is_file() or not filecmp.cmp(s, d, shallow=False):
            if d.is_dir():
                shutil.rmtree(d)
            shutil.copy2(s, d)
            os.utime(d)  # newer than any object built from the old content


def ensure_wheel(
    version: str = DEFAULT_VERSION, cmake_args: str = "", patches: Sequence[Path] = ()
) -> Path:
    """The cached wheel for (version, cmake_args, patches), building it first if needed.

    Builds are serialised by a lock file in the cache, so parallel test workers or nox
    sessions wait for one build instead of racing in the shared work tree.
    """
    key = cache_key(version, cmake_args, patches)
    wheel_dir = cache_root() / "wheels" / key
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[0]
    with locked(cache_root() / ".build.lock"):
        wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
        if wheels:  # another process built it while we waited
            return wheels[0]
        return _build(version, cmake_args, patches, key, wheel_dir)


# Stages of `pip wheel` before and after the compiler runs (ninja's [k/N] lines in between).
_BUILD_STAGES = (
    ("Installing build dependencies", "installing build dependencies"),
    ("-- Configuring", "cmake: configuring"),
    ("-- Generating", "cmake: generating"),
    ("Building wheel for", "compiling"),
    ("Created wheel for", "wheel created"),
)


def build_event(line: str) -> Event | None:
    """Progress from one line of the build log: the compile step (ninja) or the stage."""
    if step := ninja_step(line):
        return step
    for marker, status in _BUILD_STAGES:
        if marker in line:
            return Event(status)
    return None


def _build(
    version: str, cmake_args: str, patches: Sequence[Path], key: str, wheel_dir: Path
) -> Path:
    """Sync the patched tree into the persistent work dir and run ``pip wheel`` on it."""
    pristine = sdist_tree(version)
    flags = _effective_cmake_args(cmake_args)
    work = cache_root() / "work" / (f"{version}-{hashlib.sha256(flags.encode()).hexdigest()[:10]}")
    staging = Path(tempfile.mkdtemp(prefix=".stage-", dir=cache_root()))
    try:
        shutil.copytree(pristine, staging / "src", symlinks=True)
        _apply_patches(staging / "src" / "vendor" / "llama.cpp", patches)
        _sync_tree(staging / "src", work / "src")
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    out = Path(tempfile.mkdtemp(prefix=".wheel-", dir=cache_root()))
    env = dict(os.environ)
    env["CMAKE_ARGS"] = flags
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    log = work / "build.log"
    t0 = time.monotonic()
    try:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-v",  # compiler output in the log, so a failing patch shows its error
                "--no-deps",
                "-w",
                str(out),
                f"--config-settings=build-dir={work / 'build'}",
                str(work / "src"),
            ],
            env=env,
            log=log,
            what=f"building llama-cpp-python {version} (log: {log})",
            watch=build_event,
        )
        built = sorted(out.glob("llama_cpp_python-*.whl"))
        if not built:
            raise BuildError(f"pip wheel produced no wheel (log: {log})")
        info = {
            "key": key,
            "version": version,
            "cmake_args": flags,
            "patches": [str(Path(p).resolve()) for p in patches],
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        info_path = out / _BUILD_INFO
        info_path.write_text(json.dumps(info, indent=2))
        _stamp_wheel(built[0], info_path)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(info_path, wheel_dir / _BUILD_INFO)
        wheel = wheel_dir / built[0].name
        shutil.move(built[0], wheel)  # last: a wheel in wheel_dir means a finished build
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return wheel


def installed_build_key() -> str | None:
    """The cache key of the llama_cpp build in this interpreter, None if absent or foreign."""
    try:
        dist = importlib.metadata.distribution("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == _BUILD_INFO:
            try:
                return json.loads(Path(dist.locate_file(f)).read_text())["key"]
            except (OSError, ValueError, KeyError):
                return None
    return None


def ensure_installed(
    version: str = DEFAULT_VERSION, cmake_args: str = "", patches: Sequence[Path] = ()
) -> Path:
    """Build if needed and pip-install the wheel here unless this exact build is installed.

    The build identity travels inside the wheel (a marker file in the llama_cpp package), so a
    stock PyPI build or a build with other patches is replaced rather than trusted.
    """
    wheel = ensure_wheel(version, cmake_args, patches)
    key = cache_key(version, cmake_args, patches)
    if installed_build_key() == key:
        return wheel
    # First pass resolves llama_cpp's own deps (diskcache, jinja2, ...); the second replaces a
    # same-version llama_cpp that pip would otherwise consider already satisfied.
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, str(wheel)], what=f"installing the dependencies of {wheel.name}")
    _run([*pip, "--no-deps", "--force-reinstall", str(wheel)], what=f"installing {wheel.name}")
    return wheel


def ensure_site(
    version: str = DEFAULT_VERSION, cmake_args: str = "", patches: Sequence[Path] = ()
) -> Path:
    """A private site dir holding just this build's ``llama_cpp`` (cached per build key).

    Prepending it to a worker's ``PYTHONPATH`` (``WorkerClient(site=...)``) runs that build
    without touching the interpreter's install, so upstream and a patched port can be compared
    in one session.  llama_cpp's pure-Python deps come from the surrounding environment.
    """
    wheel = ensure_wheel(version, cmake_args, patches)
    site = cache_root() / "site" / cache_key(version, cmake_args, patches)
    if (site / "llama_cpp" / _BUILD_INFO).is_file():
        return site
    with staged_dir(site, replace=True) as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(tmp),
                str(wheel),
            ],
            what=f"unpacking {wheel.name}",
        )
    return site


def _stamp_wheel(wheel: Path, info_path: Path) -> None:
    """Put the build-info marker into the wheel's llama_cpp package (RECORD updated).

    Also drops the top-level ``lib/`` and ``include/`` trees the sdist's CMake installs next
    to the package: duplicates of ``llama_cpp/lib`` that would litter site-packages.
    """
    import base64
    import zipfile

    def keep(name: str) -> bool:
        top = name.split("/", 1)[0]
        return top == "llama_cpp" or top.endswith(".dist-info")

    data = info_path.read_bytes()
    arcname = f"llama_cpp/{_BUILD_INFO}"
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for item in zin.infolist():
            if item.filename in (arcname, record_name) or not keep(item.filename):
                continue
            zout.writestr(item, zin.read(item.filename))
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record = zin.read(record_name).decode().rstrip("\n").splitlines()
        record = [r for r in record if keep(r) and not r.startswith(arcname + ",")]
        record.insert(-1, f"{arcname},sha256={digest},{len(data)}")
        zout.writestr(arcname, data)
        zout.writestr(record_name, "\n".join(record) + "\n")
    tmp.replace(wheel)


def main(
    argv: Sequence[str] | None = None, our_patches: Callable[[], list[Path]] | None = None
) -> int:
    """``python -m harness.llamacpp.build [--install] [--patch P ...]``: print the wheel path.

    ``our_patches`` gives ``--with-our-port`` its series; the ``__main__`` block below passes
    ``ports.llamacpp.port.patches`` (our port is built with this module, so only the entry point
    may import it)."""
    ap = argparse.ArgumentParser(prog="python -m harness.llamacpp.build", description=__doc__)
    ap.add_argument("--version", default=DEFAULT_VERSION)
    ap.add_argument("--cmake-args", default="")
    ap.add_argument("--patch", action="append", type=Path, default=[])
    ap.add_argument("--with-our-port", action="store_true",
                    help="apply our Ling-2.6 port's patch series (ports/llamacpp) first; it only "
                         "adds an architecture, so one build serves upstream archs too")
    ap.add_argument("--install", action="store_true", help="also pip-install into this python")
    ap.add_argument("--site", action="store_true", help="print a private site dir instead")
    ap.add_argument("--sdist-tree", action="store_true", help="print the extracted sdist instead")
    args = ap.parse_args(argv)
    try:
        with lifecycle.termination_handling():
            if args.sdist_tree:
                print(sdist_tree(args.version))
                return 0
            fn = ensure_installed if args.install else ensure_site if args.site else ensure_wheel
            patches = list(args.patch)
            if args.with_our_port:
                if our_patches is None:
                    raise BuildError("--with-our-port: no port patch series was given to main()")
                patches = [*our_patches(), *patches]
            print(fn(args.version, args.cmake_args, patches))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except lifecycle.Terminated as e:
        print(f"error: {e}; the build's processes were stopped", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    from ports.llamacpp.port import patches as _our_patches

    raise SystemExit(main(our_patches=_our_patches))
