"""Specification of the quantized decode roofline: a quantized candidate is judged against the
bytes its own files hold (a GGUF tensor's ``n_bytes``, an MLX array's packed weights + scales +
biases), routed experts counted for the ``k`` active of ``E`` only, the embedding one row.

Each figure is recomputed here independently (straight from the gguf reader / the safetensors
arrays, with ``k`` and ``E`` from the metadata rather than the tensor shapes), and the mutation
tests show that counting every expert, or the f32 formula, is caught by the same comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.backends.targets import Target
from harness.checks.cases import Case, load_cases, materialize
from harness.cli.sweep import add_parser, run
from harness.core.errors import InputError
from harness.perf import roofline, sweep
from harness.perf.roofline import (
    dtype_bytes,
    gguf_bytes_per_token,
    mlx_bytes_per_token,
    weight_bytes_per_token,
)
from harness.pytest_plugin.bench_items import BenchGrid, BenchSession
from tests.llamacpp_testing import require_llamacpp
from tests.test_pytest_benchmark import pytest_run

# Quantizes flash-mini and ling3-mini with llama.cpp's quantizer and mlx-lm, cached: measured on
# 2 cores, 21 s from a cold cache, 4 s warm.
pytestmark = pytest.mark.slow
NEVER = re.compile(r"(?!)")  # a pattern that matches no name: every expert counted in full


@pytest.fixture(scope="module")
def flash() -> Case:
    return load_cases(["flash-mini"])[0]


@pytest.fixture(scope="module")
def ling3() -> Case:
    return load_cases(["ling3-mini"])[0]


def f32_formula(case: Case) -> int:
    shape = sweep.ModelShape.of(case)
    assert shape.config is not None
    return weight_bytes_per_token(shape.config, 4.0)


def gguf_of(spec: str, case: Case) -> Path:
    """The GGUF a llama.cpp target runs (skip without llama.cpp, a failure where CI requires
    it)."""
    from harness.backends.llamacpp_backend import candidate_gguf

    require_llamacpp()

    return candidate_gguf(Target.parse(spec), materialize(case))


def mlx_dir_of(spec: str, case: Case) -> Path:
    """The MLX directory an mlx target runs (skip where mlx cannot run, as its own tests do)."""
    from harness.backends.mlx_backend import MlxBackend, candidate_mlx_dir

    if not (availability := MlxBackend().availability()).ok:
        pytest.skip(f"mlx unavailable: {availability.reason}")

    folder = candidate_mlx_dir(Target.parse(spec), materialize(case))
    assert folder is not None, f"{spec} runs no MLX directory of its own"
    return folder


# ---------------------------------------------------------------------------------------------
# Independent recounts


def recount_gguf(path: Path) -> float:
    """Bytes per token of a GGUF, from the reader: k and E from the metadata, MTP blocks out."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    meta = {key.removeprefix(f"{arch}."): f.contents() for key, f in reader.fields.items()}
    k, n_experts = meta["expert_used_count"], meta["expert_count"]
    trunk = meta["block_count"] - meta.get("nextn_predict_layers", 0)
    names = {t.name for t in reader.tensors}
    total = 0.0
    for t in reader.tensors:
        block = re.match(r"blk\.(\d+)\.", t.name)
        if block and int(block[1]) >= trunk:
            continue
        if t.name.endswith(("_exps.weight", "_exps.bias")):
            total += t.n_bytes * k / n_experts
        elif t.name == "token_embd.weight":
            total += t.n_bytes / t.shape[-1] + (0 if "output.weight" in names else t.n_bytes)
        else:
            total += t.n_bytes
    return total


