"""Throughput sweep: prefill and decode speed of every backend against context length.

Each grid point (target x case x B x PP) prefills PP seeded random tokens in a fresh session,
then decodes TG tokens greedily, one ``feed`` per token.  Columns and definitions are
llama-batched-bench's, so our rows sit next to imported llama.cpp rows (:mod:`.bench_import`):
``T_PP`` prefill seconds, ``S_PP = B*PP/T_PP``, ``T_TG`` seconds for all TG steps,
``S_TG = B*TG/T_TG``, ``T = T_PP + T_TG``, ``S = B*(PP+TG)/T``, ``N_KV = B*(PP+TG)``.  T_PP and
T_TG are medians over ``repeats`` timed runs (after ``warmup`` untimed ones); ``*_spread`` is
max - min of the same runs.  Sessions are opened with no capture points.

A point is skipped, with its reason kept as a row, when PP+TG exceeds the case's
``max_position_embeddings``, when a conservative memory estimate exceeds the budget, when the
time extrapolated from the smaller prompts exceeds ``max_point_s``, or when B > 1 (the Session
protocol feeds one sequence).  Skipped and failed points are never dropped silently.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.backends.base import LoadedModel
from harness.backends.targets import UNQUANTIZED, Target, get_backend, gguf_type
from harness.checks.cases import Case, load_cases, materialize
from harness.core.errors import InputError
from harness.perf.roofline import (
    dtype_bytes,
    gguf_bytes_per_token,
    measure_bandwidth_gbs,
    mlx_bytes_per_token,
    roofline_tgs,
    weight_bytes_per_token,
)
from references.config import BailingHybridConfig, config_from_dict
from references.host import peak_rss, physical_memory, proc_bytes

SOURCE = "harness"
BATCHED_BENCH_COLUMNS = ("PP", "TG", "B", "N_KV", "T_PP", "S_PP", "T_TG", "S_TG", "T", "S")
COLUMNS: tuple[str, ...] = (
    "backend", "target", "case", "dtype", "build", "machine", "source",
    *BATCHED_BENCH_COLUMNS,
    "depth", "T_PP_spread", "T_TG_spread", "S_PP_std", "S_TG_std", "repeats",
    "peak_rss_mb", "peak_backend_mb",
    "weight_bytes_per_token", "bandwidth_gbs", "roofline_tgs", "roofline_frac",
    "skip_reason", "detail",
)  # fmt: skip
_INT_COLUMNS = ("PP", "TG", "B", "N_KV", "depth", "repeats")
_STR_COLUMNS = ("backend", "target", "case", "dtype", "build", "machine", "source",
                "skip_reason", "detail")
# Installed distributions that make up each backend's build string.
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "mlx": ("mlx-lm", "mlx"),
    "llamacpp": ("llama-cpp-python",),
}
# Queries a backend attends with at once in a prefill (None: the whole prompt), for the
# memory estimate: the torch reference and mlx on CPU materialise [heads, PP, PP] scores.
_QUERY_CHUNK: dict[str, int | None] = {"llamacpp": 512}
DEFAULT_MAX_POINT_S = 300.0
_NO_INVENTORY = ", no roofline: no tensor inventory for this model family"
_FLOAT_OUTTYPES = ("f32", "f16", "bf16")


def throughput_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The throughput table: every column of :data:`COLUMNS`, in order, typed; ints stay ints."""
    return typed_frame(records, COLUMNS, strings=_STR_COLUMNS, ints=_INT_COLUMNS, special={
        "weight_bytes_per_token": lambda c: pd.array(
            [None if v is None or pd.isna(v) else round(v) for v in c], dtype="Int64"),
    })


