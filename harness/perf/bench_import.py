"""Other tools' throughput output as rows of the sweep's table (:data:`harness.perf.sweep.COLUMNS`).

- ``llama-batched-bench``: its markdown table (every row, values exactly as printed) or its
  ``--output-format jsonl`` lines.
- ``llama-bench``: its markdown table (``pp512``, ``tg128``, ``pp512+tg128``, ``... @ d4096``;
  ``t/s`` as ``avg ± std``) or its ``-o json`` / ``-o jsonl`` output.
- ``mlx-lm``: ``mlx_lm.generate``'s statistics (``Prompt: N tokens, X tokens-per-sec`` ...) or
  ``mlx_lm.benchmark``'s ``Timing with ...`` / ``Trial i: ...`` lines (one row per block, medians
  over the trials).  mlx-lm's ``prompt_tps`` includes sampling the first token.

Where a tool reports only a speed, the time is derived from it (``T_PP = B*PP/S_PP``); where it
prints both, both are kept as printed, so ``S_PP`` may differ from ``PP/T_PP`` in the last digit.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.errors import InputError
from harness.perf.roofline import dtype_bytes
from harness.perf.sweep import throughput_frame

KINDS = ("llama-batched-bench", "llama-bench", "mlx-lm")
_ALIASES = {"batched-bench": "llama-batched-bench", "mlx_lm": "mlx-lm", "mlx": "mlx-lm"}

# llama-batched-bench's printf formats (tools/batched-bench/batched-bench.cpp).
_BB_NAMES = ("PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s")
_BB_WIDTHS = (6, 6, 4, 6, 8, 8, 8, 8, 8, 8)
_BB_SPECS = ("d", "d", "d", "d", ".3f", ".2f", ".3f", ".2f", ".3f", ".2f")
_BB_COLUMNS = ("PP", "TG", "B", "N_KV", "T_PP", "S_PP", "T_TG", "S_TG", "T", "S")
_BB_JSON = {"pp": "PP", "tg": "TG", "pl": "B", "n_kv": "N_KV", "t_pp": "T_PP",
            "speed_pp": "S_PP", "t_tg": "T_TG", "speed_tg": "S_TG", "t": "T", "speed": "S"}
_TEST = re.compile(r"^(?:pp\s*(?P<pp>\d+))?\+?(?:tg\s*(?P<tg>\d+))?(?:\s*@\s*d(?P<depth>\d+))?$")
_TS = re.compile(r"^(?P<avg>[-\d.]+)\s*±\s*(?P<std>[-\d.]+)$")
_MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Formatting (batched-bench's exact layout, also used to print our own rows)


def batched_bench_header() -> str:
    """The two header lines llama-batched-bench prints above its rows."""
    names = " | ".join(f"{n:>{w}}" for n, w in zip(_BB_NAMES, _BB_WIDTHS, strict=True))
    rule = "-|-".join("-" * w for w in _BB_WIDTHS)
    return f"|{names} |\n|{rule}-|"


def format_batched_bench_row(row: Mapping[str, Any]) -> str:
    """One row exactly as llama-batched-bench prints it (``|%6d | %6d | ... | %8.2f |``)."""
    cells = []
    for col, width, spec in zip(_BB_COLUMNS, _BB_WIDTHS, _BB_SPECS, strict=True):
        value = row[col]
        if value is None or pd.isna(value):
            cells.append(f"{'-':>{width}}")
        else:
            cells.append(format(int(value) if spec == "d" else float(value), f"{width}{spec}"))
    return "|" + " | ".join(cells) + " |"


def to_batched_bench_markdown(df: pd.DataFrame) -> str:
    """The measured rows of ``df`` as batched-bench tables, one per target x case x source."""
    measured = df[df["skip_reason"] == ""] if "skip_reason" in df else df
    blocks = []
    keys = ["target", "case", "source"]
    for key, group in measured.groupby(keys, sort=False) if len(measured) else []:
        title = " · ".join(str(k) for k in key if k)
        rows = (format_batched_bench_row(r) for _, r in group.iterrows())
        blocks.append("\n".join([title, batched_bench_header(), *rows]))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# Entry points


def import_text(
    text: str, kind: str, target: str, *, case: str = "", dtype: str | None = None
) -> pd.DataFrame:
    """Rows from one tool's output; ``target`` (e.g. ``llamacpp-q8_0``) names what ran."""
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise InputError(f"unknown import kind {kind!r}; known: {', '.join(KINDS)}")
    spec, *options = target.split(":")
    backend, _, suffix = spec.partition("-")
    if dtype is None:
        outtype = dict(o.partition("=")[::2] for o in options).get("outtype", "")
        dtype = next((d for d in (outtype, suffix) if d and dtype_bytes(d)), "")
    base = {"backend": backend, "target": target, "case": case, "dtype": dtype,
            "source": kind, "depth": 0, "skip_reason": ""}
    parser = {"llama-batched-bench": _batched_bench, "llama-bench": _llama_bench,
              "mlx-lm": _mlx_lm}[kind]
    rows = parser(text)
    if not rows:
        raise InputError(f"no {kind} results found in the given text")
    return throughput_frame({**base, **r} for r in rows)


