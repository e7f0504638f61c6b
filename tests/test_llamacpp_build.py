"""The wheel builder's cache, patch and sync logic (no compiler, no network)."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

from harness.llamacpp import build


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BAILING_PARITY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "llamacpp"


def test_cache_root_honours_env(cache: Path) -> None:
    assert build.cache_root() == cache


def test_cache_key_depends_on_patch_bytes_and_flags_not_paths(tmp_path: Path) -> None:
    a, b = tmp_path / "a.patch", tmp_path / "b.patch"
    a.write_text("one")
    b.write_text("one")
    assert build.cache_key("0.3.36", "", [a]) == build.cache_key("0.3.36", "", [b])
    b.write_text("two")
    keys = {
        build.cache_key("0.3.36"),
        build.cache_key("0.3.36", "", [a]),
        build.cache_key("0.3.36", "", [b]),
        build.cache_key("0.3.36", "-DGGML_NATIVE=OFF"),
        build.cache_key("0.3.35"),
    }
    assert len(keys) == 5


def test_cached_wheel_is_returned_without_building(cache: Path) -> None:
    key = build.cache_key("0.3.36")
    wheel = cache / "wheels" / key / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    assert build.ensure_wheel("0.3.36") == wheel


def test_sync_tree_rewrites_only_changed_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "same.c").write_text("same")
    (src / "d" / "changed.c").write_text("new")
    (dst / "d").mkdir(parents=True)
    (dst / "same.c").write_text("same")
    (dst / "d" / "changed.c").write_text("old")
    (dst / "stale.c").write_text("gone")
    (dst / "stale_dir").mkdir()
    old = 1_000_000_000
    for p in (dst / "same.c", dst / "d" / "changed.c"):
        os.utime(p, (old, old))
    build._sync_tree(src, dst)
    assert (dst / "same.c").stat().st_mtime == old  # ninja will not rebuild it
    assert (dst / "d" / "changed.c").read_text() == "new"
    assert (dst / "d" / "changed.c").stat().st_mtime > old  # but will rebuild this
    assert not (dst / "stale.c").exists() and not (dst / "stale_dir").exists()


@pytest.mark.skipif(shutil.which("git") is None and shutil.which("patch") is None, reason="no git")
def test_patches_apply_in_order_and_a_bad_one_fails_loudly(tmp_path: Path) -> None:
    tree = tmp_path / "llama.cpp"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "x.cpp").write_text("int a = 1;\n")
    p1 = tmp_path / "0001.patch"
    p1.write_text("--- a/src/x.cpp\n+++ b/src/x.cpp\n@@ -1 +1 @@\n-int a = 1;\n+int a = 2;\n")
    p2 = tmp_path / "0002.patch"
    p2.write_text("--- a/src/x.cpp\n+++ b/src/x.cpp\n@@ -1 +1 @@\n-int a = 2;\n+int a = 3;\n")
    build._apply_patches(tree, [p1, p2])
    assert (tree / "src" / "x.cpp").read_text() == "int a = 3;\n"
    with pytest.raises(build.BuildError, match=r"0001\.patch"):
        build._apply_patches(tree, [p1])


def test_stamped_wheel_carries_its_build_key(tmp_path: Path) -> None:
    wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llama_cpp/__init__.py", "")
        z.writestr("lib/libllama.so", "stray copy")
        z.writestr(
            "llama_cpp_python-0.3.36.dist-info/RECORD",
            "llama_cpp/__init__.py,,\nlib/libllama.so,,\nllama_cpp_python-0.3.36.dist-info/RECORD,,\n",
        )
    info = tmp_path / build._BUILD_INFO
    info.write_text('{"key": "abc"}')
    build._stamp_wheel(wheel, info)
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"llama_cpp/{build._BUILD_INFO}") == b'{"key": "abc"}'
        record = z.read("llama_cpp_python-0.3.36.dist-info/RECORD").decode()
        assert "lib/libllama.so" not in z.namelist()
    assert f"llama_cpp/{build._BUILD_INFO},sha256=" in record
    assert "lib/libllama.so" not in record.replace("llama_cpp/lib", "")
