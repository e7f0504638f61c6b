"""The environment ``hf_remote`` runs a checkpoint's own modeling code in.

Remote code is written against one transformers (config.json's ``transformers_version`` says
which); the main environment keeps its own transformers for Ling 3.0.  So the child runs on an
*overlay*: a folder on ``PYTHONPATH`` holding that transformers and those of its requirements
the main environment does not satisfy (torch, numpy and the rest come from the main
environment).  It is built once with pip and cached under ``<cache>/hf-remote/transformers-V``
like the llama.cpp wheel; a folder without its ``overlay.json`` record (an interrupted build) is
never used.  A checkpoint naming no version, or the main environment's own, runs on the main
environment; ``BAILING_PARITY_HF_REMOTE_MAIN_ENV=1`` forces that (with a note saying so).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from harness.core import lifecycle
from harness.core.atomic import staged_dir, write_text
from harness.core.errors import InputError, PortFailure

MAIN_ENV_ENV = "BAILING_PARITY_HF_REMOTE_MAIN_ENV"
RECORD = "overlay.json"
_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?([.-]?(a|b|rc|dev|post)\d*)?$")
MAX_ROUNDS = 4  # requirement rounds: transformers, its unmet requirements, theirs, ...

Installer = Callable[[Path, Sequence[str]], None]


@dataclass(frozen=True)
class RemoteEnv:
    """Where the child's transformers comes from."""

    python: str
    overlay: Path | None  # prepended to PYTHONPATH; None: the main environment
    transformers: str  # the version the child will import
    note: str  # for the run's findings


def wanted_version(checkpoint: Path) -> str | None:
    """config.json's ``transformers_version`` (the version the files were written with)."""
    path = Path(checkpoint) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    value = raw.get("transformers_version") if isinstance(raw, dict) else None
    if value is None:
        return None
    if not isinstance(value, str) or not _VERSION.match(value):
        raise InputError(f"{path}: key 'transformers_version' = {value!r} is not a version")
    return value


def main_version() -> str:
    return metadata.version("transformers")


def remote_env(checkpoint: Path, root: Path | None = None,
               installer: Installer | None = None) -> RemoteEnv:
    """The environment for ``checkpoint``'s remote code (building its overlay on first use)."""
    want, have = wanted_version(checkpoint), main_version()
    if os.environ.get(MAIN_ENV_ENV) == "1" and want not in (None, have):
        return RemoteEnv(sys.executable, None, have,
                         f"hf_remote: the modeling code was written for transformers {want} but "
                         f"runs on the main environment's {have} ({MAIN_ENV_ENV}=1)")
    if want is None or want == have:
        why = "names no transformers_version" if want is None else f"was written for {want}"
        return RemoteEnv(sys.executable, None, have,
                         f"hf_remote: the checkpoint {why}; its code runs on the main "
                         f"environment's transformers {have}")
    overlay = ensure_overlay(want, root, installer)
    return RemoteEnv(sys.executable, overlay, want,
                     f"hf_remote: the modeling code runs on transformers {want} (the version "
                     f"config.json names), from the cached overlay {overlay}")


def overlay_dir(version: str, root: Path | None = None) -> Path:
    from harness.core.cache import root as cache_root

    return (root or cache_root()) / "hf-remote" / f"transformers-{version}"


def ensure_overlay(version: str, root: Path | None = None,
                   installer: Installer | None = None) -> Path:
    """The overlay for transformers ``version``: reused when its record is there, else built."""
    final = overlay_dir(version, root)
    if _complete(final, version):
        return final
    install = installer or pip_install
    try:
        with staged_dir(final, replace=True) as tmp:
            installed = _install_closure(tmp, version, install)
            write_text(tmp / RECORD, json.dumps(
                {"transformers": version, "python": sys.version.split()[0],
                 "installed": installed}, indent=2))
    except (OSError, RuntimeError) as e:
        raise PortFailure(f"hf_remote: cannot build the environment pinned to transformers "
                          f"{version} in {final}: {e}") from None
    return final


def _complete(folder: Path, version: str) -> bool:
    try:
        return json.loads((folder / RECORD).read_text()).get("transformers") == version
    except (OSError, ValueError):
        return False


def _install_closure(target: Path, version: str, install: Installer) -> list[str]:
    """transformers==version, then every requirement the overlay plus the main environment do
    not satisfy, round by round (each installed without its own dependencies)."""
    wanted = [f"transformers=={version}"]
    done: list[str] = []
    for _ in range(MAX_ROUNDS):
        if not wanted:
            return done
        install(target, wanted)
        done += wanted
        wanted = unmet_requirements(target)
    if wanted:
        raise RuntimeError(f"requirements still unmet after {MAX_ROUNDS} rounds: {wanted}")
    return done


def unmet_requirements(target: Path) -> list[str]:
    """Requirements of the distributions in ``target`` that neither ``target`` nor the main
    environment satisfies (extras and other platforms' markers left out)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    local = {canonicalize_name(d.metadata["Name"]): d.version
             for d in metadata.distributions(path=[str(target)])}
    unmet: dict[str, str] = {}
    for dist in metadata.distributions(path=[str(target)]):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            have = local.get(name)
            if have is None:
                try:
                    have = metadata.version(req.name)
                except metadata.PackageNotFoundError:
                    have = None
            if have is None or not req.specifier.contains(have, prereleases=True):
                unmet[name] = f"{req.name}{req.specifier}"
    return sorted(unmet.values())


def pip_install(target: Path, requirements: Sequence[str]) -> None:
    """``pip install --target`` without dependencies (the closure is computed here)."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--target", str(target), *requirements]
    done = lifecycle.run_as_group(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(requirements)} exited {done.returncode}")
