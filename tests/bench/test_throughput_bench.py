"""pytest-benchmark throughput tests: prefill and decode per backend x case x prompt length.

Cheap by default (flash-mini, PP 32, TG 4) so a plain ``pytest tests`` stays fast; widen with
``BENCH_PP=128,512,2048 BENCH_TG=32 BENCH_ROUNDS=5``.  Backends and cases follow the harness's
``--backends`` / ``--cases`` options (cases default to flash-mini here).  Save and compare runs:
``pytest tests/bench --benchmark-only --benchmark-autosave`` then ``--benchmark-compare``.
Each result's ``extra_info`` holds ``tok/s`` (from the median round), PP, TG and the build.

torch runs on ``BENCH_TORCH_THREADS`` intra-op threads (default 1: on a shared machine torch's
OpenMP threads waiting for a busy core make it 10x slower and erratic; 0 keeps torch's default).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from harness.backends.base import LoadedModel
from harness.cases import load_cases, materialize
from harness.sweep import build_string
from harness.targets import Target, get_backend, parse_targets

PP = [int(p) for p in os.environ.get("BENCH_PP", "32").split(",") if p.strip()]
TG = int(os.environ.get("BENCH_TG", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
TORCH_THREADS = int(os.environ.get("BENCH_TORCH_THREADS", "1"))
DEFAULT_CASES = "flash-mini"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise by target x case x PP from the harness options and the BENCH_* variables."""
    if "bench_target" not in metafunc.fixturenames:
        return
    targets = parse_targets(metafunc.config.getoption("--backends", default="torch,mlx"))
    cases = metafunc.config.getoption("--cases", default="") or DEFAULT_CASES
    metafunc.parametrize("bench_target", targets, ids=[t.label for t in targets], scope="module")
    metafunc.parametrize("bench_case", [c.strip() for c in cases.split(",") if c.strip()],
                         scope="module")
    metafunc.parametrize("pp", PP, ids=[f"pp{p}" for p in PP])


_MODELS: dict[tuple[Target, str], LoadedModel] = {}


@pytest.fixture(scope="module", autouse=True)
def torch_threads() -> Iterator[int]:
    """torch's thread count for these benchmarks, restored afterwards for the other tests."""
    import torch

    before = torch.get_num_threads()
    if TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(bench_target: Target, bench_case: str) -> LoadedModel:
    """The case's checkpoint loaded once per target (skipped where the backend cannot run)."""
    backend = get_backend(bench_target.backend)
    availability = backend.availability()
    if not availability.ok:
        pytest.skip(f"{bench_target.label} unavailable: {availability.reason}")
    key = (bench_target, bench_case)
    if key not in _MODELS:
        case = load_cases([bench_case])[0]
        _MODELS[key] = backend.load(materialize(case), bench_target.options())
    return _MODELS[key]


def _tokens(bench_case: str, pp: int) -> list[int]:
    vocab = int(load_cases([bench_case])[0].config["vocab_size"])
    return np.random.default_rng([0, pp]).integers(0, vocab, pp).tolist()


def _record(benchmark: Any, target: Target, case: str, pp: int, tg: int, tokens: int) -> None:
    """tok/s from the median round (absent when benchmarks are disabled and nothing is timed)."""
    import torch

    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    benchmark.extra_info.update({
        "target": target.label, "case": case, "PP": pp, "TG": tg,
        "build": build_string(target.backend),
        "tok/s": tokens / median if median else None,
    })
    if target.backend == "torch":
        benchmark.extra_info["torch_threads"] = torch.get_num_threads()


def test_prefill(benchmark, loaded, bench_target: Target, bench_case: str, pp: int) -> None:
    """PP tokens in one feed of a fresh session (no capture points)."""
    tokens = _tokens(bench_case, pp)
    result = benchmark.pedantic(lambda: loaded.start().feed(tokens)["result_output"],
                                rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert result.shape[0] == pp
    _record(benchmark, bench_target, bench_case, pp, 0, pp)


def test_decode(benchmark, loaded, bench_target: Target, bench_case: str, pp: int) -> None:
    """TG greedy single-token steps after a PP-token prefill (the prefill is not timed)."""
    tokens = _tokens(bench_case, pp)

    def prefill() -> tuple[tuple[Any, int], dict[str, Any]]:
        session = loaded.start()
        first = int(np.argmax(session.feed(tokens)["result_output"][-1]))
        return (session, first), {}

    def decode(session: Any, token: int) -> list[int]:
        out = []
        for _ in range(TG):
            token = int(np.argmax(session.feed([token])["result_output"][-1]))
            out.append(token)
        return out

    generated = benchmark.pedantic(decode, setup=prefill, rounds=ROUNDS, warmup_rounds=1)
    assert len(generated) == TG
    _record(benchmark, bench_target, bench_case, pp, TG, TG)