def typed_frame(
    records: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    strings: Iterable[str],
    ints: Iterable[str],
    special: Mapping[str, Callable[[pd.Series], Any]] | None = None,
) -> pd.DataFrame:
    """A table with exactly ``columns``, in order: strings ('' for missing), nullable ints,
    ``special`` converters, and float64 for everything else (so parquet types never drift)."""
    strings, ints, special = set(strings), set(ints), dict(special or {})
    df = pd.DataFrame.from_records(list(records), columns=list(columns))
    for col in columns:
        if col in special:
            df[col] = special[col](df[col])
        elif col in strings:
            df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
        elif col in ints:
            df[col] = pd.array(df[col], dtype="Int64")
        else:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def save_sweep(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write ``throughput.parquet`` and ``throughput.csv`` into ``out_dir``; never overwrite."""
    return save_table(df, out_dir, "throughput")


def save_table(df: pd.DataFrame, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.parquet`` and ``<stem>.csv`` into ``out_dir``; never overwrite."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"]
    for p in paths:
        if p.exists():
            raise FileExistsError(f"{p}: exists; a sweep never overwrites earlier results")
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_parquet(paths[0], index=False)
    df.to_csv(paths[1], index=False)
    return paths


def machine_description() -> str:
    """Platform, CPU model where known, and CPU count: enough to tell two machines apart."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if found:
            cpu = found.group(1).strip()
    return f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs"


def build_string(backend: str, model: object | None = None) -> str:
    """The versions behind a backend's numbers (a loaded model may report its own ``build``)."""
    own = getattr(model, "build", None)
    if isinstance(own, str) and own:
        return own
    parts = []
    for dist in _DISTRIBUTIONS.get(backend, (backend,)):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(parts) or "unknown"


@dataclass(frozen=True)
class ModelShape:
    """What the sweep needs from a case's config, for any family; ``config`` only for Ling-2.6
    (the one family with a tensor inventory, hence a roofline)."""

    vocab_size: int
    num_attention_heads: int
    max_position_embeddings: int | None
    has_mla: bool
    config: BailingHybridConfig | None

    @classmethod
    def of(cls, case: Case) -> ModelShape:
        raw = case.config_json()
        try:
            cfg: BailingHybridConfig | None = config_from_dict(raw, case.source or Path(case.name))
        except InputError:  # another family (Ling 3.0): no inventory, MLA assumed present
            cfg = None
        layers = range(cfg.num_hidden_layers) if cfg else range(0)
        max_pos = raw.get("max_position_embeddings")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            num_attention_heads=int(raw.get("num_attention_heads", 1)),
            max_position_embeddings=int(max_pos) if max_pos else None,
            has_mla=any(cfg.is_mla(layer) for layer in layers) if cfg else True,
            config=cfg,
        )


def storage_dtype(target: Target) -> str:
    """The weights' storage type: a quantized candidate's type (:func:`quantized_kind`), else a
    llama.cpp ``outtype`` option, else the target's dtype."""
    return quantized_kind(target) or dict(target.extra).get("outtype") or target.dtype


def quantized_kind(target: Target) -> str | None:
    """The quantization a candidate runs (``Q4_K_M`` for ``quant=`` or a quantized ``gguf=``,
    ``q4g64`` for mlx ``bits=4`` or a quantized ``model_dir=``), as its label names it; None for
    float weights.  Its roofline comes from its files (:func:`candidate_weight_bytes`)."""
    from harness.quant.mlx_quantize import options_tag

    settings = target.settings
    if quant := getattr(settings, "quant", None):
        return str(quant)
    gguf = getattr(settings, "gguf", None)
    if isinstance(gguf, Path) and (kind := gguf_type(gguf)) not in (None, *UNQUANTIZED):
        return kind
    return options_tag(settings)


def _describe(model: object) -> str:
    """A loaded model's own description of what ran (llama.cpp: context parameters), if any."""
    describe = getattr(model, "describe", None)
    if not callable(describe):
        return ""
    with contextlib.suppress(Exception):
        info = describe()
        return "".join(f", {k}={v}" for k, v in info.items() if k != "gguf")
    return ""


def estimate_memory_mb(
    shape: ModelShape, pp: int, *, bytes_per_value: float = 4.0, chunk: int | None = None
) -> float:
    """A conservative prefill working-set estimate beyond the weights: the MLA score matrix
    [heads, chunk, PP] three times (scores, softmax, probabilities) and the logits of every
    position (float32 plus the float64 copy a backend returns)."""
    value = max(4.0, bytes_per_value)
    rows = min(pp, chunk) if chunk else pp
    scores = 3 * shape.num_attention_heads * rows * pp * value if shape.has_mla else 0.0
    logits = pp * shape.vocab_size * (value + 2 * 8)
    return (scores + logits) / 2**20


def default_memory_budget_mb() -> float:
    """Half the memory available now (Linux /proc/meminfo), else half of physical memory;
    unbounded where neither is known."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return (available if available is not None else physical_memory()) / 2**20 / 2 or math.inf


# ---------------------------------------------------------------------------------------------
# Peak memory


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's RSS high-water mark in MiB (since the last reset where one was possible)."""
    return peak_rss() / 2**20


