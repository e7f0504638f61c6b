"""``pytest --benchmark``: throughput items per case × backend × (PP, TG) grid point.

Each grid point is two items timed by pytest-benchmark's own ``benchmark`` fixture, so its
options work unchanged (``--benchmark-json``, ``--benchmark-autosave``, ``--benchmark-compare``,
``--benchmark-compare-fail``): ``prefill`` (PP seeded tokens in one feed of a fresh session) and
``decode`` (TG greedy single-token steps after an untimed PP-token prefill).  At the end of the
session the rounds of both are folded into the sweep's table (llama-batched-bench's columns, the
decode roofline; a quantized candidate's from the bytes of its own files), written with the
report by the plugin.  Sessions are opened with no capture points; models load once per
(target, case) and are released when the case is done.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest

from harness.backends.base import LoadedModel
from harness.backends.targets import Target, get_backend
from harness.checks.cases import Case, materialize
from harness.core.errors import InputError
from harness.perf.roofline import measure_bandwidth_gbs
from harness.perf.sweep import (
    ModelShape,
    fill_roofline,
    machine_description,
    measured_row,
    point_base,
    throughput_frame,
    use_candidate_bytes,
)

STEPS = ("prefill", "decode")


@dataclass(frozen=True)
class BenchGrid:
    """The grid every case is measured on (``--bench-pp``, ``--bench-tg``, ``--bench-rounds``)."""

    prompt_lengths: tuple[int, ...] = (32,)
    tg: int = 4
    rounds: int = 3
    seed: int = 0

    @classmethod
    def parse(cls, pp: str, tg: int, rounds: int) -> BenchGrid:
        try:
            lengths = tuple(int(v) for v in pp.split(",") if v.strip())
        except ValueError:
            raise InputError(f"--bench-pp: expected comma-separated integers, got {pp!r}") from None
        if not lengths or min(lengths) < 1:
            raise InputError(f"--bench-pp: expected positive integers, got {pp!r}")
        if tg < 1 or rounds < 1:
            raise InputError(f"--bench-tg and --bench-rounds must be >= 1 (got {tg}, {rounds})")
        return cls(lengths, tg, rounds)


@dataclass
class BenchSession:
    """Loaded models and the timed rounds of every item, for the sweep table at the end."""

    grid: BenchGrid
    models: dict[tuple[Target, str], LoadedModel] = field(default_factory=dict)
    # (target label, case, PP, step) -> seconds of each timed round (decode: all TG steps)
    rounds: dict[tuple[str, str, int, str], list[float]] = field(default_factory=dict)
    bases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def model(self, target: Target, case: Case) -> LoadedModel:
        key = (target, case.name)
        if key not in self.models:
            backend = get_backend(target.backend)
            availability = backend.availability()
            if not availability.ok:
                pytest.skip(f"{target.label} unavailable: {availability.reason}")
            self.models[key] = backend.load(materialize(case), target.options())
        return self.models[key]

    def release(self, case: str) -> None:
        """Free every model of a case once its items are done (one case in memory at a time)."""
        for key in [k for k in self.models if k[1] == case]:
            close = getattr(self.models.pop(key), "close", None)
            if callable(close):
                close()

    def record(self, target: Target, case: Case, pp: int, step: str, data: Sequence[float],
               machine: str) -> None:
        self.rounds[(target.label, case.name, pp, step)] = list(data)
        if (target.label, case.name) not in self.bases:
            self.bases[(target.label, case.name)] = point_base(
                target, case, machine, float("nan"),
                f"pytest-benchmark rounds={self.grid.rounds}, seed={self.grid.seed}",
                source="pytest-benchmark")
            # a quantized candidate: the bytes of its own files (built when the model loaded)
            use_candidate_bytes(self.bases[(target.label, case.name)], target, case)

    def frame(self, cases: dict[str, Case], bandwidth_gbs: float | None = None) -> pd.DataFrame:
        """The sweep's table from every grid point whose prefill and decode were both timed."""
        rows = []
        for (label, case, pp, step), pre in self.rounds.items():
            if step != "prefill" or (label, case, pp, "decode") not in self.rounds:
                continue
            dec = self.rounds[(label, case, pp, "decode")]
            rows.append(measured_row(self.bases[(label, case)], pp, self.grid.tg, pre, dec))
        df = throughput_frame(rows)
        if df.empty:
            return df
        bandwidth = bandwidth_gbs if bandwidth_gbs else measure_bandwidth_gbs()
        configs = {n: s.config for n, c in cases.items() if (s := ModelShape.of(c)).config}
        df["bandwidth_gbs"] = np.nan
        df["roofline_tgs"] = np.nan
        return fill_roofline(df, bandwidth, configs)


