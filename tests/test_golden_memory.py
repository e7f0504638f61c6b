"""A ``parity --golden`` run never holds the reference's weights: its peak RSS, in a fresh
process, stays below a direct run's by more than the checkpoint's size (the in-memory float64
reference holds 2x the float32 checkpoint; measured: 1477 MiB direct, 905 MiB golden, 378 MB
checkpoint, 64 tokens)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.checks.cases import load_case, materialize

ROOT = Path(__file__).resolve().parent.parent
CASE = ROOT / "cases" / "bench" / "ling26-100m.toml"
CHILD = ("import sys; from harness.cli.main import main; rc = main(sys.argv[1:]); "
         "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')); "
         "print('PEAK', rc, int(hwm.split()[1]) * 1024, file=sys.stderr)")


def peak_rss(*argv: str) -> int:
    """Exit code 0 asserted; the child's VmHWM in bytes."""
    env = {**os.environ, "BAILING_PARITY_PROGRESS": "off"}
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK ")), None)
    assert line is not None, proc.stderr[-2000:]
    _, rc, peak = line.split()
    assert rc == "0", proc.stderr[-2000:]
    return int(peak)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_a_golden_run_peaks_below_a_direct_run_by_more_than_the_checkpoint(tmp_path):
    ckpt = materialize(load_case(CASE))
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    golden = tmp_path / "golden"
    common = ("--checkpoint", str(ckpt), "--backends", "mlx")
    captured = peak_rss("capture", "--checkpoint", str(ckpt), "--reference-load", "memory",
                        "--out", str(golden))
    direct = peak_rss("parity", *common, "--reference-load", "memory",
                      "--out", str(tmp_path / "direct"))
    via_golden = peak_rss("parity", *common, "--golden", str(golden),
                          "--out", str(tmp_path / "via-golden"))
    assert direct - via_golden > size
    assert captured - via_golden > size