def import_file(
    path: Path, kind: str, target: str, *, case: str = "", dtype: str | None = None
) -> pd.DataFrame:
    """:func:`import_text` on a file; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    try:
        return import_text(text, kind, target, case=case, dtype=dtype)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def parse_import_spec(spec: str) -> tuple[Path, str, str, str]:
    """``FILE:KIND:TARGET[:CASE]`` -> (file, kind, target, case).  FILE may hold ':'; TARGET may
    carry ``:key=value`` options as on ``--backends`` (``llamacpp-float32:outtype=q8_0``)."""
    parts = spec.split(":")
    kinds = [k for k in range(1, len(parts) - 1) if _ALIASES.get(parts[k], parts[k]) in KINDS]
    if kinds:
        k = kinds[-1]
        target, *rest = parts[k + 1 :]
        options = [p for p in rest if "=" in p]
        cases = [p for p in rest if "=" not in p]
        if target and len(cases) <= 1 and all(cases):
            kind = _ALIASES.get(parts[k], parts[k])
            full_target = ":".join([target, *options])
            return Path(":".join(parts[:k])), kind, full_target, cases[0] if cases else ""
    raise InputError(
        f"--import {spec!r}: expected FILE:KIND:TARGET[:CASE] with KIND one of {', '.join(KINDS)}"
    )


# ---------------------------------------------------------------------------------------------
# llama-batched-bench


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _batched_bench(text: str) -> list[dict[str, Any]]:
    if any(line.lstrip().startswith("{") for line in text.splitlines()):
        return _batched_bench_jsonl(text)
    detail = ""
    rows: list[dict[str, Any]] = []
    in_table = False
    for line in text.splitlines():
        stripped = line.strip()
        if "n_kv_max =" in stripped:
            detail = stripped.split(":", 1)[-1].strip()
        cells = _cells(stripped) if stripped.startswith("|") else []
        if cells[:4] == ["PP", "TG", "B", "N_KV"]:
            in_table = True
            continue
        if not in_table or not cells or set("".join(cells)) <= set("-:"):
            continue
        if len(cells) != len(_BB_COLUMNS):
            in_table = False
            continue
        row: dict[str, Any] = {"detail": detail}
        for col, spec, cell in zip(_BB_COLUMNS, _BB_SPECS, cells, strict=True):
            row[col] = int(cell) if spec == "d" else float(cell)
        row["repeats"] = 1
        rows.append(row)
    return rows


def _batched_bench_jsonl(text: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.lstrip().startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"line {n}: not valid JSON ({e.msg})") from None
        missing = [k for k in _BB_JSON if k not in obj]
        if missing:
            raise InputError(f"line {n}: batched-bench JSONL without {missing}")
        row: dict[str, Any] = {col: obj[key] for key, col in _BB_JSON.items()}
        row["repeats"] = 1
        row["detail"] = ", ".join(f"{k} = {v}" for k, v in obj.items() if k not in _BB_JSON)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# llama-bench


def _test_row(test: str, avg: float, std: float) -> dict[str, Any]:
    """A llama-bench test (``pp512``, ``tg128``, ``pp512+tg128``, ``... @ d4096``) as a row."""
    match = _TEST.match(test.strip())
    if not match or not (match["pp"] or match["tg"]):
        raise InputError(f"llama-bench test {test!r} is not ppN, tgN or ppN+tgN [@ dN]")
    pp, tg = int(match["pp"] or 0), int(match["tg"] or 0)
    depth = int(match["depth"] or 0)
    row: dict[str, Any] = {"PP": pp, "TG": tg, "B": 1, "N_KV": depth + pp + tg, "depth": depth}
    if pp and tg:  # one speed for the whole pp+tg run
        row |= {"S": avg, "T": (pp + tg) / avg}
    elif pp:
        row |= {"S_PP": avg, "S_PP_std": std, "T_PP": pp / avg, "T_TG": 0.0, "T": pp / avg,
                "S": avg}
    else:
        row |= {"S_TG": avg, "S_TG_std": std, "T_TG": tg / avg, "T_PP": 0.0, "T": tg / avg,
                "S": avg}
    return row


def _llama_bench(text: str) -> list[dict[str, Any]]:
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        return _llama_bench_json(stripped)
    build = ""
    found = re.search(r"^build: (.+)$", text, flags=re.MULTILINE)
    if found:
        build = f"llama.cpp {found.group(1).strip()}"
    rows: list[dict[str, Any]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.strip().startswith("|"):
            header = None if line.strip() else header
            continue
        cells = _cells(line)
        if "test" in cells and "t/s" in cells:
            header = cells
            continue
        if header is None or set("".join(cells)) <= set("-: "):
            continue
        if len(cells) != len(header):
            raise InputError(f"llama-bench row has {len(cells)} cells, header {len(header)}")
        record = dict(zip(header, cells, strict=True))
        ts = _TS.match(record["t/s"])
        if not ts:
            raise InputError(f"llama-bench t/s cell {record['t/s']!r} is not 'avg ± std'")
        row = _test_row(record["test"], float(ts["avg"]), float(ts["std"]))
        others = {k: v for k, v in record.items() if k != "test"}
        row |= {"build": build, "detail": ", ".join(f"{k}={v}" for k, v in others.items())}
        rows.append(row)
    return rows


def _llama_bench_json(text: str) -> list[dict[str, Any]]:
    try:
        objs = json.loads(text) if text.startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as e:
        raise InputError(f"llama-bench JSON is not valid ({e.msg}, line {e.lineno})") from None
    rows = []
    for obj in objs:
        try:
            pp, tg, depth = int(obj["n_prompt"]), int(obj["n_gen"]), int(obj.get("n_depth", 0))
            avg, std = float(obj["avg_ts"]), float(obj["stddev_ts"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"llama-bench JSON entry lacks n_prompt/n_gen/avg_ts ({e})") from None
        test = "+".join(s for s in (f"pp{pp}" if pp else "", f"tg{tg}" if tg else "") if s)
        row = _test_row(f"{test} @ d{depth}" if depth else test, avg, std)
        samples = np.asarray(obj.get("samples_ns") or [], dtype=np.float64) / 1e9
        if samples.size:
            # Times as measured: the mean, and the spread of the samples.
            phase = "T" if pp and tg else ("T_PP" if pp else "T_TG")
            row[phase] = float(obj["avg_ns"]) / 1e9 if "avg_ns" in obj else float(samples.mean())
            if phase != "T":
                row[f"{phase}_spread"] = float(np.ptp(samples))
                row["T"] = row[phase]
        row["repeats"] = int(samples.size) or 1
        row["build"] = f"llama.cpp {obj.get('build_commit', '?')} ({obj.get('build_number', '?')})"
        row["machine"] = ", ".join(str(obj[k]) for k in ("cpu_info", "gpu_info") if obj.get(k))
        keep = ("model_type", "model_filename", "backends", "n_threads", "n_batch", "n_ubatch",
                "type_k", "type_v", "flash_attn", "n_gpu_layers")
        row["detail"] = ", ".join(f"{k}={obj[k]}" for k in keep if k in obj)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# mlx-lm

_PROMPT = re.compile(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec")
_GENERATION = re.compile(r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec")
_PEAK = re.compile(r"Peak memory: ([\d.]+) GB")
_TIMING = re.compile(
    r"Timing with prompt_tokens=(\d+), generation_tokens=(\d+), batch_size=(\d+)"
)
_TRIAL = re.compile(r"^Trial \d+:\s+(.*)$", re.MULTILINE)


def _mlx_lm(text: str) -> list[dict[str, Any]]:
    if _TIMING.search(text):
        return _mlx_benchmark(text)
    rows = []
    prompts, gens, peaks = (list(p.finditer(text)) for p in (_PROMPT, _GENERATION, _PEAK))
    for i, prompt in enumerate(prompts):
        pp, s_pp = int(prompt[1]), float(prompt[2])
        tg, s_tg = (int(gens[i][1]), float(gens[i][2])) if i < len(gens) else (0, math.nan)
        peak = float(peaks[i][1]) * 1e9 / _MIB if i < len(peaks) else math.nan
        rows.append(_speeds_row(pp, tg, 1, [s_pp], [s_tg], [peak], "mlx_lm.generate"))
    return rows


def _mlx_benchmark(text: str) -> list[dict[str, Any]]:
    rows = []
    blocks = _TIMING.split(text)[1:]  # [pp, tg, b, body, pp, tg, b, body, ...]
    for pp, tg, b, body in zip(*(iter(blocks),) * 4, strict=True):
        trials = [dict(_pairs(m[1])) for m in _TRIAL.finditer(body)]
        if not trials:
            continue
        rows.append(_speeds_row(
            int(pp), int(tg), int(b),
            [t["prompt_tps"] for t in trials], [t["generation_tps"] for t in trials],
            [t.get("peak_memory", math.nan) * 1e9 / _MIB for t in trials], "mlx_lm.benchmark",
        ))
    return rows


def _pairs(text: str) -> Iterable[tuple[str, float]]:
    for item in text.split(","):
        key, _, value = item.strip().partition("=")
        if key and value:
            yield key, float(value)


def _speeds_row(
    pp: int, tg: int, b: int, s_pp: Sequence[float], s_tg: Sequence[float],
    peaks: Sequence[float], tool: str,
) -> dict[str, Any]:
    """A row from per-trial speeds: times per trial, medians, spreads (sweep conventions)."""
    t_pp = b * pp / np.asarray(s_pp, dtype=np.float64)
    t_tg = b * tg / np.asarray(s_tg, dtype=np.float64) if tg else np.zeros(len(s_pp))
    T_PP, T_TG = float(np.median(t_pp)), float(np.median(t_tg))
    n = len(s_pp)
    return {
        "PP": pp, "TG": tg, "B": b, "N_KV": b * (pp + tg),
        "T_PP": T_PP, "S_PP": b * pp / T_PP,
        "T_TG": T_TG, "S_TG": b * tg / T_TG if tg and T_TG > 0 else math.nan,
        "T": T_PP + T_TG, "S": b * (pp + tg) / (T_PP + T_TG),
        "T_PP_spread": float(np.ptp(t_pp)), "T_TG_spread": float(np.ptp(t_tg)),
        "S_PP_std": float(np.std(s_pp, ddof=1)) if n > 1 else math.nan,
        "S_TG_std": float(np.std(s_tg, ddof=1)) if n > 1 and tg else math.nan,
        "repeats": n,
        "peak_backend_mb": max((p for p in peaks if not math.isnan(p)), default=math.nan),
        "detail": f"{tool}; prompt_tps includes sampling the first token",
    }  # fmt: skip