def tokens_for(case: Case, pp: int, seed: int) -> list[int]:
    vocab = int(case.config["vocab_size"])
    return np.random.default_rng([seed, pp]).integers(0, vocab, pp).tolist()


def _prefill(benchmark: Any, session: BenchSession, target: Target, case: Case, pp: int) -> None:
    model = session.model(target, case)
    tokens = tokens_for(case, pp, session.grid.seed)
    logits = benchmark.pedantic(lambda: model.start().feed(tokens)["result_output"],
                                rounds=session.grid.rounds, iterations=1, warmup_rounds=1)
    assert logits.shape[0] == pp, f"{target.label} returned {logits.shape[0]} rows for {pp}"
    _finish(benchmark, session, target, case, pp, "prefill", pp)


def _decode(benchmark: Any, session: BenchSession, target: Target, case: Case, pp: int) -> None:
    model = session.model(target, case)
    tokens = tokens_for(case, pp, session.grid.seed)
    tg = session.grid.tg

    def prefill() -> tuple[tuple[Any, int], dict[str, Any]]:
        s = model.start()
        return (s, int(np.argmax(s.feed(tokens)["result_output"][-1]))), {}

    def decode(s: Any, token: int) -> list[int]:
        out = []
        for _ in range(tg):
            token = int(np.argmax(s.feed([token])["result_output"][-1]))
            out.append(token)
        return out

    generated = benchmark.pedantic(decode, setup=prefill, rounds=session.grid.rounds,
                                   warmup_rounds=1)
    assert len(generated) == tg
    _finish(benchmark, session, target, case, pp, "decode", tg)


def _finish(benchmark: Any, session: BenchSession, target: Target, case: Case, pp: int,
            step: str, tokens: int) -> None:
    """tok/s in pytest-benchmark's extra_info; the rounds kept for the sweep table."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    data = list(stats.stats.data)
    machine = machine_description()
    session.record(target, case, pp, step, data, machine)
    benchmark.extra_info.update({
        "target": target.label, "case": case.name, "PP": pp,
        "TG": session.grid.tg if step == "decode" else 0, "step": step,
        "tok/s": tokens / stats.stats.median,
        "build": session.bases[(target.label, case.name)]["build"],
    })  # fmt: skip


BENCH_FUNCTIONS: dict[str, Callable[..., None]] = {"prefill": _prefill, "decode": _decode}


def bench_items(parent: pytest.File, case: Case, targets: Sequence[Target],
                session: BenchSession) -> Iterator[pytest.Function]:
    """Items ``<case>::<target>::pp<PP>-tg<TG>::<step>`` of one case file, through the ``benchmark``
    fixture of pytest-benchmark."""
    for target in targets:
        for pp in session.grid.prompt_lengths:
            for step in STEPS:
                fn = functools.partial(BENCH_FUNCTIONS[step], session=session, target=target,
                                       case=case, pp=pp)
                # the case in the name too: pytest-benchmark's tables and JSON show names only
                name = f"{case.name}::{target.label}::pp{pp}-tg{session.grid.tg}::{step}"
                item = pytest.Function.from_parent(parent, name=name, callobj=fn)
                item.add_marker(pytest.mark.benchmark_item)
                item.add_marker(pytest.mark.xdist_group(case.name))
                yield item
