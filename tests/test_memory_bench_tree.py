"""The whole-run memory figure (``python -m harness.perf.memory_bench --whole-run``) counts every
process of a run's tree: the llama.cpp worker and converter are children of the harness."""

from __future__ import annotations

import sys

import pytest

from harness.checks.cases import CASES_DIR
from harness.perf.memory_bench import main, process_tree, run_sampled, whole_run_verdict

MB = 2**20
# A parent that starts a child holding 300 MB for a second, itself holding almost nothing.
GRANDCHILD = (
    "import subprocess, sys; subprocess.run([sys.executable, '-c', "
    "'import time; b = bytearray(300 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); "
    "time.sleep(1.0)'], check=True)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_childs_memory_counts_in_the_tree_peak() -> None:
    r = run_sampled([sys.executable, "-c", GRANDCHILD], interval=0.05)
    assert r["exit_code"] == 0 and r["samples"] > 5
    assert r["peak_tree_rss"] > 300 * MB  # the child's 300 MB, which the parent's RSS never saw


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_tree_holds_the_process_and_its_descendants_only() -> None:
    import os

    tree = process_tree(os.getpid())
    assert tree[0] == os.getpid() and os.getppid() not in tree


def test_the_target_is_the_largest_single_backend_plus_one_gib() -> None:
    gib = 2**30
    alone = {"torch": 2 * gib, "mlx": 9 * gib, "llamacpp": 8 * gib}
    assert whole_run_verdict(alone, 10 * gib)["within_target"]
    miss = whole_run_verdict(alone, 10 * gib + 1)  # e.g. mlx still held when llama.cpp loads
    assert not miss["within_target"] and miss["largest_alone"] == "mlx"


def test_an_unknown_backend_is_refused(capsys: pytest.CaptureFixture) -> None:
    code = main(["--whole-run", "--backends", "torch,vllm",
                 "--case", str(CASES_DIR / "flash-mini.toml")])
    assert code == 2 and "['vllm'] not among torch, mlx, llamacpp" in capsys.readouterr().err
