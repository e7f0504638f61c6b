"""Peak memory of the reference on a big checkpoint: a benchmark with figures, not a timed test.

``python -m harness.perf.memory_bench --case cases/bench/flash-widths.toml --tokens 64``
materialises
the case (and, with ``--double``, a copy with twice the layers and twice the experts), then runs
each measurement in a fresh child process (so no run inherits another's peak): load the reference
(``--load streamed`` and/or ``memory``), one forward of T tokens recording the capture points,
then the child's peak RSS (``VmHWM``; ``ru_maxrss`` where /proc is missing), the time of the load
and of the forward, and the bytes the streamed reference read.  The parent measures the
checkpoint's read bandwidth cold (its pages evicted first with ``posix_fadvise(DONTNEED)``, on
these files only) and warm, and prints a table plus the JSON (``--json FILE`` keeps it).

An in-memory load whose estimated peak (float32 read copy + compute copy) exceeds 60% of the
machine's available memory is not attempted; the estimate is reported instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.core.atomic import write_text
from harness.core.errors import InputError
from references.host import available_memory, peak_rss

SAFE_FRACTION = 0.6  # of MemAvailable, for an in-memory load this benchmark will attempt
CAPTURE_CHOICES = ("all", "logits")


def derived_case(case: Any, overrides: dict[str, Any], suffix: str) -> Any:
    """``case`` with config keys replaced (named ``<name>-<suffix>``; its own cache entry)."""
    return dataclasses.replace(case, name=f"{case.name}-{suffix}",
                               config={**case.config, **overrides})


def doubled(case: Any) -> Any:
    """Twice the layers and twice the experts (the same widths, groups and top-k)."""
    cfg = case.config
    return derived_case(case, {"num_hidden_layers": 2 * cfg["num_hidden_layers"],
                               "num_experts": 2 * cfg["num_experts"]}, "x2")


def prompt_tokens(case: Any, n: int) -> list[int]:
    """The first ``n`` tokens of the case's first prompt, continued by seeded random ids."""
    import numpy as np

    tokens = list(case.prompts[0].tokens)[:n]
    rng = np.random.default_rng(n)
    tokens += rng.integers(0, case.config["vocab_size"], size=n - len(tokens)).tolist()
    return tokens


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))


def evict(ckpt: Path) -> None:
    """Drop this checkpoint's pages from the page cache (these files only)."""
    for p in Path(ckpt).glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(ckpt: Path, limit: int = 4 * 2**30, cold: bool = True) -> float:
    """Bytes per second reading the checkpoint's files sequentially (up to ``limit`` bytes)."""
    if cold:
        evict(ckpt)
    buf = bytearray(16 * 2**20)
    view = memoryview(buf)
    done, start = 0, time.perf_counter()
    for p in sorted(Path(ckpt).glob("*.safetensors")):
        with open(p, "rb", buffering=0) as fh:
            while done < limit:
                n = fh.readinto(view)
                if not n:
                    break
                done += n
        if done >= limit:
            break
    return done / max(time.perf_counter() - start, 1e-9)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    from harness.core import capture_points
    from references.model import BailingHybridReference, ReferenceOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    base = peak_rss()
    t0 = time.perf_counter()
    model = BailingHybridReference.from_checkpoint(
        Path(args.checkpoint), ReferenceOptions(dtype=args.dtype, load=args.load)
    )
    t_load = time.perf_counter() - t0
    after_load = peak_rss()
    points = (capture_points.all_points(model.n_layers, mtp=model.mtp is not None)
              if args.captures == "all" else ["result_output"])
    tokens = json.loads(args.tokens)
    t1 = time.perf_counter()
    with torch.no_grad():
        caps = model.start(points).feed(tokens)
    t_fwd = time.perf_counter() - t1
    reads = model.weight_reads
    return {
        "load": model.load_mode, "dtype": args.dtype, "tokens": len(tokens),
        "captures": args.captures, "capture_bytes": sum(a.nbytes for a in caps.values()),
        "peak_rss": peak_rss(), "rss_after_imports": base, "rss_after_load": after_load,
        "load_s": t_load, "forward_s": t_fwd,
        "bytes_read": reads.bytes_read if reads is not None else None,
        "reads": len(reads.log) if reads is not None else None,
        "threads": torch.get_num_threads(),
    }