def recount_mlx(folder: Path) -> float:
    """Bytes per token of an MLX directory, from the arrays themselves (numpy ``nbytes``)."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    k, n_experts = config["num_experts_per_tok"], config["num_experts"]
    arrays: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        arrays |= load_file(file)
    tied = not any(name.startswith("lm_head.") for name in arrays)
    total = 0.0
    for name, a in arrays.items():
        if ".switch_mlp." in name:
            total += a.nbytes * k / n_experts
        elif name.startswith("model.word_embeddings."):
            total += a.nbytes / config["vocab_size"] + (a.nbytes if tied else 0)
        else:
            total += a.nbytes
    return total


def check_gguf_bytes(path: Path) -> int:
    """The figure the roofline uses for ``path``, checked against the recount."""
    figure = gguf_bytes_per_token(path)
    assert figure == pytest.approx(recount_gguf(path), abs=1), f"{path.name}: {figure}"
    return figure


def check_mlx_bytes(folder: Path) -> int:
    figure = mlx_bytes_per_token(folder)
    assert figure == pytest.approx(recount_mlx(folder), abs=1), f"{folder.name}: {figure}"
    return figure


# ---------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize(("quant", "low", "high"), [
    # Q8_0: 34 bytes per 32 weights = 0.266 of f32; llama.cpp keeps norms and the router in
    # f32, which on flash-mini's 64-wide layers is a few percent more.
    ("Q8_0", 0.266, 0.32),
    # Q4_K_M: Q4_K (0.141 of f32) with Q6_K / Q8_0 / Q5_0 for some tensors, norms in f32.
    ("Q4_K_M", 0.141, 0.26),
    ("IQ4_NL", 0.141, 0.26),  # 18 bytes per 32 weights (0.141), with Q5_0/Q8_0 fallbacks
])  # fmt: skip
def test_a_quantized_gguf_is_judged_by_its_own_bytes(flash, quant, low, high) -> None:
    figure = check_gguf_bytes(gguf_of(f"llamacpp:quant={quant}", flash))
    assert low <= figure / f32_formula(flash) <= high


def test_counting_every_expert_in_a_gguf_is_caught(flash, monkeypatch) -> None:
    path = gguf_of("llamacpp:quant=Q4_K_M", flash)
    right = check_gguf_bytes(path)
    monkeypatch.setattr(roofline, "_GGUF_EXPERTS", NEVER)
    with pytest.raises(AssertionError, match=path.name):
        check_gguf_bytes(path)
    # flash-mini: 4 of 16 experts active, so all experts add 3x the active experts' bytes
    assert gguf_bytes_per_token(path) > right * 1.5


def test_the_f32_gguf_of_ling26_agrees_with_the_formula(flash) -> None:
    """The file rule and the config formula are one rule: on float weights they agree."""
    figure = check_gguf_bytes(gguf_of("llamacpp", flash))
    assert figure == pytest.approx(f32_formula(flash), rel=0.02)


def test_the_counting_rule_by_hand() -> None:
    """8 experts of which 2 active, a 100-row embedding, a norm; tied reads the embedding whole."""
    experts = ("blk.1.ffn_up_exps.weight", 800, 8)
    embedding = ("token_embd.weight", 1000, 100)
    norm = ("blk.1.ffn_norm.weight", 16, 4)
    head = ("output.weight", 500, 100)

    def count(*tensors: tuple[str, int, int]) -> int:
        return roofline.active_bytes(tensors, is_expert=roofline._GGUF_EXPERTS,
                                     embedding="token_embd.weight", lm_head="output.weight",
                                     experts_per_token=2)

    assert count(experts, embedding, norm, head) == 200 + 10 + 16 + 500
    assert count(experts, embedding, norm) == 200 + 10 + 16 + 1000  # tied lm_head


def test_a_gguf_without_its_keys_is_refused_by_name(tmp_path) -> None:
    import gguf

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), arch="bailingmoe3")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match=r"bare\.gguf: GGUF key bailingmoe3\.block_count"):
        gguf_bytes_per_token(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(InputError, match=r"junk\.gguf: not a readable GGUF"):
        gguf_bytes_per_token(tmp_path / "junk.gguf")


# ---------------------------------------------------------------------------------------------
# MLX


@pytest.mark.parametrize(("bits", "low", "high"), [
    # 4 bits + float32 scale and bias per 64 weights = 0.156 of f32; mlx-lm leaves matrices
    # whose input width is no multiple of the group (flash-mini's 32-wide experts' down_proj)
    # in float and the router at 8 bits, so a good share stays near 1.
    (4, 0.156, 0.6),
    (8, 0.281, 0.7),
])  # fmt: skip
def test_a_quantized_mlx_directory_is_judged_by_its_own_bytes(flash, bits, low, high) -> None:
    figure = check_mlx_bytes(mlx_dir_of(f"mlx:bits={bits}", flash))
    assert low <= figure / f32_formula(flash) <= high


def test_an_mlx_directory_without_its_keys_is_refused_by_name(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_experts_per_tok": 2}))
    with pytest.raises(InputError, match=r"config\.json: needs integer num_hidden_layers"):
        mlx_bytes_per_token(tmp_path)


def test_fewer_bits_read_fewer_bytes(flash) -> None:
    q4, q8 = (mlx_bytes_per_token(mlx_dir_of(f"mlx:bits={b}", flash)) for b in (4, 8))
    assert q4 < q8 < f32_formula(flash)


def test_counting_every_expert_in_an_mlx_directory_is_caught(flash, monkeypatch) -> None:
    folder = mlx_dir_of("mlx:bits=4", flash)
    check_mlx_bytes(folder)
    monkeypatch.setattr(roofline, "_MLX_EXPERTS", NEVER)
    with pytest.raises(AssertionError, match=folder.name):
        check_mlx_bytes(folder)


# ---------------------------------------------------------------------------------------------
# The sweep's and pytest --benchmark's rows


def test_a_quantized_candidate_has_no_f32_figure_before_its_files_are_read(flash) -> None:
    base = sweep.point_base(Target.parse("llamacpp:quant=Q4_K_M"), flash, "m", 100.0, "")
    assert base["dtype"] == "Q4_K_M" and base["weight_bytes_per_token"] is None
    assert np.isnan(base["roofline_tgs"])


@pytest.mark.parametrize(("spec", "kind"), [("llamacpp:quant=Q4_K_M", "Q4_K_M"),
                                            ("mlx:bits=4", "q4g64")])
def test_the_sweep_row_of_a_quantized_candidate_uses_its_files(flash, spec, kind) -> None:
    target = Target.parse(spec)
    base = sweep.point_base(target, flash, "m", 100.0, "")
    sweep.use_candidate_bytes(base, target, flash)
    files = (gguf_bytes_per_token(gguf_of(spec, flash)) if target.backend == "llamacpp"
             else mlx_bytes_per_token(mlx_dir_of(spec, flash)))
    assert (base["dtype"], base["weight_bytes_per_token"]) == (kind, files)
    assert base["roofline_tgs"] == pytest.approx(100e9 / files)
    assert f"roofline from the {kind} files' bytes" in base["detail"]


@pytest.mark.parametrize("spec", ["llamacpp", "mlx", "torch"])
def test_float_candidates_of_ling26_keep_the_formula(flash, spec) -> None:
    target = Target.parse(spec)
    if target.backend == "llamacpp":
        require_llamacpp()  # its f32 GGUF is read (and found to be float)
    base = sweep.point_base(target, flash, "m", 100.0, "")
    before = dict(base)
    sweep.use_candidate_bytes(base, target, flash)
    per_param = dtype_bytes(target.dtype) or math.nan
    assert base == before
    assert base["weight_bytes_per_token"] == pytest.approx(f32_formula(flash) * per_param / 4,
                                                           abs=1)


def test_upstream_ling3_gets_a_roofline_from_its_gguf(ling3) -> None:
    require_llamacpp()
    target = Target.parse("llamacpp:quant=Q8_0")
    base = sweep.point_base(target, ling3, "m", 100.0, "")
    sweep.use_candidate_bytes(base, target, ling3)
    assert base["weight_bytes_per_token"] == check_gguf_bytes(gguf_of("llamacpp:quant=Q8_0",
                                                                      ling3))
    assert "no tensor inventory" not in base["detail"]


def test_unreadable_files_leave_no_roofline_and_say_why(flash, monkeypatch) -> None:
    def broken(target, case):
        raise InputError("model.gguf: not a readable GGUF")

    monkeypatch.setattr(sweep, "candidate_weight_bytes", broken)
    target = Target.parse("llamacpp:quant=Q4_K_M")
    base = sweep.point_base(target, flash, "m", 100.0, "")
    sweep.use_candidate_bytes(base, target, flash)
    assert base["weight_bytes_per_token"] is None
    assert "no roofline from the weight files: InputError: model.gguf" in base["detail"]


def test_pytest_benchmark_rows_of_a_quantized_candidate_use_its_files(flash) -> None:
    require_llamacpp()
    session = BenchSession(BenchGrid())
    target = Target.parse("llamacpp:quant=Q8_0")
    for step, seconds in (("prefill", [0.2, 0.25]), ("decode", [0.4, 0.5])):
        session.record(target, flash, 32, step, seconds, "m")
    (row,) = session.frame({"flash-mini": flash}, bandwidth_gbs=50.0).to_dict("records")
    files = gguf_bytes_per_token(gguf_of("llamacpp:quant=Q8_0", flash))
    assert (row["target"], row["dtype"], row["weight_bytes_per_token"]) == (
        "llamacpp-Q8_0", "Q8_0", files)
    assert row["roofline_tgs"] == pytest.approx(50e9 / files)
    assert row["roofline_frac"] == pytest.approx(row["S_TG"] / row["roofline_tgs"])


# ---------------------------------------------------------------------------------------------
# The front ends: `python -m harness sweep` and `pytest --benchmark` take quantized targets


def test_the_sweep_cli_measures_quantized_candidates_against_their_roofline(flash, tmp_path):
    require_llamacpp()
    mlx_dir_of("mlx:bits=4", flash)  # skips where mlx cannot run
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    args = parser.parse_args([
        "sweep", "--backends", "llamacpp:quant=Q4_K_M,mlx:bits=4", "--cases", "flash-mini",
        "--pp", "8", "--tg", "2", "--repeats", "1", "--warmup", "0", "--bandwidth-gbs", "50",
        "--no-progress", "--out", str(out),
    ])
    assert run(args) == 0
    df = pd.read_parquet(out / "throughput.parquet").set_index("target")
    assert list(df.index) == ["llamacpp-Q4_K_M", "mlx-q4g64"]
    assert list(df["dtype"]) == ["Q4_K_M", "q4g64"]
    files = [gguf_bytes_per_token(gguf_of("llamacpp:quant=Q4_K_M", flash)),
             mlx_bytes_per_token(mlx_dir_of("mlx:bits=4", flash))]
    assert list(df["weight_bytes_per_token"]) == files
    assert np.allclose(df["roofline_frac"], df["S_TG"] * np.array(files) / 50e9)
    html = (out / "index.html").read_text()
    assert "roofline flash-mini Q4_K_M" in html and "roofline flash-mini q4g64" in html
    assert "<th>weight bytes/token</th>" in html and f"{files[0]:,d}" in html


def test_pytest_benchmark_collects_quantized_candidates() -> None:
    proc = pytest_run("--collect-only", "--benchmark", "-k", "flash-mini", "--backends",
                      "llamacpp:quant=Q4_K_M,mlx:bits=4")
    assert "flash-mini::llamacpp-Q4_K_M::pp32-tg4::decode" in proc.stdout, proc.stdout[-2000:]
    assert "flash-mini::mlx-q4g64::pp32-tg4::prefill" in proc.stdout
