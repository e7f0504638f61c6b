"""Specification of the one cache root: every cache (checkpoints, GGUFs, llama.cpp builds,
overlays) lives under :func:`harness.core.cache.root`."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.core import cache
from harness.llamacpp import build


def test_the_env_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAILING_PARITY_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.root() == tmp_path / "mine"


def test_without_it_the_xdg_cache_holds_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BAILING_PARITY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.root() == tmp_path / "xdg" / "bailing-parity"


def test_without_either_it_is_under_the_home_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BAILING_PARITY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.root() == Path.home() / ".cache" / "bailing-parity"


def test_llamacpp_and_checkpoints_share_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation-proof: with only XDG set the two caches used to part ways (~/.cache vs XDG)."""
    monkeypatch.delenv("BAILING_PARITY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == cache.root() / "llamacpp"
    assert build.cache_root().parent == tmp_path / "xdg" / "bailing-parity"
