"""Our llama.cpp port beside upstream llama.cpp, and both against the decode roofline.

``python -m harness.perf.bench_port`` (defaults: ``cases/bench/ling26-100m`` on our
``bailing_hybrid`` port, ``cases/bench/ling3-100m`` on upstream's ``bailingmoe3``, PP
128/512/2048, TG 64, 3 repeats).

Each case is materialised and converted exactly as the llama.cpp backend does (cached), then ONE
child process loads every GGUF and measures them interleaved, the way llama-bench does, without
the harness worker's per-token overheads (no eval callback, no logits of every prompt position,
no npz per feed): a prefill is ``llama_decode`` of PP tokens in ``n_batch`` chunks with the last
position's logits only, a decode step one token with its logits and a greedy argmax.  Every
repeat runs every (PP, model) pair before the next repeat starts, alternating the model order,
so load from other jobs on a shared machine falls on all models alike; medians and spreads
(max - min) are over the repeats.  The copy bandwidth is measured in the same child at the start
of every repeat; the roofline uses the best (least disturbed) one, as
:func:`harness.perf.roofline.measure_bandwidth_gbs` does.

Weight bytes per decoded token come from the GGUF's own tensor sizes, for any architecture: one
row of ``token_embd``, every ``*_exps`` tensor times ``expert_used_count / expert_count``, every
other trunk tensor in full (``output`` in full; ``token_embd`` in full again when it is the tied
lm_head), MTP blocks left out.  For Ling-2.6 this agrees with
:func:`harness.perf.roofline.weight_bytes_per_token` (checked in the table's ``check`` column).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.checks.cases import CASES_DIR, load_cases, materialize
from harness.core.errors import InputError

BENCH_DIR = CASES_DIR / "bench"
DEFAULT_CASES = ("ling26-100m", "ling3-100m")


@dataclass(frozen=True)
class ModelFacts:
    """What the table needs about one converted model."""

    case: str
    gguf: str
    arch: str
    params_total: int
    params_active: int
    bytes_total: int
    bytes_per_token: int
    reference_bytes_per_token: int | None  # harness.perf.roofline's count (Ling-2.6 only)


def gguf_tensor_bytes(gguf: Path) -> dict[str, Any]:
    """Parameter and byte counts from a GGUF's tensor table (see the module doc): ``arch``,
    ``params_total``, ``params_active``, ``bytes_total``, ``bytes_per_token``."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))

    def field(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = str(field("general.architecture"))
    n_block = int(field(f"{arch}.block_count"))
    n_nextn = int(field(f"{arch}.nextn_predict_layers", 0) or 0)
    n_expert = int(field(f"{arch}.expert_count", 0) or 0)
    n_used = int(field(f"{arch}.expert_used_count", 0) or 0)
    trunk = n_block - n_nextn  # NextN blocks come last
    names = {t.name for t in r.tensors}
    p_total = b_total = 0
    p_token = b_token = 0.0
    for t in r.tensors:
        n, nb = int(t.n_elements), int(t.n_bytes)
        p_total += n
        b_total += nb
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= trunk:
            continue  # the MTP head: not read by trunk decode
        if t.name == "token_embd.weight":
            share = 1 / int(t.shape[-1]) + (0 if "output.weight" in names else 1)  # tied lm_head
        elif "_exps" in t.name and n_expert:
            share = n_used / n_expert
        else:
            share = 1.0
        b_token += nb * share
        p_token += n * share
    return {"arch": arch, "params_total": p_total, "params_active": round(p_token),
            "bytes_total": b_total, "bytes_per_token": round(b_token)}


def gguf_facts(case: str, gguf: Path, cases_dir: Path = BENCH_DIR) -> ModelFacts:
    """:func:`gguf_tensor_bytes` of a case's GGUF, with harness.perf.roofline's count beside it."""
    c = gguf_tensor_bytes(gguf)
    reference = _reference_bytes(case, c["bytes_total"] / max(c["params_total"], 1), cases_dir)
    return ModelFacts(case, str(gguf), c["arch"], c["params_total"], c["params_active"],
                      c["bytes_total"], c["bytes_per_token"], reference)


def _reference_bytes(case: str, bytes_per_param: float, cases_dir: Path) -> int | None:
    """harness.perf.roofline's count for a Ling-2.6 case (None for another family)."""
    from harness.perf.roofline import weight_bytes_per_token
    from references.config import config_from_dict

    c = _case(case, cases_dir)
    if c.family != "ling26":
        return None
    return weight_bytes_per_token(config_from_dict(c.config_json(), c.source), bytes_per_param)


def _case(name: str, cases_dir: Path = BENCH_DIR) -> Any:
    return load_cases([name], cases_dir)[0]


def convert_case(name: str, outtype: str = "f32", cases_dir: Path = BENCH_DIR) -> Path:
    """Materialise and convert a case as the llama.cpp backend does (both cached)."""
    from harness.llamacpp.convert import convert

    conv = convert(materialize(_case(name, cases_dir)), outtype)
    if not conv.supported:
        raise InputError(f"{name}: this llama.cpp build cannot convert it: {conv.reason}")
    return conv.require()


# ---------------------------------------------------------------------------------------------
# The child: every model loaded at once, measured interleaved


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import ctypes

    import llama_cpp as ll

    from harness.perf.roofline import measure_bandwidth_gbs

    quiet = ll.llama_log_callback(lambda level, text, user: None)
    ll.llama_log_set(quiet, None)
    ll.llama_backend_init()
    threads = int(spec["threads"])
    n_batch = int(spec["n_batch"])
    pps, tg = [int(p) for p in spec["pp"]], int(spec["tg"])
    models = []
    for path in spec["ggufs"]:
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = 0
        model = ll.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = ll.llama_context_default_params()
        cp.n_ctx = int(spec["n_ctx"])
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = {"f32": 0, "f16": 1}[spec["type_kv"]]
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        ctx = ll.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError(f"llama_init_from_model failed for {path}")
        n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
        models.append((model, ctx, n_vocab, ll.llama_batch_init(n_batch, 0, 1)))

    def decode(ctx: Any, batch: Any, tokens: Sequence[int], pos0: int) -> None:
        for start in range(0, len(tokens), n_batch):
            part = tokens[start : start + n_batch]
            for i, tok in enumerate(part):
                batch.token[i] = tok
                batch.pos[i] = pos0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            batch.logits[len(part) - 1] = start + len(part) == len(tokens)
            batch.n_tokens = len(part)
            rc = ll.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        ll.llama_synchronize(ctx)

    def argmax(ctx: Any, n_vocab: int) -> int:
        ptr = ll.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def once(i: int, pp: int) -> tuple[float, float]:
        _, ctx, n_vocab, batch = models[i]
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        tokens = np.random.default_rng([spec["seed"], pp]).integers(0, n_vocab, pp).tolist()
        t0 = time.perf_counter()
        decode(ctx, batch, tokens, 0)
        t_pp = time.perf_counter() - t0
        tok = argmax(ctx, n_vocab)
        t0 = time.perf_counter()
        for step in range(tg):
            decode(ctx, batch, [tok], pp + step)
            tok = argmax(ctx, n_vocab)
        return t_pp, time.perf_counter() - t0

    samples: dict[str, list[list[float]]] = {}
    bandwidth: list[float] = []
    busy = _cpu_counters()
    load = [os.getloadavg()]
    for rep in range(int(spec["warmup"]) + int(spec["repeats"])):
        timed = rep >= int(spec["warmup"])
        if timed:
            bandwidth.append(measure_bandwidth_gbs())  # the sweep's convention
        order = range(len(models)) if rep % 2 == 0 else reversed(range(len(models)))
        for i in list(order):
            for pp in pps:
                t = once(i, pp)
                if timed:
                    samples.setdefault(f"{i}:{pp}", []).append(list(t))
    busy = _cpu_counters(busy)
    load.append(os.getloadavg())
    for model, ctx, _, batch in models:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)
    del ctypes
    return {"samples": samples, "bandwidth_gbs": bandwidth, "loadavg": load, "cpu": busy,
            "threads": threads}


