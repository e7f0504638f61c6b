"""Run one Ling-2.6 case through our llama.cpp port and the float64 reference, point by point.

``python -m ports.llamacpp.parity [CASE ...] [--outtype f32|f16|q8_0] [--kv f32|f16]`` prints the
worst NMSE per layer (prefill), the logits figures (prefill and each decode step) and the decode
tokens; the test module uses :func:`run_case` directly.

Decode: the reference's greedy token is fed to both sides at every step, so a single late
argmax flip cannot derail the comparison of the following steps; top-1 agreement is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.core import capture_points
from harness.core.capture_points import Kind
from harness.llamacpp import build
from harness.llamacpp.client import ContextParams, WorkerClient
from harness.llamacpp.names import to_canonical, wanted_names
from ports.llamacpp import port

TRUNK_POINTS = ("result_norm", "result_output")


def nmse(cand: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64).reshape(ref.shape)
    den = float(np.sum(ref * ref))
    num = float(np.sum((cand - ref) ** 2))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


@dataclass
class CaseResult:
    case: str
    outtype: str
    kv: str
    n_prompt: int
    # canonical -> NMSE (INDEX points: fraction of rows whose id sets differ)
    points: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # reference points the port did not produce
    layer_worst: dict[int, tuple[str, float]] = field(default_factory=dict)
    prefill_logits_nmse: float = 0.0
    prefill_top1: float = 0.0
    decode_logits_nmse: list[float] = field(default_factory=list)
    decode_top1: list[bool] = field(default_factory=list)
    decode_l_out_worst: float = 0.0
    decode_tokens: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def worst(self) -> tuple[str, float]:
        dense = {
            k: v for k, v in self.points.items() if capture_points.kind_of(k) is not Kind.INDEX
        }
        k = max(dense, key=dense.__getitem__)
        return k, dense[k]

    def index_mismatch(self) -> float:
        idx = [v for k, v in self.points.items() if capture_points.kind_of(k) is Kind.INDEX]
        return max(idx, default=0.0)


def _compare(result: CaseResult, cand: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    for name in capture_points.in_forward_order(set(ref)):
        if name not in cand:
            result.missing.append(name)
            continue
        r = ref[name].reshape(ref[name].shape[0], -1)
        c = cand[name].reshape(r.shape)
        if capture_points.kind_of(name) is Kind.INDEX:
            value = float(np.mean(np.any(np.sort(c, 1) != np.sort(r, 1), axis=1)))
        else:
            value = nmse(c, r)
        result.points[name] = value
        layer = capture_points.layer_of(name)
        if layer is not None and capture_points.kind_of(name) is not Kind.INDEX:
            prev = result.layer_worst.get(layer)
            if prev is None or value > prev[1]:
                result.layer_worst[layer] = (capture_points.parse(name)[0].stem, value)


def run_case(
    case_name: str,
    *,
    site: Path | None = None,
    outtype: str = "f32",
    kv: str = "f32",
    prompt_index: int = 0,
    decode_steps: int | None = None,
    n_ubatch: int = 512,
) -> CaseResult:
    """Prefill the case's prompt, then greedy-decode, in both; compare every canonical point."""
    from references.model import BailingHybridReference

    case = load_case(CASES_DIR / f"{case_name}.toml")
    checkpoint = materialize(case)
    prompt = list(case.prompts[prompt_index].tokens)
    steps = case.decode_steps if decode_steps is None else decode_steps
    site = site or build.ensure_site(patches=port.patches())
    t0 = time.monotonic()
    gguf = port.converted(checkpoint, outtype)
    result = CaseResult(case_name, outtype, kv, len(prompt))
    result.seconds["convert"] = time.monotonic() - t0

    ref_model = BailingHybridReference.from_checkpoint(checkpoint)
    n_layers = ref_model.n_layers
    canonical = capture_points.all_points(n_layers)
    session = ref_model.start(canonical)
    t0 = time.monotonic()
    ref_caps = session.feed(prompt)
    result.seconds["reference_prefill"] = time.monotonic() - t0

    n_ctx = len(prompt) + steps + 8
    params = ContextParams(
        n_ctx=n_ctx,
        n_batch=min(n_ctx, n_ubatch),
        n_ubatch=min(n_ctx, n_ubatch),
        type_k=kv,
        type_v=kv,
    )
    with WorkerClient(site=site, label="llama.cpp (ours-bailing_hybrid)") as w:
        info = w.load(gguf, params)
        assert info["arch"] == port.ARCH, info
        t0 = time.monotonic()
        out = w.feed(prompt, wanted_names(port.NAMES, canonical))
        result.seconds["port_prefill"] = time.monotonic() - t0
        cand = to_canonical(port.NAMES, out.tensors, canonical, len(prompt))
        _compare(result, cand, ref_caps)
        ref_logits = ref_caps["result_output"]
        result.prefill_logits_nmse = nmse(out.logits, ref_logits)
        result.prefill_top1 = float(np.mean(out.logits.argmax(-1) == ref_logits.argmax(-1)))

        last = ref_logits[-1]
        l_out = [f"l_out-{i}" for i in range(n_layers)]
        for _ in range(steps):
            tok = int(np.argmax(last))
            result.decode_tokens.append(tok)
            ref_step = session.feed([tok])
            step = w.feed([tok], wanted_names(port.NAMES, l_out))
            got = to_canonical(port.NAMES, step.tensors, l_out, 1)
            for name in l_out:
                result.decode_l_out_worst = max(
                    result.decode_l_out_worst, nmse(got[name], ref_step[name])
                )
            last = ref_step["result_output"][-1]
            result.decode_logits_nmse.append(nmse(step.logits[-1], last))
            result.decode_top1.append(int(step.logits[-1].argmax()) == int(last.argmax()))
    return result


