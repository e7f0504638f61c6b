"""Specification of the throughput sweep: batched-bench columns, honest skips, tables, report."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.backends import registry, targets
from harness.backends.base import Availability, BackendOptions
from harness.checks.cases import load_cases
from harness.cli.sweep import add_parser, run
from harness.core.errors import PortFailure
from harness.perf import sweep
from harness.perf.bench_import import import_text
from harness.perf.sections import throughput_section
from harness.perf.sweep import COLUMNS, estimate_point_s, run_sweep, save_sweep, throughput_frame
from harness.report.page import render_section
from tests.test_bench_import import BATCHED_BENCH

# ---------------------------------------------------------------------------------------------
# A scriptable backend: what it was asked to do, and how long it "takes" per prompt length.


class FakeModel:
    n_layers = 1
    prefill_s_per_token_sq = 0.0  # prefill sleeps this * PP^2 seconds
    fail_from = 10**9  # feeds of at least this many tokens raise a PortFailure
    captures: list[tuple[str, ...]] = []  # noqa: RUF012  (the test's record of start() calls)

    def start(self, capture: Collection[str] = ()) -> FakeSession:
        FakeModel.captures.append(tuple(capture))
        return FakeSession()


class FakeSession:
    def feed(self, tokens: Sequence[int]) -> dict[str, np.ndarray]:
        n = len(tokens)
        if n >= FakeModel.fail_from:
            raise PortFailure("fake: out of scratch memory")
        time.sleep(FakeModel.prefill_s_per_token_sq * n * n)
        logits = np.zeros((n, 512))
        logits[:, (tokens[-1] + 1) % 512] = 1.0
        return {"result_output": logits}


class FakeBackend:
    name = "fake"
    available = True

    def availability(self) -> Availability:
        return Availability(True) if FakeBackend.available else Availability(False, "no fake here")

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> FakeModel:
        return FakeModel()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[FakeModel]:
    for family in ("ling26", "ling3"):  # one module (this one) plus one registry entry
        monkeypatch.setitem(registry.REGISTRY, ("fake", family), registry.Implementation(
            "fake", family, "a scriptable test backend", f"{__name__}:FakeBackend",
            "harness.backends.options:NoOptions", registry.Capabilities(captures=False)))
    monkeypatch.setattr(sweep, "materialize", lambda case: tmp_path)  # the fake reads nothing
    monkeypatch.setattr(FakeModel, "captures", [])
    monkeypatch.setattr(FakeModel, "prefill_s_per_token_sq", 0.0)
    monkeypatch.setattr(FakeModel, "fail_from", 10**9)
    monkeypatch.setattr(FakeBackend, "available", True)
    return FakeModel


def fake_sweep(prompt_lengths: Sequence[int], **kwargs) -> pd.DataFrame:
    options = {"tg": 4, "repeats": 1, "warmup": 0, "progress": False, "bandwidth_gbs": 100.0}
    return run_sweep(["fake"], ["flash-mini"], prompt_lengths=prompt_lengths, **options | kwargs)


# ---------------------------------------------------------------------------------------------
# The real backends, on a tiny grid


@pytest.fixture(scope="module")
def tiny() -> pd.DataFrame:
    import torch

    for name in ("torch", "mlx"):
        availability = targets.get_backend(name).availability()
        if not availability.ok:
            pytest.skip(f"{name} unavailable: {availability.reason}")
    threads = torch.get_num_threads()
    df = run_sweep(["torch", "mlx"], ["flash-mini"], prompt_lengths=(16, 32), tg=4, repeats=2,
                   warmup=1, progress=False, bandwidth_gbs=100.0, threads=1)
    assert torch.get_num_threads() == threads  # the sweep restores torch's thread count
    return df


def test_a_tiny_sweep_measures_torch_and_mlx_with_batched_bench_columns(tiny) -> None:
    assert list(tiny.columns) == list(COLUMNS)
    assert set(zip(tiny["target"], tiny["PP"], strict=True)) == {
        ("torch-float32", 16), ("torch-float32", 32), ("mlx-float32", 16), ("mlx-float32", 32)}
    assert (tiny["skip_reason"] == "").all() and (tiny["source"] == "harness").all()
    assert (tiny["TG"] == 4).all() and (tiny["B"] == 1).all() and (tiny["repeats"] == 2).all()
    assert (tiny["N_KV"] == tiny["PP"] + tiny["TG"]).all()
    assert np.allclose(tiny["S_PP"], tiny["PP"] / tiny["T_PP"])
    assert np.allclose(tiny["S_TG"], tiny["TG"] / tiny["T_TG"])
    assert np.allclose(tiny["T"], tiny["T_PP"] + tiny["T_TG"])
    assert np.allclose(tiny["S"], (tiny["PP"] + tiny["TG"]) / tiny["T"])
    assert (tiny["T_PP"] > 0).all() and (tiny["T_TG"] > 0).all()
    assert (tiny["T_PP_spread"] >= 0).all() and (tiny["T_TG_spread"] >= 0).all()


def test_the_sweep_records_builds_memory_and_the_roofline(tiny) -> None:
    torch_rows, mlx_rows = (tiny[tiny["backend"] == b] for b in ("torch", "mlx"))
    assert torch_rows["build"].str.startswith("torch 2.").all()
    assert mlx_rows["build"].str.contains("mlx-lm").all()
    assert (tiny["peak_rss_mb"] > 50).all()  # a Python process with torch loaded
    assert (mlx_rows["peak_backend_mb"] > 0).all() and torch_rows["peak_backend_mb"].isna().all()
    assert (tiny["weight_bytes_per_token"] == 1_720_000).all()  # float32 flash-mini, 4 experts
    assert np.allclose(tiny["roofline_tgs"], 100e9 / 1_720_000)
    assert np.allclose(tiny["roofline_frac"], tiny["S_TG"] / tiny["roofline_tgs"])
    assert tiny["machine"].str.contains("CPUs").all()
    assert torch_rows["detail"].str.contains("torch_threads=1").all()


# ---------------------------------------------------------------------------------------------
# Skips, failures and what is timed


def test_sessions_are_opened_without_capture_points(fake) -> None:
    fake_sweep([8, 16], warmup=1, repeats=2)
    assert len(fake.captures) == 2 * (1 + 2)  # a fresh session per run
    assert set(fake.captures) == {()}


def test_points_beyond_the_case_or_a_batch_of_one_are_kept_with_a_reason(fake) -> None:
    df = fake_sweep([16, 4094], batch=(1, 2))
    reasons = dict(zip(zip(df["B"], df["PP"], strict=True), df["skip_reason"], strict=True))
    assert reasons[(1, 16)] == ""
    assert "max_position_embeddings (4096)" in reasons[(1, 4094)]
    assert "only B=1" in reasons[(2, 16)] and "only B=1" in reasons[(2, 4094)]
    skipped = df[df["skip_reason"] != ""]
    assert skipped["T_PP"].isna().all() and (skipped["repeats"] == 0).all()
    assert list(df.loc[df["B"] == 2, "N_KV"]) == [2 * (16 + 4), 2 * (4094 + 4)]


def test_an_unavailable_backend_is_recorded_not_dropped(fake) -> None:
    FakeBackend.available = False
    df = fake_sweep([16, 32])
    assert len(df) == 2 and df["skip_reason"].str.contains("unavailable here: no fake here").all()


def test_points_over_the_time_budget_are_skipped_by_extrapolation(fake) -> None:
    fake.prefill_s_per_token_sq = 1e-7  # 1 ms at PP=100, 4 ms at 200, 40 s at 20000
    case = load_cases(["flash-mini"])[0]
    long = replace(case, config=case.config | {"max_position_embeddings": 65536})
    df = run_sweep(["fake"], [long], prompt_lengths=(100, 200, 20000), tg=2, repeats=1,
                   warmup=0, progress=False, bandwidth_gbs=100.0, max_point_s=0.5,
                   memory_budget_mb=math.inf)
    assert list(df["skip_reason"].iloc[:2]) == ["", ""]
    assert "budget per point (extrapolated from PP=200)" in df["skip_reason"].iloc[2]


def test_points_over_the_memory_budget_are_skipped(fake) -> None:
    df = fake_sweep([16], memory_budget_mb=0.01)
    assert "exceeds the memory budget" in df["skip_reason"].iloc[0]


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(fake) -> None:
    fake.fail_from = 32
    df = fake_sweep([16, 32, 64])
    assert list(df["skip_reason"] == "") == [True, False, False]
    assert df["skip_reason"].iloc[1] == "failed: PortFailure: fake: out of scratch memory"


def test_extrapolation_is_quadratic_until_two_points_exist() -> None:
    one = [sweep._Measured(pp=100, t_pp=1.0, t_step=0.01)]
    assert estimate_point_s([], 100, 10, runs=2) is None
    assert estimate_point_s(one, 200, 10, runs=2) == pytest.approx(2 * (4.0 + 10 * 0.02))
    linear = [sweep._Measured(50, 0.5, 0.01), *one]  # prefill linear, decode flat
    assert estimate_point_s(linear, 400, 10, runs=1) == pytest.approx(4.0 + 10 * 0.01)


# ---------------------------------------------------------------------------------------------
# Tables, report, CLI


def test_tables_round_trip_and_are_never_overwritten(fake, tmp_path: Path) -> None:
    df = fake_sweep([16, 4094])
    parquet, csv = save_sweep(df, tmp_path / "run")
    assert (parquet.name, csv.name) == ("throughput.parquet", "throughput.csv")
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), df)
    assert list(pd.read_csv(csv).columns) == list(COLUMNS)
    with pytest.raises(FileExistsError):
        save_sweep(df, tmp_path / "run")


def test_the_report_section_charts_both_phases_with_the_roofline(fake) -> None:
    fake.fail_from = 4000
    ours = fake_sweep([16, 64, 4000])
    theirs = import_text(BATCHED_BENCH, "llama-batched-bench", "llamacpp-f32", case="flash-mini")
    df = pd.concat([ours, theirs], ignore_index=True)
    df.loc[2, "skip_reason"] = "failed: <script>alert(1)</script>"
    section = throughput_section(df)
    html = render_section(section)
    assert section.title == "Throughput"
    assert html.count('<div class="chart">') == 2 and html.count("<svg") == 2
    assert 'aria-label="decode tokens per second against context length"' in html
    assert "roofline flash-mini float32" in html  # the decode chart's roofline, per case
    assert "llamacpp-f32 · flash-mini [llama-batched-bench] B=4" in html
    assert "<th>S_TG t/s</th>" in html and "<th>roofline frac</th>" in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert html.count("<tr>") == 1 + 2 + 9  # header, our two measured points, 9 imported


def test_the_cli_writes_tables_and_a_report(fake, tmp_path: Path, capsys) -> None:
    bb = tmp_path / "bb.txt"
    bb.write_text(BATCHED_BENCH)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    args = parser.parse_args([
        "sweep", "--backends", "fake", "--cases", "flash-mini", "--pp", "16,32", "--tg", "2",
        "--repeats", "1", "--warmup", "0", "--bandwidth-gbs", "50", "--no-progress",
        "--import", f"{bb}:llama-batched-bench:llamacpp-f32:flash-mini", "--out", str(out),
    ])
    assert run(args) == 0
    assert {"index.html", "throughput.parquet", "throughput.csv"} <= {p.name for p in out.iterdir()}
    df = pd.read_parquet(out / "throughput.parquet")
    assert list(df["source"].value_counts().sort_index().items()) == [
        ("harness", 2), ("llama-batched-bench", 9)]
    imported = df[df["source"] == "llama-batched-bench"]
    assert np.allclose(imported["roofline_tgs"], 50e9 / 1_720_000)  # f32 -> 4 bytes a weight
    assert "Throughput" in (out / "index.html").read_text()
    printed = capsys.readouterr().out
    assert "|    PP |     TG |    B |   N_KV |" in printed and "report:" in printed


def test_a_llamacpp_outtype_is_the_storage_type_the_roofline_uses() -> None:
    quantised = targets.Target("llamacpp", "float32", (("outtype", "q8_0"),))
    assert sweep.storage_dtype(quantised) == "q8_0"
    assert sweep.storage_dtype(targets.Target("mlx", "bfloat16")) == "bfloat16"


def test_throughput_frame_types_an_empty_table() -> None:
    empty = throughput_frame([])
    assert list(empty.columns) == list(COLUMNS) and len(empty) == 0
    assert str(empty["PP"].dtype) == "Int64" and empty["S_TG"].dtype == np.float64
    one = throughput_frame([{"PP": 8, "TG": 0, "T_PP": 0.5}])
    assert one.loc[0, "skip_reason"] == "" and math.isnan(one.loc[0, "S_TG"])
