"""Quantizing a GGUF with llama.cpp's own quantizer, in a child, cached once per content.

Fast tests run the child against a stand-in ``llama_cpp`` package (a ``site`` dir, exactly how
the patched build is put first on the child's ``PYTHONPATH``): an abort or a failed quantization
must become a ``PortFailure`` naming the type and the file, and two workers asking for the same
quantization must run the quantizer once.  Slow tests quantize a real case GGUF with our patched
build (``bailing_hybrid``): Q8_0, Q4_K_M and IQ4_NL, without an imatrix.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from harness.core.errors import InputError, PortFailure
from harness.quant import gguf_quantize as gq
from harness.quant.gguf_quantize import gguf_file_type, normalize_qtype, quantize

ROOT = Path(__file__).resolve().parent.parent

# A stand-in llama_cpp: the constants and calls the driver uses; BEHAVIOUR picks what
# llama_model_quantize does (write the output, return an error, or abort the process).
FAKE_LLAMA_CPP = '''
import ctypes, os, time
__version__ = "0.0-fake"
LLAMA_FTYPE_ALL_F32 = 0
LLAMA_FTYPE_MOSTLY_Q8_0 = 7
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15
class llama_model_quantize_params(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int)]
def llama_backend_init():
    pass
def llama_model_quantize_default_params():
    return llama_model_quantize_params()
def llama_model_quantize(src, dst, params):
    behaviour = os.environ.get("FAKE_QUANT", "ok")
    with open(os.environ["FAKE_QUANT_LOG"], "a") as fh:
        fh.write(f"{params._obj.ftype}\\n")
    if behaviour == "abort":
        os.abort()
    if behaviour == "fail":
        return 1
    time.sleep(0.3)
    with open(src, "rb") as a, open(dst, "wb") as b:
        b.write(a.read())
    return 0
'''


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    (site / "llama_cpp").mkdir(parents=True)
    (site / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.setenv("BAILING_PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_QUANT_LOG", str(tmp_path / "calls.log"))
    return site


def tiny_gguf(path: Path, file_type: int | None = None, types: tuple[str, ...] = ("F32",)) -> Path:
    """A two-tensor GGUF (arch ``llama``) whose tensors have the given ggml types."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    arrays = []
    for i, t in enumerate(types):
        qtype = gguf.GGMLQuantizationType[t]
        data = gguf.quants.quantize(np.full((4, 32), i + 1.0, np.float32), qtype)
        arrays.append(data)
        writer.add_tensor(f"t{i}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().split() if log.exists() else []


# ---- fast ---------------------------------------------------------------------------------


def test_type_names_are_llama_cpps_and_case_insensitive() -> None:
    assert normalize_qtype("q4_k_m") == "Q4_K_M"
    assert normalize_qtype(" iq4_nl ") == "IQ4_NL"
    known = gq.file_types()
    assert known["Q8_0"] == 7 and known["Q4_K_M"] == 15 and known["IQ4_NL"] == 25  # llama.h
    assert known["F32"] == 0 and known["Q5_K_M"] == 17 and known["Q4_0"] == 2


def test_an_unknown_type_is_an_input_error_listing_the_known_ones(tmp_path: Path) -> None:
    src = tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(InputError, match=r"unknown quantization type 'Q4_K_X'.*IQ4_NL.*Q4_K_M"):
        quantize(src, "Q4_K_X", site=None)


def test_a_missing_source_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such GGUF"):
        quantize(tmp_path / "absent.gguf", "Q8_0", site=None)


def test_file_type_is_read_from_the_gguf(tmp_path: Path) -> None:
    assert gguf_file_type(tiny_gguf(tmp_path / "a.gguf", file_type=15)) == "Q4_K_M"
    assert gguf_file_type(tiny_gguf(tmp_path / "b.gguf", file_type=25)) == "IQ4_NL"
    assert gguf_file_type(tiny_gguf(tmp_path / "c.gguf", file_type=0)) == "F32"
    # no general.file_type: the most common tensor type names it
    mixed = tiny_gguf(tmp_path / "d.gguf", types=("Q8_0", "F32", "Q8_0"))
    assert gguf_file_type(mixed) == "Q8_0"
    (tmp_path / "e.gguf").write_bytes(b"not a gguf")
    with pytest.raises(InputError, match="not a readable GGUF"):
        gguf_file_type(tmp_path / "e.gguf")


def test_the_cache_key_follows_content_type_and_build(tmp_path: Path, fake_site: Path) -> None:
    src = tiny_gguf(tmp_path / "m.gguf")
    key = gq.cache_key(src, "Q8_0", fake_site)
    assert key == gq.cache_key(src, "Q8_0", fake_site)
    assert key != gq.cache_key(src, "Q4_K_M", fake_site)
    other_site = tmp_path / "other-build"
    other_site.mkdir()
    assert key != gq.cache_key(src, "Q8_0", other_site)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert key != gq.cache_key(src, "Q8_0", fake_site)


def test_quantizing_runs_in_a_child_and_is_cached(tmp_path: Path, fake_site: Path) -> None:
    src = tiny_gguf(tmp_path / "m.gguf")
    out = quantize(src, "q8_0", site=fake_site)
    assert out.parent == gq.cache_dir() and "Q8_0" in out.name
    assert out.read_bytes() == src.read_bytes()
    assert quantize(src, "Q8_0", site=fake_site) == out
    assert calls(tmp_path) == ["7"]  # once, with LLAMA_FTYPE_MOSTLY_Q8_0


def test_two_workers_quantizing_one_file_quantize_it_once(
    tmp_path: Path, fake_site: Path
) -> None:
    src = tiny_gguf(tmp_path / "m.gguf")
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(quantize(src, "Q4_K_M",
                                                                    site=fake_site)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] == got[1] and got[0].is_file()
    assert calls(tmp_path) == ["15"]


@pytest.mark.parametrize("behaviour, says", [("abort", "killed by signal 6"),
                                             ("fail", "exited with code 1")])
def test_a_failing_quantizer_is_a_port_failure_naming_type_and_file(
    tmp_path: Path, fake_site: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str, says: str
) -> None:
    monkeypatch.setenv("FAKE_QUANT", behaviour)
    src = tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(PortFailure) as err:
        quantize(src, "Q8_0", site=fake_site)
    assert str(src) in str(err.value) and "Q8_0" in str(err.value) and says in str(err.value)
    assert not [p for p in gq.cache_dir().iterdir() if p.suffix == ".gguf" or ".tmp-" in p.name]


def test_a_type_this_build_lacks_is_an_input_error(tmp_path: Path, fake_site: Path) -> None:
    src = tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(InputError, match="LLAMA_FTYPE_MOSTLY_IQ4_NL"):
        quantize(src, "IQ4_NL", site=fake_site)
    assert calls(tmp_path) == []


# ---- slow: llama.cpp's quantizer on a real case ----------------------------------------------


REQUIRE_ENV = "BAILING_PARITY_REQUIRE_LLAMACPP"  # unavailable llama.cpp: fail, not skip


@pytest.fixture(scope="session")
def site() -> Path:
    return patched_site()


def patched_site() -> Path:
    """Our patched build (tests/test_port_llamacpp.py's pattern): skip without the sdist or a
    compiler unless REQUIRE_ENV=1; a patch that does not build fails."""
    import shutil

    from harness.llamacpp import build
    from ports.llamacpp import port

    try:
        build.sdist_tree()
    except build.BuildError as e:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but the llama-cpp-python sdist is unavailable: {e}")
        pytest.skip(f"llama-cpp-python sdist unavailable: {e}")
    if shutil.which("cmake") is None and shutil.which("c++") is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but no C++ toolchain")
        pytest.skip("no C++ toolchain")
    try:
        return build.ensure_site(patches=port.patches())
    except build.BuildError as e:  # a broken patch is a failure, not a skip
        pytest.fail(f"the patched build failed:\n{e}")
        raise


def flash_mini_f32() -> Path:
    from harness.checks.cases import load_case, materialize
    from ports.llamacpp import port

    return port.converted(materialize(load_case(ROOT / "cases" / "flash-mini.toml")), "f32")


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "IQ4_NL"])
def test_llama_cpp_quantizes_ling26_without_an_imatrix(site: Path, qtype: str) -> None:
    import gguf

    src = flash_mini_f32()
    out = quantize(src, qtype.lower(), site=site)
    assert gguf_file_type(src) == "F32"
    assert gguf_file_type(out) == qtype
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types) == {t.name for t in gguf.GGUFReader(str(src)).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay f32
    assert any(t not in ("F32", "F16") for t in types.values())
    mtime = out.stat().st_mtime_ns
    assert quantize(src, qtype, site=site) == out and out.stat().st_mtime_ns == mtime