def _mlx() -> Any | None:
    """``mlx.core`` when a backend already imported it (never imported just for this)."""
    return sys.modules.get("mlx.core")


def _reset_backend_peak(backend: str) -> None:
    mx = _mlx()
    if backend == "mlx" and mx is not None and hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()


def _backend_peak_mb(backend: str) -> float:
    mx = _mlx()
    if backend == "mlx" and mx is not None and hasattr(mx, "get_peak_memory"):
        return mx.get_peak_memory() / 2**20
    return math.nan


def _release(backend: str) -> None:
    gc.collect()
    mx = _mlx()
    if backend == "mlx" and mx is not None and hasattr(mx, "clear_cache"):
        mx.clear_cache()


# ---------------------------------------------------------------------------------------------
# Timing


def time_once(model: LoadedModel, tokens: Sequence[int], tg: int) -> tuple[float, float]:
    """One fresh session: seconds for the prefill of ``tokens`` and for ``tg`` greedy steps.

    Picking the first token from the prefill's logits is in neither time, as in batched-bench.
    The garbage collector is paused while the clock runs (collected just before)."""
    session = model.start()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        logits = session.feed(list(tokens))["result_output"]
        t_pp = time.perf_counter() - start
        token = int(np.argmax(logits[-1]))
        del logits
        start = time.perf_counter()
        for _ in range(tg):
            token = int(np.argmax(session.feed([token])["result_output"][-1]))
        t_tg = time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
    return t_pp, t_tg


@dataclass(frozen=True)
class _Measured:
    pp: int
    t_pp: float  # median seconds
    t_step: float  # median seconds per decode step (nan without TG)


def _exponent(history: Sequence[_Measured], attr: str, lo: float, hi: float, default: float):
    """Growth exponent of ``attr`` against context from the last two points, clamped."""
    if len(history) < 2:
        return default
    a, b = history[-2], history[-1]
    ya, yb = getattr(a, attr), getattr(b, attr)
    if not (ya > 0 and yb > 0) or a.pp == b.pp:
        return default
    return min(hi, max(lo, math.log(yb / ya) / math.log(b.pp / a.pp)))


def estimate_point_s(history: Sequence[_Measured], pp: int, tg: int, runs: int) -> float | None:
    """Seconds a grid point should take, extrapolated from the measured smaller prompts: prefill
    as PP^a (a in [1, 2], 2 until two points exist), a decode step as PP^b (b in [0, 1])."""
    if not history:
        return None
    last = history[-1]
    ratio = pp / last.pp
    t_pp = last.t_pp * ratio ** _exponent(history, "t_pp", 1.0, 2.0, 2.0)
    step = 0.0 if math.isnan(last.t_step) else last.t_step
    t_step = step * ratio ** _exponent(history, "t_step", 0.0, 1.0, 1.0)
    return runs * (t_pp + tg * t_step)


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class _Grid:
    prompt_lengths: tuple[int, ...]
    tg: int
    batch: tuple[int, ...]
    repeats: int
    warmup: int
    seed: int
    max_point_s: float
    memory_budget_mb: float
    bandwidth_gbs: float
    machine: str
    threads: int | None


def _validate(prompt_lengths, tg, batch, repeats, warmup) -> None:
    if not prompt_lengths or any(int(p) < 1 for p in prompt_lengths):
        raise ValueError(f"prompt lengths must be >= 1, got {list(prompt_lengths)}")
    if tg < 0 or repeats < 1 or warmup < 0:
        raise ValueError(f"need tg >= 0, repeats >= 1, warmup >= 0 (got {tg}, {repeats}, {warmup})")
    if not batch or any(int(b) < 1 for b in batch):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch)}")