def measure(ckpt: Path, tokens: list[int], load: str, dtype: str, captures: str,
            cold: bool, threads: int = 0) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and return its figures."""
    if cold:
        evict(ckpt)
    cmd = [sys.executable, "-m", "harness.perf.memory_bench", "--child", "--checkpoint", str(ckpt),
           "--load", load, "--dtype", dtype, "--captures", captures,
           "--tokens-json", json.dumps(tokens), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"measurement failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_memory_estimate(ckpt: Path, dtype: str) -> int:
    import numpy as np
    import torch

    from references.checkpoint_io import planned_tensors
    from references.config import load_config
    from references.model import TORCH_DTYPES
    from references.weights import in_memory_bytes

    _, shapes = planned_tensors(ckpt, load_config(ckpt))
    n = sum(int(np.prod(s)) for s in shapes.values())
    return in_memory_bytes(n, TORCH_DTYPES.get(dtype, torch.float64))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from harness.checks.cases import load_case, materialize

    case = load_case(Path(args.case))
    cases = [case] + ([doubled(case)] if args.double else [])
    tokens = prompt_tokens(case, args.tokens)
    out: dict[str, Any] = {"case": case.name, "tokens": args.tokens, "rows": []}
    for c in cases:
        t0 = time.perf_counter()
        ckpt = materialize(c)
        wrote = time.perf_counter() - t0
        size = checkpoint_bytes(ckpt)
        entry: dict[str, Any] = {"case": c.name, "checkpoint": str(ckpt), "bytes": size,
                                 "materialize_s": wrote,
                                 "layers": c.config["num_hidden_layers"],
                                 "experts": c.config["num_experts"]}
        entry["bandwidth_cold"] = read_bandwidth(ckpt, cold=True)
        entry["bandwidth_warm"] = read_bandwidth(ckpt, cold=False)
        for load in args.load:
            if load == "memory":
                need = in_memory_estimate(ckpt, args.dtype)
                if need > SAFE_FRACTION * available_memory():
                    entry["memory"] = {"skipped": True, "estimated_peak": need}
                    continue
            for captures in args.captures:
                key = f"{load}/{captures}"
                entry[key] = measure(ckpt, tokens, load, args.dtype, captures, args.cold,
                                     args.threads)
                print(_line(c.name, key, entry[key]), flush=True)
        out["rows"].append(entry)
    return out


def _line(case: str, key: str, r: dict[str, Any]) -> str:
    gb = 1e9
    read = f"{r['bytes_read'] / gb:.2f} GB read" if r.get("bytes_read") is not None else ""
    return (f"{case:24s} {key:16s} peak {r['peak_rss'] / gb:6.2f} GB  load {r['load_s']:6.1f} s  "
            f"forward {r['forward_s']:6.1f} s  {read}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.perf.memory_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="cases/bench/flash-widths.toml")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--load", default="streamed", help="comma list of streamed,memory")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--captures", default="all",
                    help="comma list: all (every capture point, as parity runs) or logits")
    ap.add_argument("--double", action="store_true",
                    help="also a copy with twice the layers and twice the experts")
    ap.add_argument("--cold", action="store_true",
                    help="evict the checkpoint's pages before each measurement")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in each measurement (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    # child side
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--tokens-json", dest="tokens_json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.tokens = args.tokens_json
        print(json.dumps(child(args)))
        return 0
    args.load = [x for x in args.load.split(",") if x]
    args.captures = [x for x in args.captures.split(",") if x]
    bad = [x for x in args.load if x not in ("streamed", "memory")] + [
        x for x in args.captures if x not in CAPTURE_CHOICES]
    if bad:
        print(f"error: unknown --load/--captures value(s) {bad}", file=sys.stderr)
        return 2
    try:
        figures = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        write_text(args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
