"""A case's known port failures are strict xfails: a wrong port must fail every check of it.

The one exception is a quantized port's greedy check: it is compared with the reference on the
port's own weights under the mutual-top-k rule, where a near tie may keep a wrong port's tokens,
so there an XPASS is no failure (the same port's prefill and decode items stay strict).
"""

from __future__ import annotations

import pytest

from harness.checks.cases import CASES_DIR


def _xfail_strictness(monkeypatch: pytest.MonkeyPatch, backends: str, modes: str
                      ) -> dict[tuple[str, str], bool]:
    from harness.pytest_plugin.plugin import ParityItem

    monkeypatch.chdir(CASES_DIR.parent)
    found: dict[tuple[str, str], bool] = {}

    class Grab:
        def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
            for item in items:
                if isinstance(item, ParityItem):
                    mark = item.get_closest_marker("xfail")
                    assert mark is not None, item.nodeid  # every item of this case is known
                    found[(item.candidate.label, item.mode)] = mark.kwargs["strict"]

    code = pytest.main(["cases", "--collect-only", "-q", "-p", "no:cacheprovider", "--cases",
                        "flash-mini-hf-slope", "--backends", backends, "--modes", modes],
                       plugins=[Grab()])
    assert code == pytest.ExitCode.OK
    return found


def test_known_failures_are_strict_but_a_quantized_ports_greedy_check(monkeypatch):
    strict = _xfail_strictness(monkeypatch, "llamacpp,llamacpp:quant=Q4_K_M,mlx:bits=4",
                               "prefill,decode,greedy")
    quantized = {label for label, _ in strict if label != "llamacpp-float32"}
    assert strict[("llamacpp-float32", "greedy")]
    for label in quantized:
        assert strict[(label, "prefill")] and strict[(label, "decode")]
        assert not strict[(label, "greedy")]
    assert len(quantized) == 2