def run_sweep(
    targets: Sequence[Target | str],
    cases: Sequence[Case | str],
    *,
    prompt_lengths: Sequence[int] = (128, 512, 2048, 8192, 32768),
    tg: int = 128,
    batch: Sequence[int] = (1,),
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = True,
    bandwidth_gbs: float | None = None,
    seed: int = 0,
    max_point_s: float = DEFAULT_MAX_POINT_S,
    memory_budget_mb: float | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Measure every available target on every case at every prompt length (see module doc).

    Unavailable backends, failed loads and skipped points become rows with ``skip_reason``.
    ``bandwidth_gbs`` overrides the measured memory bandwidth used for the decode roofline.
    ``threads`` sets torch's intra-op threads for its points (restored after): on a shared
    machine, torch's OpenMP threads waiting for a busy core can make it 10x slower."""
    _validate(prompt_lengths, tg, batch, repeats, warmup)
    resolved_targets = [t if isinstance(t, Target) else Target.parse(t) for t in targets]
    resolved_cases = [c if isinstance(c, Case) else load_cases([c])[0] for c in cases]
    grid = _Grid(
        prompt_lengths=tuple(sorted({int(p) for p in prompt_lengths})),
        tg=int(tg),
        batch=tuple(sorted({int(b) for b in batch})),
        repeats=int(repeats),
        warmup=int(warmup),
        seed=int(seed),
        max_point_s=float(max_point_s),
        memory_budget_mb=(
            default_memory_budget_mb() if memory_budget_mb is None else float(memory_budget_mb)
        ),
        bandwidth_gbs=measure_bandwidth_gbs() if bandwidth_gbs is None else float(bandwidth_gbs),
        machine=machine_description(),
        threads=threads,
    )
    total = len(resolved_targets) * len(resolved_cases) * len(grid.batch) * len(
        grid.prompt_lengths
    )
    rows: list[dict[str, Any]] = []
    with _progress(progress, total) as step:
        for target in resolved_targets:
            for case in resolved_cases:
                rows += _sweep_one(target, case, grid, step)
    return throughput_frame(rows)


def point_base(target: Target, case: Case, machine: str, bandwidth_gbs: float, detail: str,
               source: str = SOURCE) -> dict[str, Any]:
    """The columns every measured row of (target, case) shares: identity, build, weight bytes
    read per decoded token and the roofline they imply."""
    shape = ModelShape.of(case)
    storage = storage_dtype(target)
    per_param = None if quantized_kind(target) else dtype_bytes(storage)  # files: once loaded
    wbytes = weight_bytes_per_token(shape.config, per_param) if per_param and shape.config else None
    return {
        "backend": target.backend,
        "target": target.label,
        "case": case.name,
        "dtype": storage,
        "build": build_string(target.backend),
        "machine": machine,
        "source": source,
        "depth": 0,
        "weight_bytes_per_token": wbytes,
        "bandwidth_gbs": bandwidth_gbs,
        "roofline_tgs": roofline_tgs(bandwidth_gbs, wbytes or 0),
        "detail": detail + ("" if shape.config else _NO_INVENTORY),
    }


def candidate_weight_bytes(target: Target, case: Case) -> tuple[int, str] | None:
    """(weight bytes one decoded token reads, storage type) from the files ``target`` really
    runs on ``case``: a quantized GGUF (``quant=``, a quantized ``outtype=`` or ``gguf=``), any
    GGUF of a family the config formula has no inventory for (Ling 3.0), or a quantized MLX
    directory (``bits=``, ``model_dir=``).  None where :func:`point_base`'s formula applies
    (float weights of Ling-2.6), so float figures stay as they were.  Call it after the model
    loaded: the file is then built and cached."""
    has_formula = ModelShape.of(case).config is not None
    if target.backend == "llamacpp":
        from harness.backends.llamacpp_backend import candidate_gguf
        from harness.quant.gguf_quantize import gguf_file_type

        outtype = getattr(target.settings, "outtype", None)
        if has_formula and not quantized_kind(target) and outtype in (None, *_FLOAT_OUTTYPES):
            return None  # float Ling-2.6: the formula, without touching the file
        path = candidate_gguf(target, materialize(case))
        kind = gguf_file_type(path)
        if kind in UNQUANTIZED and has_formula:
            return None
        return gguf_bytes_per_token(path), kind
    if target.backend == "mlx":
        from harness.backends.mlx_backend import candidate_mlx_dir
        from harness.quant.mlx_quantize import dir_tag

        folder = candidate_mlx_dir(target, materialize(case))
        kind = dir_tag(folder) if folder is not None else None
        return None if kind is None else (mlx_bytes_per_token(folder), kind)
    return None


def use_candidate_bytes(base: dict[str, Any], target: Target, case: Case) -> None:
    """Put the candidate's real weight bytes (:func:`candidate_weight_bytes`) and the roofline
    they imply into ``base``; files that cannot be read leave it as it was (a quantized
    candidate: no roofline), with the reason in ``detail``."""
    try:
        found = candidate_weight_bytes(target, case)
    except Exception as e:  # a roofline problem never hides a measurement
        base["detail"] += f", no roofline from the weight files: {type(e).__name__}: {e}"
        return
    if found is None:
        return
    wbytes, kind = found
    base.update(dtype=kind, weight_bytes_per_token=wbytes,
                roofline_tgs=roofline_tgs(base["bandwidth_gbs"], wbytes))
    detail = base["detail"].replace(_NO_INVENTORY, "")
    base["detail"] = f"{detail}, roofline from the {kind} files' bytes"


def measured_row(base: Mapping[str, Any], pp: int, tg: int, prefill_s: Sequence[float],
                 decode_s: Sequence[float]) -> dict[str, Any]:
    """One B=1 grid point in llama-batched-bench's columns from timed prefills and decodes
    (medians; spreads max - min; speeds' sample std)."""
    pre, dec = np.asarray(prefill_s, np.float64), np.asarray(decode_s, np.float64)
    t_pp = float(np.median(pre))
    t_tg = float(np.median(dec)) if tg and dec.size else math.nan
    s_tg = tg / t_tg if tg and t_tg > 0 else math.nan
    roof = base["roofline_tgs"]
    t_all = t_pp + (t_tg if tg else 0.0)
    return {
        **base,
        "PP": pp, "TG": tg, "B": 1, "N_KV": pp + tg,
        "T_PP": t_pp, "S_PP": pp / t_pp,
        "T_TG": t_tg, "S_TG": s_tg,
        "T": t_all, "S": (pp + tg) / t_all,
        "T_PP_spread": float(np.ptp(pre)),
        "T_TG_spread": float(np.ptp(dec)) if dec.size else math.nan,
        "S_PP_std": _std(pp / pre),
        "S_TG_std": _std(tg / dec) if tg and dec.size else math.nan,
        "repeats": int(pre.size),
        "roofline_frac": s_tg / roof if roof and not math.isnan(roof) else math.nan,
        "skip_reason": "",
    }  # fmt: skip


def _sweep_one(
    target: Target, case: Case, grid: _Grid, step: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every grid point of one target on one case (the model is loaded once)."""
    shape = ModelShape.of(case)
    base = point_base(target, case, grid.machine, grid.bandwidth_gbs,
                      f"warmup={grid.warmup}, seed={grid.seed}")
    points = [(b, pp) for b in grid.batch for pp in grid.prompt_lengths]

    def skip_all(reason: str) -> list[dict[str, Any]]:
        out = []
        for b, pp in points:
            step(f"{target.label} {case.name} skipped")
            out.append(_skipped(base, pp, grid.tg, b, reason))
        return out

    backend = get_backend(target.backend)
    availability = backend.availability()
    if not availability.ok:
        return skip_all(f"{target.label} is unavailable here: {availability.reason}")
    try:
        model = backend.load(materialize(case), target.options())
    except Exception as e:  # a port that cannot load this case is a result, not a crash
        return skip_all(f"{target.label} could not load {case.name}: {type(e).__name__}: {e}")
    base["build"] = build_string(target.backend, model)
    base["detail"] += _describe(model)
    use_candidate_bytes(base, target, case)
    rows = []
    history: list[_Measured] = []
    try:
        with _threads(target.backend, grid.threads) as note:
            base["detail"] += note
            for b, pp in points:
                step(f"{target.label} {case.name} B={b} PP={pp}")
                reason = _skip_reason(target, shape, pp, b, grid, history)
                if reason:
                    rows.append(_skipped(base, pp, grid.tg, b, reason))
                    continue
                try:
                    row, measured = _measure(model, target, shape, pp, grid, base)
                except Exception as e:  # recorded as the point's result; the sweep goes on
                    reason = f"failed: {type(e).__name__}: {e}"
                    rows.append(_skipped(base, pp, grid.tg, b, reason))
                    continue
                rows.append(row)
                history.append(measured)
    finally:
        close = getattr(model, "close", None)
        if callable(close):  # e.g. llama.cpp's worker process
            close()
        del model
        _release(target.backend)
    return rows


@contextlib.contextmanager
def _threads(backend: str, threads: int | None) -> Iterator[str]:
    """Set torch's thread count for one target's points; yields a note for ``detail``."""
    if backend != "torch":
        yield ""
        return
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield f", torch_threads={torch.get_num_threads()}"
    finally:
        torch.set_num_threads(before)


def _skip_reason(
    target: Target,
    shape: ModelShape,
    pp: int,
    b: int,
    grid: _Grid,
    history: Sequence[_Measured],
) -> str | None:
    if b != 1:
        return (
            f"B={b}: {target.backend} sessions decode one sequence (the Session protocol has no "
            "batch axis); only B=1 is measured"
        )
    limit = shape.max_position_embeddings
    if limit is not None and pp + grid.tg > limit:
        return f"PP+TG = {pp + grid.tg} exceeds the case's max_position_embeddings ({limit})"
    mem = estimate_memory_mb(
        shape, pp, bytes_per_value=dtype_bytes(target.dtype) or 4.0,
        chunk=_QUERY_CHUNK.get(target.backend),
    )
    if mem > grid.memory_budget_mb:
        return (
            f"estimated prefill working set {mem:,.0f} MiB exceeds the memory budget "
            f"{grid.memory_budget_mb:,.0f} MiB"
        )
    est = estimate_point_s(history, pp, grid.tg, grid.warmup + grid.repeats)
    if est is not None and est > grid.max_point_s:
        return (
            f"estimated {est:,.0f} s for {grid.warmup + grid.repeats} runs exceeds the "
            f"{grid.max_point_s:,.0f} s budget per point (extrapolated from PP={history[-1].pp})"
        )
    return None


def _skipped(base: Mapping[str, Any], pp: int, tg: int, b: int, reason: str) -> dict[str, Any]:
    return {**base, "PP": pp, "TG": tg, "B": b, "N_KV": b * (pp + tg), "repeats": 0,
            "skip_reason": reason}


def _measure(
    model: LoadedModel,
    target: Target,
    shape: ModelShape,
    pp: int,
    grid: _Grid,
    base: Mapping[str, Any],
) -> tuple[dict[str, Any], _Measured]:
    """Warm-up runs, then ``repeats`` timed runs of one B=1 grid point."""
    tg = grid.tg
    tokens = np.random.default_rng([grid.seed, pp]).integers(0, shape.vocab_size, pp).tolist()
    rss_reset = _reset_peak_rss()
    _reset_backend_peak(target.backend)
    for _ in range(grid.warmup):
        time_once(model, tokens, tg)
    samples = np.array([time_once(model, tokens, tg) for _ in range(grid.repeats)])
    row = measured_row(base, pp, tg, samples[:, 0], samples[:, 1])
    row["T_TG"] = float(np.median(samples[:, 1]))  # 0.0 when TG = 0, as before
    row.update(
        peak_rss_mb=peak_rss_mb(),
        peak_backend_mb=_backend_peak_mb(target.backend),
        detail=base["detail"] + ("" if rss_reset else ", rss=process high-water (no reset)"),
    )
    return row, _Measured(pp, row["T_PP"], row["T_TG"] / tg if tg else math.nan)


def _std(values: np.ndarray) -> float:
    """Sample standard deviation (n-1), as llama-bench reports it; NaN for one sample."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr; ``step(description)`` announces the next grid point."""
    if not enabled:
        yield lambda _description: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("sweep", total=total)
        started = [False]

        def step(description: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=description)

        yield step
        if started[0]:
            bar.advance(task)


def fill_roofline(
    df: pd.DataFrame, bandwidth_gbs: float, configs: Mapping[str, BailingHybridConfig]
) -> pd.DataFrame:
    """Give rows without a weight byte count one from their case's config (``configs`` by case
    name) and dtype, then set ``roofline_tgs`` and ``roofline_frac`` wherever both are known.
    ``roofline_frac`` is left empty for B > 1 (a batched step reads the weights once for B
    tokens, and more than ``num_experts_per_tok`` experts).  Meant for imported rows."""
    df = df.copy()
    for i, row in df.iterrows():
        wbytes = row["weight_bytes_per_token"]
        if pd.isna(wbytes) and row["case"] in configs and dtype_bytes(row["dtype"]):
            wbytes = weight_bytes_per_token(configs[row["case"]], dtype_bytes(row["dtype"]))
            df.at[i, "weight_bytes_per_token"] = wbytes
        if pd.isna(wbytes) or not pd.isna(row["roofline_tgs"]):
            continue
        roof = roofline_tgs(bandwidth_gbs, float(wbytes))
        df.at[i, "bandwidth_gbs"] = bandwidth_gbs
        df.at[i, "roofline_tgs"] = roof
        # The roofline is per token of one sequence; batched steps share their weight reads.
        df.at[i, "roofline_frac"] = row["S_TG"] / roof if row["B"] == 1 else math.nan
    return df
