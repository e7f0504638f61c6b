"""Specification of the importers: other tools' throughput output becomes sweep rows, exactly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from harness.core.errors import InputError
from harness.perf.bench_import import (
    batched_bench_header,
    format_batched_bench_row,
    import_file,
    import_text,
    parse_import_spec,
    to_batched_bench_markdown,
)
from harness.perf.sweep import COLUMNS

# llama-batched-bench -m flash-mini-f32.gguf -c 16384 -npp 128,512,2048 -ntg 32 -npl 1,2,4
BATCHED_BENCH = """\
llama_context: n_ctx_per_seq = 16384
main: n_kv_max = 16384, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |     32 |    1 |    160 |    0.006 | 20688.91 |    0.017 |  1865.82 |    0.023 |  6855.91 |
|   128 |     32 |    2 |    320 |    0.012 | 20523.78 |    0.020 |  3237.01 |    0.032 |  9924.13 |
|   128 |     32 |    4 |    640 |    0.025 | 20211.18 |    0.022 |  5822.90 |    0.047 | 13526.46 |
|   512 |     32 |    1 |    544 |    0.027 | 19228.32 |    0.018 |  1752.75 |    0.045 | 12120.01 |
|   512 |     32 |    2 |   1088 |    0.054 | 18940.14 |    0.020 |  3163.93 |    0.074 | 14644.70 |
|   512 |     32 |    4 |   2176 |    0.113 | 18127.58 |    0.024 |  5430.60 |    0.137 | 15935.89 |
|  2048 |     32 |    1 |   2080 |    0.149 | 13722.97 |    0.021 |  1522.16 |    0.170 | 12216.49 |
|  2048 |     32 |    2 |   4160 |    0.295 | 13884.15 |    0.024 |  2703.14 |    0.319 | 13053.48 |
|  2048 |     32 |    4 |   8320 |    0.590 | 13887.63 |    0.028 |  4508.22 |    0.618 | 13456.90 |

llama_perf_context_print:        load time =      41.27 ms
llama_perf_context_print: prompt eval time =       0.00 ms /     1 tokens (    0.00 ms per token)
"""  # noqa: E501

BATCHED_BENCH_JSONL = """\
{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0, "is_pp_shared": 0, \
"n_gpu_layers": 99, "n_threads": 8, "n_threads_batch": 8, "pp": 128, "tg": 128, "pl": 1, \
"n_kv": 256, "t_pp": 0.233810, "speed_pp": 547.453064, "t_tg": 3.503684, "speed_tg": 36.532974, \
"t": 3.737494, "speed": 68.495094}
{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0, "is_pp_shared": 0, \
"n_gpu_layers": 99, "n_threads": 8, "n_threads_batch": 8, "pp": 128, "tg": 128, "pl": 2, \
"n_kv": 512, "t_pp": 0.422602, "speed_pp": 605.770935, "t_tg": 11.106112, "speed_tg": 23.050371, \
"t": 11.528713, "speed": 44.410854}
"""

# llama-bench -m flash-mini-q8_0.gguf -p 512 -n 128 -pg 512,128 -d 0,4096 -r 5
LLAMA_BENCH = """\
| model                          |       size |     params | backend    | threads |            test |                  t/s |
| ------------------------------ | ---------: | ---------: | ---------- | ------: | --------------: | -------------------: |
| bailinghybrid ?B Q8_0          |   1.91 MiB |     1.80 M | CPU        |       2 |           pp512 |    28563.12 ± 412.77 |
| bailinghybrid ?B Q8_0          |   1.91 MiB |     1.80 M | CPU        |       2 |           tg128 |      2412.50 ± 35.02 |
| bailinghybrid ?B Q8_0          |   1.91 MiB |     1.80 M | CPU        |       2 |     pp512+tg128 |      8410.93 ± 60.31 |
| bailinghybrid ?B Q8_0          |   1.91 MiB |     1.80 M | CPU        |       2 |   pp512 @ d4096 |    17804.40 ± 250.11 |
| bailinghybrid ?B Q8_0          |   1.91 MiB |     1.80 M | CPU        |       2 |   tg128 @ d4096 |      1733.08 ± 12.90 |