def _cpu_counters(before: dict[str, float] | None = None) -> dict[str, float]:
    """Machine busy jiffies and this process's CPU seconds; with ``before``, the differences as
    "cores busy with other processes" over the interval."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    now = {"busy_s": (sum(fields[:8]) - idle) / hz, "own_s": t.user + t.system,
           "wall_s": time.monotonic()}
    if before is None:
        return now
    wall = now["wall_s"] - before["wall_s"]
    others = (now["busy_s"] - before["busy_s"]) - (now["own_s"] - before["own_s"])
    return {"wall_s": wall, "own_cores": (now["own_s"] - before["own_s"]) / wall,
            "other_cores": max(0.0, others) / wall}


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass(frozen=True)
class Row:
    label: str  # "ours bailing_hybrid" / "upstream bailingmoe3"
    case: str
    arch: str
    params_total: int
    params_active: int
    bytes_per_token: int
    check: str
    pp: int
    tg: int
    s_pp: float
    s_pp_spread: float
    s_tg: float
    s_tg_spread: float
    roofline_tgs: float
    fraction: float


def run_bench(
    cases: Sequence[str] = DEFAULT_CASES,
    *,
    cases_dir: Path = BENCH_DIR,
    pp: Sequence[int] = (128, 512, 2048),
    tg: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    outtype: str = "f32",
    type_kv: str = "f32",
    n_batch: int = 512,
    seed: int = 0,
) -> tuple[list[Row], dict[str, Any]]:
    """Convert, measure in one child process, and tabulate (see the module doc)."""
    facts = [gguf_facts(c, convert_case(c, outtype, cases_dir), cases_dir) for c in cases]
    spec = {
        "ggufs": [f.gguf for f in facts], "pp": list(pp), "tg": tg, "repeats": repeats,
        "warmup": warmup, "threads": threads or os.cpu_count() or 1, "n_batch": n_batch,
        "n_ctx": int(2 ** math.ceil(math.log2(max(pp) + tg))), "type_kv": type_kv, "seed": seed,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "harness.perf.bench_port", "--_child", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    bw = max(out["bandwidth_gbs"])
    rows = []
    for i, f in enumerate(facts):
        ref = f.reference_bytes_per_token
        check = "" if ref is None else f"roofline.py {ref / f.bytes_per_token:.4f}x"
        label = ("ours " if f.arch == "bailing_hybrid" else "upstream ") + f.arch
        roof = bw * 1e9 / f.bytes_per_token
        for p in pp:
            s = np.array(out["samples"][f"{i}:{p}"])
            spp, stg = p / s[:, 0], tg / s[:, 1]
            rows.append(Row(
                label, f.case, f.arch, f.params_total, f.params_active, f.bytes_per_token, check,
                p, tg, float(np.median(spp)), float(np.ptp(spp)), float(np.median(stg)),
                float(np.ptp(stg)), roof, float(np.median(stg)) / roof,
            ))
    out["spec"] = spec
    out["facts"] = [asdict(f) for f in facts]
    return rows, out


def format_table(rows: Sequence[Row], info: dict[str, Any]) -> str:
    head = ("| backend | case | params total/active | bytes/token | PP | S_PP t/s [spread] "
            "| S_TG t/s [spread] | roofline t/s | fraction |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        params = f"{r.params_total / 1e6:.1f}M / {r.params_active / 1e6:.1f}M"
        lines.append(
            f"| {r.label} | {r.case} | {params} | {r.bytes_per_token / 1e6:.1f} MB | {r.pp} "
            f"| {r.s_pp:.0f} [{r.s_pp_spread:.0f}] | {r.s_tg:.1f} [{r.s_tg_spread:.1f}] "
            f"| {r.roofline_tgs:.0f} | {r.fraction:.2f} |"
        )
    bw = info["bandwidth_gbs"]
    cpu = info["cpu"]
    lines.append(
        f"\nTG={rows[0].tg if rows else '?'}, medians of {len(bw)} interleaved repeats, [spread] = "
        f"max - min; threads={info['threads']}; copy bandwidth {min(bw):.1f}-{max(bw):.1f} GB/s "
        f"(roofline uses the best, {max(bw):.1f}); load average {info['loadavg'][0][0]:.2f} -> "
        f"{info['loadavg'][1][0]:.2f}; during the run other processes kept "
        f"{cpu['other_cores']:.2f} of {os.cpu_count()} cores busy "
        f"(this bench {cpu['own_cores']:.2f})."
    )
    med = float(np.median(bw))
    lines.append(
        f"The copy bandwidth moves with other tenants of the memory system; at its median "
        f"({med:.1f} GB/s) every fraction would be {max(bw) / med:.2f}x the one shown."
    )
    checks = sorted({f"{r.case}: {r.check}" for r in rows if r.check})
    if checks:
        lines.append(
            "bytes/token vs harness.perf.roofline.weight_bytes_per_token: " + "; ".join(checks)
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.perf.bench_port", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--cases-dir", type=Path, default=BENCH_DIR)
    p.add_argument("--pp", default="128,512,2048")
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="default: every core")
    p.add_argument("--outtype", default="f32")
    p.add_argument("--type-kv", default="f32", choices=("f32", "f16"))
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--json", type=Path, default=None, help="also write rows and raw samples here")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child is not None:
        print(json.dumps(_child(json.loads(args._child))))
        return 0
    rows, info = run_bench(
        [c.strip() for c in args.cases.split(",") if c.strip()], cases_dir=args.cases_dir,
        pp=[int(x) for x in args.pp.split(",")], tg=args.tg, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, outtype=args.outtype, type_kv=args.type_kv,
        n_batch=args.n_batch,
    )
    print(format_table(rows, info))
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], **info}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