@dataclass
class MTPResult:
    case: str
    n_prompt: int
    n_decode: int
    points: dict[str, float] = field(default_factory=dict)  # worst over prefill + decode calls
    missing: list[str] = field(default_factory=list)
    top1: float = 0.0
    seconds: float = 0.0


def run_mtp_case(
    case_name: str,
    *,
    site: Path | None = None,
    prompt_index: int = 0,
    decode_steps: int = 4,
    timeout: float = 900,
) -> MTPResult:
    """The MTP head (reference math of doc section 3.1) through our port's MTP context, driven
    as serving drives it (:meth:`harness.llamacpp.mtp.LlamaCppMtpModel.capture_calls`)."""
    from harness.backends.base import BackendOptions
    from harness.llamacpp.mtp import load_llamacpp_mtp
    from references.model import BailingHybridReference

    case = load_case(CASES_DIR / f"{case_name}.toml")
    checkpoint = materialize(case)
    prompt = list(case.prompts[prompt_index].tokens)
    site = site or build.ensure_site(patches=port.patches())
    gguf = port.converted(checkpoint, "f32")

    ref = BailingHybridReference.from_checkpoint(checkpoint)
    mtp_points = [p.stem for p in capture_points.MTP_POINTS]
    session = ref.start(mtp_points)
    ref_calls = [session.feed(prompt)]
    tokens: list[int] = []
    last = ref_calls[0]["result_output"][-1]
    for _ in range(decode_steps):
        tokens.append(int(np.argmax(last)))
        ref_calls.append(session.feed([tokens[-1]]))
        last = ref_calls[-1]["result_output"][-1]

    result = MTPResult(case_name, len(prompt), decode_steps)
    n_ctx = max(64, len(prompt) + decode_steps + 8)
    options = BackendOptions(
        extra={"gguf": str(gguf), "site": str(site), "n_ctx": str(n_ctx), "timeout": str(timeout)}
    )
    t0 = time.monotonic()
    model = load_llamacpp_mtp(checkpoint, options)
    try:
        calls = model.capture_calls(prompt, tokens)
    finally:
        model.close()
    result.seconds = time.monotonic() - t0

    agree = total = 0
    for ref_caps, cand in zip(ref_calls, calls, strict=True):
        logits = cand["mtp_result_output"]
        for name in mtp_points:
            if name not in ref_caps:
                continue
            r = ref_caps[name].reshape(ref_caps[name].shape[0], -1)
            if name not in cand:
                if name not in result.missing:
                    result.missing.append(name)
                continue
            c = cand[name].reshape(r.shape)
            if capture_points.kind_of(name) is Kind.INDEX:
                v = float(np.mean(np.any(c != r, axis=1)))
            else:
                v = nmse(c, r)
            result.points[name] = max(result.points.get(name, 0.0), v)
        r_log = ref_caps["mtp_result_output"]
        agree += int(np.sum(logits.argmax(-1) == r_log.argmax(-1)))
        total += r_log.shape[0]
    result.top1 = agree / max(1, total)
    return result


def _fmt_mtp(r: MTPResult) -> str:
    lines = [f"== {r.case} MTP (f32, prompt {r.n_prompt} tok + {r.n_decode} decode steps) =="]
    for name in [p.stem for p in capture_points.MTP_POINTS]:
        if name in r.points:
            lines.append(f"  {name}: {r.points[name]:.2e}")
    lines.append(f"  top1 {r.top1:.3f}; missing: {r.missing or '-'}; {r.seconds:.1f} s")
    return "\n".join(lines)


def _fmt(r: CaseResult) -> str:
    lines = [f"== {r.case} ({r.outtype} GGUF, {r.kv} KV, prompt {r.n_prompt} tok) =="]
    for layer in sorted(r.layer_worst):
        stem, v = r.layer_worst[layer]
        lines.append(f"  layer {layer:2d}: worst {v:.2e} ({stem})")
    for name in TRUNK_POINTS:
        if name in r.points:
            lines.append(f"  {name}: {r.points[name]:.2e}")
    lines.append(
        f"  router ids mismatch rows: {r.index_mismatch():.3f}; missing: {r.missing or '-'}"
    )
    lines.append(f"  prefill logits NMSE {r.prefill_logits_nmse:.2e}, top1 {r.prefill_top1:.3f}")
    if r.decode_logits_nmse:
        lines.append(
            f"  decode {len(r.decode_tokens)} steps: worst logits NMSE "
            f"{max(r.decode_logits_nmse):.2e}, worst l_out {r.decode_l_out_worst:.2e}, "
            f"top1 {sum(r.decode_top1)}/{len(r.decode_top1)}"
        )
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r.seconds.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ports.llamacpp.parity", description=__doc__)
    ap.add_argument(
        "cases",
        nargs="*",
        default=["flash-mini", "tail-clause", "heads-6", "rope-dims", "no-qlora", "long-context"],
    )
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--kv", default="f32", choices=["f32", "f16"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--mtp", action="store_true", help="run the MTP head instead of the trunk")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    site = build.ensure_site(patches=port.patches())
    print(f"site ready in {time.monotonic() - t0:.1f} s: {site}", flush=True)
    results = []
    for name in args.cases:
        if args.mtp:
            m = run_mtp_case(name, site=site)
            results.append(m)
            print(_fmt_mtp(m), flush=True)
            continue
        r = run_case(name, site=site, outtype=args.outtype, kv=args.kv)
        results.append(r)
        print(_fmt(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
