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

``--whole-run`` measures what a user's parity run costs instead: each backend alone and then all
of them together, each a fresh ``python -m harness parity --checkpoint DIR --backends X --modes
prefill`` (the reference included, as in every run), as the peak of the summed RSS of its whole
process tree (the llama.cpp capture worker and converter are child processes), sampled every
50 ms from /proc.  The issue's target: the whole run peaks at no more than the largest single
backend + 1 GB (the CLI frees each candidate before the next).  The llama.cpp GGUF is converted
(or found cached) first, so no measurement includes the one-off conversion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.core.atomic import write_text
from harness.core.errors import InputError
from references.host import available_memory, peak_rss

SAFE_FRACTION = 0.6  # of MemAvailable, for an in-memory load this benchmark will attempt
CAPTURE_CHOICES = ("all", "logits")
WHOLE_RUN_BACKENDS = ("torch", "mlx", "llamacpp")
WHOLE_RUN_SLACK = 2**30  # the whole run may peak this much above its largest single backend
SAMPLE_S = 0.05  # process-tree RSS sampling interval


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


# ---------------------------------------------------------------------------------------------
# Whole runs: the summed RSS of a process tree


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant, from /proc/<pid>/stat's parent ids."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # comm may hold spaces or ")"
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_rss(root: int) -> int:
    """Bytes resident in ``root``'s process tree now: the sum of each process's RSS (pages a
    parent and child share count twice, as in the sum of ``ps``'s RSS column)."""
    page, total = _page_size(), 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
    return total


def run_sampled(cmd: list[str], interval: float = SAMPLE_S,
                env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` and sample its process tree's summed RSS every ``interval`` seconds: the
    peak, the wall time, the exit code and the output's tail."""
    if not Path("/proc/self/statm").exists():
        raise InputError("--whole-run samples process trees from /proc: Linux only")
    t0 = time.perf_counter()
    peak = samples = 0
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            samples += 1
            time.sleep(interval)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-3000:]
    return {"peak_tree_rss": peak, "wall_s": time.perf_counter() - t0, "samples": samples,
            "exit_code": proc.returncode, "tail": tail}


def parity_command(ckpt: Path, prompt: Path, backends: str, modes: str, out: Path) -> list[str]:
    """The user's parity run on ``ckpt`` (the reference included) with these candidates."""
    return [sys.executable, "-m", "harness", "parity", "--checkpoint", str(ckpt),
            "--prompt-tokens", str(prompt), "--backends", backends, "--modes", modes,
            "--out", str(out)]


def whole_run_verdict(alone: dict[str, int], together: int,
                      slack: int = WHOLE_RUN_SLACK) -> dict[str, Any]:
    """The issue's target: the whole run within ``slack`` of its largest single backend."""
    largest = max(alone, key=alone.__getitem__)
    limit = alone[largest] + slack
    return {"largest_alone": largest, "limit": limit, "together": together,
            "within_target": together <= limit}


def warm_gguf(ckpt: Path) -> float:
    """Convert the checkpoint for llama.cpp now (or find it cached): seconds spent."""
    from harness.backends.llamacpp_backend import candidate_gguf
    from harness.backends.targets import Target

    t0 = time.perf_counter()
    candidate_gguf(Target.parse("llamacpp"), ckpt)
    return time.perf_counter() - t0


def whole_run(ckpt: Path, tokens: list[int], backends: list[str], modes: str,
              threads: int = 0) -> dict[str, Any]:
    """Each backend alone, then all together; a failing run is an error (its output's tail)."""
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "BAILING_PARITY_THREADS"):
            env[var] = str(threads)
    out: dict[str, Any] = {"modes": modes, "backends": backends}
    if "llamacpp" in backends:
        out["gguf_warm_s"] = warm_gguf(ckpt)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        prompt = Path(tmp) / "prompt.json"
        prompt.write_text(json.dumps({"tokens": tokens}))
        plan = [*backends, ",".join(backends)] if len(backends) > 1 else list(backends)
        for i, chosen in enumerate(plan):
            cmd = parity_command(ckpt, prompt, chosen, modes, Path(tmp) / f"run-{i}")
            r = run_sampled(cmd, env=env)
            if r["exit_code"] not in (0, 1):  # 1: a check failed; still a run to measure
                raise RuntimeError(f"parity --backends {chosen} exited {r['exit_code']}: "
                                   f"{r['tail']}")
            runs[chosen] = {k: v for k, v in r.items() if k != "tail"}
            print(f"{chosen:24s} tree peak {r['peak_tree_rss'] / 1e9:6.2f} GB  "
                  f"wall {r['wall_s']:6.1f} s  exit {r['exit_code']}", flush=True)
    out["runs"] = runs
    if len(backends) > 1:
        out["verdict"] = whole_run_verdict({b: runs[b]["peak_tree_rss"] for b in backends},
                                           runs[",".join(backends)]["peak_tree_rss"])
    return out


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
    if args.whole_run:
        backends = [b for b in args.backends.split(",") if b]
        if unknown := [b for b in backends if b.split(":")[0].split("-")[0]
                       not in WHOLE_RUN_BACKENDS]:
            raise InputError(f"--backends: {unknown} not among {', '.join(WHOLE_RUN_BACKENDS)}")
        for c in cases:
            ckpt = materialize(c)
            out["rows"].append({"case": c.name, "checkpoint": str(ckpt),
                                "bytes": checkpoint_bytes(ckpt),
                                **whole_run(ckpt, tokens, backends, args.modes, args.threads)})
        return out
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
    ap.add_argument("--whole-run", action="store_true",
                    help="peak summed RSS of python -m harness parity's process tree: each of "
                         "--backends alone, then all together")
    ap.add_argument("--backends", default=",".join(WHOLE_RUN_BACKENDS),
                    help="--whole-run: the candidates (default torch,mlx,llamacpp)")
    ap.add_argument("--modes", default="prefill", help="--whole-run: the checks (default prefill)")
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
