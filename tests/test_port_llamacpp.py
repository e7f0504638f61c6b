"""Our llama.cpp port of Ling-2.6 (ports/llamacpp, arch ``bailing_hybrid``) vs the reference.

Fast tests: the patch series applies to the vendored tree, the name map speaks the canonical
vocabulary.  Slow tests (a compiler and the llama-cpp-python sdist; the patched wheel is cached, a
patch change rebuilds in ~1-5 min on 2 cores): every Ling-2.6 case converted to an f32 GGUF and
run with an f32 KV cache must match the float64 reference at every canonical capture point
(NMSE <= 1e-8, router ids identical), prefill and decode, top-1 100 %; and an upstream
architecture still runs on the patched build.  Without the sdist or a compiler they skip,
unless ``BAILING_PARITY_REQUIRE_LLAMACPP=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from harness.core import capture_points
from harness.llamacpp import build
from ports.llamacpp import port

ROOT = Path(__file__).resolve().parent.parent

CASES = ("flash-mini", "tail-clause", "heads-6", "rope-dims", "no-qlora", "long-context")
NMSE_MAX = 1e-8
REQUIRE_ENV = "BAILING_PARITY_REQUIRE_LLAMACPP"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vendored() -> Path:
    try:
        return build.sdist_tree() / "vendor" / "llama.cpp"
    except build.BuildError as e:
        _unavailable(f"llama-cpp-python sdist unavailable: {e}")
        raise


@pytest.fixture(scope="session")
def site(vendored: Path) -> Path:
    if shutil.which("cmake") is None and shutil.which("c++") is None:
        _unavailable("no C++ toolchain")
    try:
        return build.ensure_site(patches=port.patches())
    except build.BuildError as e:  # a broken patch is a failure, not a skip
        pytest.fail(f"the patched build failed:\n{e}")
        raise


# ---- fast ---------------------------------------------------------------------------------


def test_two_workers_converting_one_checkpoint_convert_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytest-xdist workers asking for the same GGUF at once: one converts, the other waits.

    Before the lock, both wrote one ``.part`` and the first rename left the second with nothing
    (CI: "converting ... failed (0)").
    """
    import threading
    import time

    monkeypatch.setenv("BAILING_PARITY_CACHE", str(tmp_path / "cache"))
    calls: list[int] = []

    def slow_convert(checkpoint: Path, out: Path, outtype: str, series: object = None) -> Path:
        calls.append(threading.get_ident())
        time.sleep(0.3)
        out.write_bytes(b"GGUF")
        return out

    monkeypatch.setattr(port, "convert", slow_convert)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")  # the cache key reads the checkpoint's identity
    results: list[Path] = []
    workers = [
        threading.Thread(target=lambda: results.append(port.converted(ckpt)))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1
    assert len(results) == 2 and results[0] == results[1] and results[0].read_bytes() == b"GGUF"



def test_patch_series_is_ordered_and_nonempty() -> None:
    ps = port.patches()
    assert [p.name[:4] for p in ps] == [f"{i:04d}" for i in range(1, len(ps) + 1)]
    assert all(p.stat().st_size > 0 for p in ps)


def test_patches_apply_cleanly_in_order(vendored: Path, tmp_path: Path) -> None:
    tree = tmp_path / "llama.cpp"
    shutil.copytree(vendored, tree, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path))
    for p in port.patches():
        proc = subprocess.run(
            ["git", "apply", "--whitespace=nowarn", str(p)],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"{p.name}: {proc.stderr}"
    assert (tree / "src" / "models" / "bailing-hybrid.cpp").is_file()
    assert "BailingMoeV2_5ForCausalLM" in (tree / "conversion" / "__init__.py").read_text()


def test_name_map_covers_the_canonical_layer_vocabulary() -> None:
    assert port.NAMES.arch == "bailing_hybrid"
    assert set(port.NAMES.layer) == {p.stem for p in capture_points.LAYER_POINTS}
    assert set(port.NAMES.trunk) == {p.stem for p in capture_points.TRUNK_POINTS}
    assert set(port.MTP_NAMES) == {p.stem for p in capture_points.MTP_POINTS}


def test_tiny_tokenizer_round_trips(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    port.write_tiny_tokenizer(tmp_path, 256)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 256
    assert tok.decode(tok.encode("ab\ncd").ids) == "ab\ncd"


# ---- slow: conversion ------------------------------------------------------------------------


@pytest.mark.slow
def test_converter_writes_the_compatible_layout(vendored: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from harness.checks.cases import CASES_DIR, load_case, materialize

    path = port.converted(materialize(load_case(CASES_DIR / "tail-clause.toml")))
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    a = "bailing_hybrid"
    assert fields["general.architecture"] == a
    # 7 layers in groups of 3: MLA at 2, 5 and (tail clause) 6; the MTP block is MLA too
    assert fields[f"{a}.attention.head_count_kv"] == [0, 0, 1, 0, 0, 1, 1, 1]
    assert fields[f"{a}.block_count"] == 8 and fields[f"{a}.nextn_predict_layers"] == 1
    assert fields[f"{a}.attention.key_length"] == 12  # GLA head_dim
    assert fields[f"{a}.rope.dimension_count"] == 6  # GLA rotary dims == MLA's here
    assert f"{a}.rope.dimension_count_mla" not in fields  # only written when they differ
    assert fields[f"{a}.attention.group_norm_groups"] == 4
    assert fields[f"{a}.expert_gating_func"] == 2
    names = {t.name for t in reader.tensors}
    assert {
        "blk.0.attn_qkv.weight",
        "blk.0.attn_gate.weight",
        "blk.0.layer_output_norm.weight",
        "blk.6.attn_k_b.weight",
        "blk.6.attn_v_b.weight",
        "blk.1.exp_probs_b.bias",
        "blk.7.nextn.eh_proj.weight",
        "blk.7.layer_output_norm.weight",
    } <= names
    assert not any(n.endswith("attn_kv_b.weight") for n in names)


# ---- slow: parity ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case_name", CASES)
def test_case_matches_reference_f32(case_name: str, site: Path) -> None:
    """The check session's prefill and decode checks of our port (the llama.cpp backend on our
    build and GGUF): every canonical point within NMSE 1e-8, router ids identical, top-1 100 %."""
    from ports.llamacpp.parity import run_case

    r = run_case(case_name, site=site)
    assert not r.missing, f"points the port does not produce: {r.missing}"
    for pair in r.pairs:
        bad = {k: v for k, v in r.dense(pair).items() if not v <= NMSE_MAX}
        assert not bad, f"{pair.mode}: NMSE > {NMSE_MAX:g}: {bad}"
        assert r.top1(pair) == 1.0, pair.summary_line()
        assert pair.passed, pair.summary_line()
    assert r.index_mismatch() == 0.0, "router ids differ"
    assert {p.mode for p in r.pairs} == {"prefill", "decode"}


@pytest.mark.slow
@pytest.mark.parametrize("case_name", CASES)
def test_mtp_head_matches_reference_f32(case_name: str, site: Path) -> None:
    """The MTP context (doc section 3.1: post-norm hidden, own final_layernorm, biased router)."""
    from ports.llamacpp.parity import run_mtp_case

    r = run_mtp_case(case_name, site=site, decode_steps=3)
    assert not r.missing, f"MTP points the port does not produce: {r.missing}"
    bad = {k: v for k, v in r.points.items() if v > NMSE_MAX}
    assert not bad, f"MTP NMSE > {NMSE_MAX:g} (ids: mismatch rate): {bad}"
    assert r.top1 == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "bailingmoe3"])
def test_upstream_architecture_still_runs_on_the_patched_build(
    arch: str, site: Path, tmp_path: Path
) -> None:
    pytest.importorskip("gguf")
    from harness.llamacpp.client import WorkerClient
    from tests import llamacpp_testing as testing

    writer = getattr(testing, f"write_tiny_{arch}", None)
    if writer is None:
        pytest.skip(f"tests.llamacpp_testing has no tiny {arch} writer")
    gguf_path = writer(tmp_path / f"tiny-{arch}.gguf")
    tokens = [1, 5, 9, 2, 33, 17]
    with WorkerClient(site=site) as w:
        info = w.load(gguf_path)
        assert info["arch"] == arch
        out = w.feed(tokens, ["l_out-1"])
    assert out.logits.shape[0] == len(tokens) and np.isfinite(out.logits).all()


@pytest.mark.slow
def test_loader_accepts_the_known_fork_mtp_head_count(site: Path, tmp_path: Path) -> None:
    """The known fork writes head_count_kv = n_head for the MTP entry (ours: 1); same numbers."""
    gguf = pytest.importorskip("gguf")
    from harness.checks.cases import CASES_DIR, load_case, materialize
    from harness.llamacpp.client import WorkerClient

    case = load_case(CASES_DIR / "flash-mini.toml")
    ours = port.converted(materialize(case))
    fork = tmp_path / "fork-layout.gguf"
    shutil.copyfile(ours, fork)
    reader = gguf.GGUFReader(str(fork), "r+")
    field = reader.fields["bailing_hybrid.attention.head_count_kv"]
    field.parts[field.data[-1]][0] = case.config["num_attention_heads"]
    reader.data.flush()
    assert gguf.GGUFReader(str(fork)).fields[field.name].contents()[-1] == 4

    tokens = list(case.prompts[0].tokens)
    logits = []
    for path in (ours, fork):
        with WorkerClient(site=site) as w:
            w.load(path)
            logits.append(w.feed(tokens).logits)
    np.testing.assert_array_equal(logits[0], logits[1])


def test_a_flash_shaped_gguf_passes_the_inventory_against_the_known_forks_map(
    vendored: Path,
) -> None:
    """Our converter's layout is the fork's: every tensor and key accounted for by its map."""
    from harness.checks.cases import load_case, materialize
    from harness.llamacpp.convert import convert
    from harness.llamacpp.inventory import inventory, render

    ckpt = materialize(load_case(ROOT / "cases" / "flash-mini.toml"))
    gguf = convert(ckpt, "f32", tree=port.converter_tree()).require()
    inv = inventory(gguf, ckpt, port="ljubomirj-bailing_hybrid")
    assert inv.arch == "bailing_hybrid"
    assert [f for f in render(inv) if "notes:" not in f] == []


def test_the_port_refuses_a_gguf_whose_config_it_cannot_represent(vendored: Path) -> None:
    """rope-dims needs MLA rope dims != GLA rope dims; without the key that says so, llama.cpp
    must refuse the file with a message naming the tensor, not compute something else."""
    from harness.backends.base import BackendOptions
    from harness.backends.llamacpp_backend import LlamaCppBackend
    from harness.checks.cases import load_case, materialize
    from harness.core.errors import InputError, PortFailure
    from harness.llamacpp.convert import convert
    from harness.llamacpp.inventory import rewrite_gguf

    ckpt = materialize(load_case(ROOT / "cases" / "rope-dims.toml"))
    gguf = convert(ckpt, "f32", tree=port.converter_tree()).require()
    damaged = rewrite_gguf(gguf, gguf.parent.parent / "rope-dims-no-mla-rope-key.gguf",
                           drop_keys=["bailing_hybrid.rope.dimension_count_mla"])
    with pytest.raises((PortFailure, InputError)) as err:
        model = LlamaCppBackend().load(ckpt, BackendOptions(extra={"gguf": str(damaged)}))
        model.start().feed([1, 2, 3])
    text = str(err.value)
    assert "blk.1.attn_kv_a_mqa.weight' has wrong shape" in text, text