build: 0c1e5709 (7123)
"""  # noqa: E501

LLAMA_BENCH_JSON = [
    {
        "build_commit": "0c1e5709", "build_number": 7123, "cpu_info": "AMD EPYC 9B14",
        "gpu_info": "", "backends": "CPU", "model_filename": "flash-mini-f32.gguf",
        "model_type": "bailinghybrid ?B all F32", "model_size": 7200000,
        "model_n_params": 1800000, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
        "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99, "flash_attn": -1,
        "n_prompt": 512, "n_gen": 0, "n_depth": 0, "test_time": "2026-01-10T11:58:50Z",
        "avg_ns": 20000000, "stddev_ns": 1000000, "avg_ts": 25641.025641, "stddev_ts": 1280.5,
        "samples_ns": [19000000, 21000000, 20000000],
        "samples_ts": [26947.4, 24381.0, 25600.0],
    },
    {
        "build_commit": "0c1e5709", "build_number": 7123, "cpu_info": "AMD EPYC 9B14",
        "gpu_info": "", "backends": "CPU", "model_filename": "flash-mini-f32.gguf",
        "model_type": "bailinghybrid ?B all F32", "model_size": 7200000,
        "model_n_params": 1800000, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
        "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99, "flash_attn": -1,
        "n_prompt": 0, "n_gen": 128, "n_depth": 4096, "test_time": "2026-01-10T11:58:52Z",
        "avg_ns": 64000000, "stddev_ns": 500000, "avg_ts": 2000.1, "stddev_ts": 15.6,
        "samples_ns": [63500000, 64500000],
        "samples_ts": [2015.7, 1984.5],
    },
]  # fmt: skip

MLX_GENERATE = """\
==========
Prompt: 512 tokens, 1932.418 tokens-per-sec
Generation: 128 tokens, 241.067 tokens-per-sec
Peak memory: 0.046 GB
"""

MLX_BENCHMARK = """\
Running warmup..
Timing with prompt_tokens=2048, generation_tokens=128, batch_size=1.
Trial 1:  prompt_tps=1035.117, generation_tps=207.311, peak_memory=0.301, total_time=2.612
Trial 2:  prompt_tps=1030.020, generation_tps=156.002, peak_memory=0.302, total_time=2.811
Trial 3:  prompt_tps=1041.559, generation_tps=210.950, peak_memory=0.301, total_time=2.590
Averages: prompt_tps=1035.565, generation_tps=191.421, peak_memory=0.301
"""


def table_lines(text: str) -> list[str]:
    """The data rows of a batched-bench table (a number in the first cell)."""
    return [line for line in text.splitlines() if re.match(r"^\|\s+\d", line)]


def test_every_batched_bench_row_is_imported_and_reprints_exactly() -> None:
    df = import_text(BATCHED_BENCH, "llama-batched-bench", "llamacpp-f32", case="flash-mini")
    original = table_lines(BATCHED_BENCH)
    assert len(df) == len(original) == 9
    assert [format_batched_bench_row(r) for _, r in df.iterrows()] == original
    assert batched_bench_header() in BATCHED_BENCH  # header and rule line, byte for byte
    assert list(df.columns) == list(COLUMNS)
    assert sorted(set(df["B"])) == [1, 2, 4]


def test_batched_bench_cells_are_the_printed_values() -> None:
    df = import_text(BATCHED_BENCH, "batched-bench", "llamacpp-f32", case="flash-mini")
    row = df.iloc[5]  # | 512 | 32 | 4 | 2176 | 0.113 | 18127.58 | 0.024 | 5430.60 | ...
    assert (row["PP"], row["TG"], row["B"], row["N_KV"]) == (512, 32, 4, 2176)
    assert (row["T_PP"], row["S_PP"], row["T_TG"], row["S_TG"]) == (0.113, 18127.58, 0.024, 5430.6)
    assert (row["T"], row["S"]) == (0.137, 15935.89)
    assert (row["source"], row["backend"], row["target"]) == (
        "llama-batched-bench", "llamacpp", "llamacpp-f32")
    assert row["dtype"] == "f32" and row["case"] == "flash-mini" and row["skip_reason"] == ""
    assert "n_kv_max = 16384" in row["detail"] and "n_threads = 2" in row["detail"]


def test_batched_bench_jsonl_keeps_full_precision() -> None:
    df = import_text(BATCHED_BENCH_JSONL, "llama-batched-bench", "llamacpp")
    assert list(df["B"]) == [1, 2]
    assert df.loc[1, "T_TG"] == 11.106112 and df.loc[1, "S_TG"] == 23.050371
    assert df.loc[0, "N_KV"] == 256 and df.loc[0, "S"] == 68.495094
    assert "is_pp_shared = 0" in df.loc[0, "detail"]


def test_llama_bench_markdown_maps_tests_onto_pp_tg_and_depth() -> None:
    df = import_text(LLAMA_BENCH, "llama-bench", "llamacpp-q8_0", case="flash-mini")
    assert list(zip(df["PP"], df["TG"], df["depth"], strict=True)) == [
        (512, 0, 0), (0, 128, 0), (512, 128, 0), (512, 0, 4096), (0, 128, 4096)]
    pp, tg, pg, pp_deep, tg_deep = (df.iloc[i] for i in range(5))
    assert (pp["S_PP"], pp["S_PP_std"]) == (28563.12, 412.77)
    assert pp["T_PP"] == pytest.approx(512 / 28563.12) and math.isnan(pp["S_TG"])
    assert (tg["S_TG"], tg["S_TG_std"]) == (2412.50, 35.02)
    assert pg["S"] == 8410.93 and math.isnan(pg["S_PP"]) and math.isnan(pg["S_TG"])
    assert pp_deep["N_KV"] == 4608 and tg_deep["N_KV"] == 4224
    assert set(df["build"]) == {"llama.cpp 0c1e5709 (7123)"}
    assert set(df["dtype"]) == {"q8_0"} and "threads=2" in tg["detail"]


def test_every_llama_bench_speed_cell_round_trips() -> None:
    df = import_text(LLAMA_BENCH, "llama-bench", "llamacpp-q8_0")
    cells = [line.split("|")[-2].strip() for line in LLAMA_BENCH.splitlines()
             if "bailinghybrid" in line]
    for cell, (_, r) in zip(cells, df.iterrows(), strict=True):
        avg, std = cell.split(" ± ")
        speed = "S" if r["PP"] and r["TG"] else ("S_PP" if r["PP"] else "S_TG")
        assert f"{r[speed]:.2f}" == avg
        if speed != "S":  # a pp+tg run has one speed for both phases
            assert f"{r[speed + '_std']:.2f}" == std
        assert f"t/s={cell}" in r["detail"]  # the cell itself is kept


def test_llama_bench_json_times_come_from_the_samples() -> None:
    df = import_text(json.dumps(LLAMA_BENCH_JSON, indent=2), "llama-bench", "llamacpp-f32")
    pp, tg = df.iloc[0], df.iloc[1]
    assert pp["T_PP"] == 0.02 and pp["S_PP"] == 25641.025641 and pp["repeats"] == 3
    assert pp["T_PP_spread"] == pytest.approx(0.002)
    assert (tg["TG"], tg["depth"], tg["N_KV"]) == (128, 4096, 4224)
    assert tg["T_TG"] == 0.064 and tg["S_TG_std"] == 15.6
    assert pp["build"] == "llama.cpp 0c1e5709 (7123)" and pp["machine"] == "AMD EPYC 9B14"
    jsonl = "\n".join(json.dumps(o) for o in LLAMA_BENCH_JSON)
    assert import_text(jsonl, "llama-bench", "llamacpp-f32").equals(df)


def test_mlx_lm_generate_statistics_become_one_row() -> None:
    df = import_text(MLX_GENERATE, "mlx-lm", "mlx-float32", case="flash-mini")
    row = df.iloc[0]
    assert (row["PP"], row["TG"], row["B"], row["N_KV"]) == (512, 128, 1, 640)
    assert row["S_PP"] == pytest.approx(1932.418) and row["S_TG"] == pytest.approx(241.067)
    assert row["T_PP"] == pytest.approx(512 / 1932.418)
    assert row["peak_backend_mb"] == pytest.approx(0.046e9 / 2**20)
    assert row["source"] == "mlx-lm" and row["dtype"] == "float32"


def test_mlx_lm_benchmark_trials_are_summarised_by_their_median() -> None:
    df = import_text(MLX_BENCHMARK, "mlx-lm", "mlx-float32")
    row = df.iloc[0]
    assert len(df) == 1 and row["repeats"] == 3 and (row["PP"], row["TG"]) == (2048, 128)
    assert row["S_PP"] == pytest.approx(1035.117)  # the median trial, not the printed average
    assert row["S_TG"] == pytest.approx(207.311)
    assert row["T_TG_spread"] == pytest.approx(128 / 156.002 - 128 / 210.950)
    assert row["peak_backend_mb"] == pytest.approx(0.302e9 / 2**20)


def test_our_rows_print_in_batched_bench_layout() -> None:
    df = import_text(BATCHED_BENCH, "llama-batched-bench", "llamacpp-f32")
    printed = to_batched_bench_markdown(df).splitlines()
    assert printed[0] == "llamacpp-f32 · llama-batched-bench"  # which rows these are
    assert printed[3:] == table_lines(BATCHED_BENCH)


def test_import_specs_and_bad_input_name_the_problem(tmp_path: Path) -> None:
    assert parse_import_spec("bb.txt:llama-batched-bench:llamacpp-f32") == (
        Path("bb.txt"), "llama-batched-bench", "llamacpp-f32", "")
    assert parse_import_spec("C:/x/bb.txt:batched-bench:llamacpp:flash-mini") == (
        Path("C:/x/bb.txt"), "llama-batched-bench", "llamacpp", "flash-mini")
    assert parse_import_spec("lb.md:llama-bench:llamacpp-float32:outtype=q8_0:flash-mini") == (
        Path("lb.md"), "llama-bench", "llamacpp-float32:outtype=q8_0", "flash-mini")
    quantised = import_text(LLAMA_BENCH, "llama-bench", "llamacpp-float32:outtype=q8_0")
    assert set(quantised["dtype"]) == {"q8_0"} and set(quantised["backend"]) == {"llamacpp"}
    with pytest.raises(InputError, match="FILE:KIND:TARGET"):
        parse_import_spec("bb.txt:perf:llamacpp")
    with pytest.raises(InputError, match="unknown import kind"):
        import_text(BATCHED_BENCH, "perf", "llamacpp")
    empty = tmp_path / "empty.txt"
    empty.write_text("nothing to see\n")
    with pytest.raises(InputError, match=r"empty\.txt: no llama-bench results"):
        import_file(empty, "llama-bench", "llamacpp")
    with pytest.raises(InputError, match=r"missing\.txt"):
        import_file(tmp_path / "missing.txt", "mlx-lm", "mlx")
