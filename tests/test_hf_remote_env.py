"""The environment ``hf_remote`` runs remote code in: the transformers config.json names, from an
overlay built once with pip and cached; the main environment when the checkpoint names none or
names the main environment's own version; an interrupted build is never used."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import pytest

from harness.backends.hf_remote_env import (
    MAIN_ENV_ENV,
    RECORD,
    ensure_overlay,
    overlay_dir,
    remote_env,
    unmet_requirements,
)
from harness.core.errors import InputError, PortFailure

MAIN = version("transformers")


def checkpoint(tmp_path: Path, **config: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"], **config}))
    return tmp_path


class FakePip:
    """Writes a dist-info per requirement (transformers requiring numpy, which the main
    environment has, and a package it lacks), recording each call."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, target: Path, requirements: Sequence[str]) -> None:
        self.calls.append(list(requirements))
        for req in requirements:
            name = req.split("=")[0].split(">")[0].split("<")[0]
            info = target / f"{name.replace('-', '_')}-9.0.dist-info"
            info.mkdir(parents=True)
            requires = ["numpy>=1", "not-in-main-env>=2"] if name == "transformers" else []
            info.joinpath("METADATA").write_text(
                f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.0\n"
                + "".join(f"Requires-Dist: {r}\n" for r in requires))
            if self.fail:
                raise RuntimeError("pip install exited 1")


def test_a_checkpoint_naming_no_version_runs_on_the_main_environment(tmp_path):
    env = remote_env(checkpoint(tmp_path), root=tmp_path / "cache", installer=FakePip())
    assert env.overlay is None and env.transformers == MAIN
    assert "names no transformers_version" in env.note


def test_a_checkpoint_naming_the_main_version_runs_on_the_main_environment(tmp_path):
    pip = FakePip()
    env = remote_env(checkpoint(tmp_path, transformers_version=MAIN), tmp_path / "c", pip)
    assert env.overlay is None and pip.calls == []
    assert env.note.endswith(f"its code runs on the main environment's transformers {MAIN}")


def test_another_version_is_installed_once_with_its_unmet_requirements(tmp_path):
    pip = FakePip()
    ckpt = checkpoint(tmp_path / "ck", transformers_version="4.0.0")
    env = remote_env(ckpt, tmp_path / "cache", pip)
    assert env.overlay == overlay_dir("4.0.0", tmp_path / "cache")
    assert env.transformers == "4.0.0" and "cached overlay" in env.note
    assert pip.calls == [["transformers==4.0.0"], ["not-in-main-env>=2"]]  # numpy: main env's
    record = json.loads((env.overlay / RECORD).read_text())
    assert record["installed"] == ["transformers==4.0.0", "not-in-main-env>=2"]
    assert unmet_requirements(env.overlay) == []
    again = remote_env(ckpt, tmp_path / "cache", pip)  # cached: pip is not run again
    assert again == env and len(pip.calls) == 2


def test_an_interrupted_build_leaves_nothing_that_is_used(tmp_path):
    with pytest.raises(PortFailure, match="cannot build the environment pinned to transformers"):
        ensure_overlay("4.0.0", tmp_path, FakePip(fail=True))
    assert not overlay_dir("4.0.0", tmp_path).exists()
    partial = overlay_dir("4.0.0", tmp_path)
    partial.mkdir(parents=True)  # e.g. a folder left without its record
    pip = FakePip()
    ensure_overlay("4.0.0", tmp_path, pip)
    assert pip.calls[0] == ["transformers==4.0.0"]  # rebuilt, not trusted


def test_the_main_environment_can_be_forced_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(MAIN_ENV_ENV, "1")
    pip = FakePip()
    env = remote_env(checkpoint(tmp_path, transformers_version="4.0.0"), tmp_path / "c", pip)
    assert env.overlay is None and pip.calls == []
    assert env.note == (f"hf_remote: the modeling code was written for transformers 4.0.0 but "
                        f"runs on the main environment's {MAIN} ({MAIN_ENV_ENV}=1)")


def test_a_malformed_version_is_refused_naming_the_key(tmp_path):
    with pytest.raises(InputError) as e:
        remote_env(checkpoint(tmp_path, transformers_version="latest; rm -rf"), tmp_path / "c")
    assert str(e.value) == (f"{tmp_path / 'config.json'}: key 'transformers_version' = "
                            "'latest; rm -rf' is not a version")


@pytest.mark.slow
def test_remote_code_runs_on_the_pinned_transformers_within_float32_tolerance(tmp_path):
    """The real overlay (built with pip on first use, then cached): transformers 4.57.1."""
    from harness.backends.base import BackendOptions, forward
    from harness.backends.hf_remote import HfRemoteBackend
    from harness.core.metrics import nmse
    from references.model import BailingHybridReference
    from tests.hf_remote_checkpoint import write_remote_checkpoint

    ckpt = write_remote_checkpoint(tmp_path / "pinned", transformers_version="4.57.1")
    model = HfRemoteBackend().load(ckpt, BackendOptions())
    try:
        assert model.info["transformers"] == "4.57.1"
        assert model.findings[0].startswith(
            "hf_remote: the modeling code runs on transformers 4.57.1 (the version config.json "
            "names), from the cached overlay")
        tokens = [1, 17, 42, 99, 256, 3, 511, 7]
        names = ["gla_out-0", "kv_cmpr-3", "ffn_moe_weights-1", "l_out-7", "result_output"]
        ours = forward(model, tokens, names)
        ref = forward(BailingHybridReference.from_checkpoint(ckpt), tokens, names)
        assert max(nmse(ours[n], ref[n]) for n in names) <= 1e-8
    finally:
        model.close()
