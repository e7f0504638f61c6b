"""Progress of long work: plain lines for logs (one at once, then at most one per interval, one
at the end), parsers for the build's ninja steps and the converter's tensors, and a log follower
that turns a growing child log into progress."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from harness.core.progress import (
    MODE_ENV,
    Event,
    Progress,
    converter_tensor,
    follow_log,
    ninja_step,
)


@pytest.fixture(autouse=True)
def plain(monkeypatch):
    monkeypatch.setenv(MODE_ENV, "plain")


def test_plain_mode_says_started_at_once_and_done_at_the_end():
    out = io.StringIO()
    with Progress("building llama.cpp", stream=out, interval_s=3600) as p:
        p.update(completed=5, total=10, status="ggml.c")  # within the interval: silent
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[building llama.cpp] started")
    assert lines[-1].startswith("[building llama.cpp] done ggml.c")
    assert len(lines) == 2


def test_plain_mode_reports_the_percentage_once_the_interval_passed():
    out = io.StringIO()
    with Progress("x", total=4, stream=out, interval_s=0) as p:
        p.update(completed=1, status="a.cpp")
    assert "[x] 25% a.cpp" in out.getvalue()


def test_a_failure_inside_is_reported_as_stopped():
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress("x", stream=out):
        raise RuntimeError
    assert out.getvalue().splitlines()[-1].startswith("[x] stopped")


def test_off_prints_nothing(monkeypatch):
    monkeypatch.setenv(MODE_ENV, "off")
    out = io.StringIO()
    with Progress("x", stream=out) as p:
        p.update(completed=1, total=2)
    assert out.getvalue() == ""


def test_ninja_steps_give_done_total_and_the_source_file():
    line = "  [12/140] /usr/bin/g++ -O3 -c /src/llama.cpp/src/llama-model.cpp -o x.o"
    assert ninja_step(line) == Event("llama-model.cpp", 12, 140)
    assert ninja_step("-- Configuring done") is None


def test_converter_lines_name_the_tensor_written():
    line = "INFO:hf-to-gguf:blk.0.attn_norm.weight,   torch.float32 --> F32, shape = {48}"
    assert converter_tensor(line) == Event("blk.0.attn_norm.weight", count=True)
    assert converter_tensor("INFO:hf-to-gguf:Loading model: x") is None


def test_follow_log_turns_a_growing_log_into_progress(tmp_path: Path):
    log = tmp_path / "build.log"
    log.write_text("")
    out = io.StringIO()
    with (Progress("build", stream=out, interval_s=3600) as p,
          follow_log(log, p, ninja_step, poll_s=0.01),
          log.open("a") as fh):
        fh.write("[1/4] g++ -c a.cpp\n[2/4] g++ -c b.cpp\n[3/4] g++ -c c")  # last unfinished
        fh.flush()
        time.sleep(0.1)
    assert (p.completed, p.total, p.status) == (2, 4, "b.cpp")


def test_the_build_log_gives_stages_then_compile_steps():
    from harness.llamacpp.build import build_event

    assert build_event("  Installing build dependencies: started").status == (
        "installing build dependencies")
    assert build_event("  -- Configuring done (3.1s)").status == "cmake: configuring"
    assert build_event("  [7/140] /usr/bin/gcc -c ggml.c -o ggml.o") == Event("ggml.c", 7, 140)
    assert build_event("  warning: unused variable") is None


def test_a_build_command_shows_progress_while_it_runs(tmp_path, capfd):
    from harness.llamacpp.build import _run, build_event

    script = "echo '-- Configuring done'; echo '[1/2] cc -c a.c'; echo '[2/2] cc -c b.c'"
    _run(["sh", "-c", script], log=tmp_path / "build.log", what="building x",
         watch=build_event)
    err = capfd.readouterr().err.splitlines()
    assert err[0].startswith("[building x] started")
    assert err[-1].startswith("[building x] done b.c")


def test_a_forward_shows_layer_progress_only_once_it_runs_long():
    from harness.core.progress import LayerProgress

    quick, slow = io.StringIO(), io.StringIO()
    fast = LayerProgress("forward", after_s=3600, stream=quick)
    for layer in range(1, 5):
        fast(layer, 4)
    assert quick.getvalue() == ""
    long = LayerProgress("forward", after_s=0, stream=slow)
    for layer in range(1, 5):
        long(layer, 4)
    lines = slow.getvalue().splitlines()
    assert lines[0].startswith("[forward] started") and lines[-1].startswith("[forward] done")


def test_the_streamed_reference_reports_its_layers(tmp_path):
    from harness.checks.cases import CASES_DIR, load_case, materialize
    from references.model import BailingHybridReference, ReferenceOptions

    model = BailingHybridReference.from_checkpoint(
        materialize(load_case(CASES_DIR / "flash-mini.toml")), ReferenceOptions(load="streamed"))
    seen = []
    model.layer_done = lambda done, total: seen.append((done, total))
    model.start().feed([1, 2, 3])
    assert seen == [(i, model.n_layers) for i in range(1, model.n_layers + 1)]
