"""Run one Ling-2.6 case through our llama.cpp port and the float64 reference, point by point.

``python -m ports.llamacpp.parity [CASE ...] [--outtype f32|f16|q8_0] [--kv f32|f16]`` prints the
worst NMSE per layer (prefill), the logits figures (prefill and decode) and the router ids; the
test module uses :func:`run_case` directly.

A thin driver over the harness's own machinery: our port is the ``llamacpp`` backend on our
patched build and our converter's GGUF (:func:`port_target`), judged by the check session's
prefill and decode checks (:mod:`harness.checks.session`) with :mod:`harness.checks.compare`'s
metrics, exactly as ``python -m harness parity`` and the pytest suite judge any port.  Decode
prefills the prompt minus ``decode_steps`` tokens and feeds the rest one at a time through the
port's cache, every capture point of every step compared with the reference's forward.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from harness.backends.targets import REFERENCE, Target
from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.compare import PairResult
from harness.checks.session import CheckSession, Subject
from harness.core import capture_points
from harness.core.capture_points import Kind
from harness.core.errors import PortFailure
from harness.core.metrics import nmse
from harness.core.verdict import Status
from harness.llamacpp import build
from ports.llamacpp import port

TRUNK_POINTS = ("result_norm", "result_output")


def port_target(checkpoint: Path, *, site: Path, outtype: str = "f32", kv: str = "f32",
                n_ubatch: int = 512) -> Target:
    """Our port as a harness target: the llama.cpp backend on our patched build (``site``),
    running our converter's GGUF of ``checkpoint`` with a ``kv`` cache."""
    gguf = port.converted(checkpoint, outtype)
    options = {"site": str(site), "gguf": str(gguf), "type_k": kv}
    if n_ubatch != 512:
        options.update(n_batch=str(n_ubatch), n_ubatch=str(n_ubatch))
    return Target.parse("llamacpp-float32", options)


@dataclass
class CaseResult:
    """The session's prefill and decode checks of our port on one case's prompt."""

    case: str
    outtype: str
    kv: str
    n_prompt: int
    prefill: PairResult
    decode: PairResult
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def pairs(self) -> tuple[PairResult, PairResult]:
        return self.prefill, self.decode

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.pairs)

    @property
    def missing(self) -> list[str]:
        """Reference points the port did not produce (prefill or decode)."""
        return sorted({name for p in self.pairs for name in p.only_reference})

    def dense(self, pair: PairResult) -> dict[str, float]:
        """Point -> NMSE of the dense points of one check."""
        t = pair.table[pair.table["kind"] != Kind.INDEX.value]
        return dict(zip(t["point"], t["nmse"].astype(float), strict=True))

    def index_mismatch(self) -> float:
        """The worst fraction of rows whose router ids differ, over both checks."""
        rows = [p.table[p.table["kind"] == Kind.INDEX.value] for p in self.pairs]
        return max((1.0 - float(r["index_agreement"].min()) for r in rows if len(r)),
                   default=0.0)

    def top1(self, pair: PairResult) -> float:
        logits = pair.table[pair.table["point"] == "result_output"]
        return float(logits["top1"].iloc[0]) if len(logits) else float("nan")


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
    """The session's prefill and decode checks of our port against the float64 reference."""
    from harness.checks.slope_convention import case_convention

    case = load_case(CASES_DIR / f"{case_name}.toml")
    subject = Subject.from_case(case, case.prompts[prompt_index].name)
    if decode_steps is not None:
        subject = replace(subject, decode_steps=decode_steps)
    site = site or build.ensure_site(patches=port.patches())
    t0 = time.monotonic()
    candidate = port_target(materialize(case), site=site, outtype=outtype, kv=kv,
                            n_ubatch=n_ubatch)
    seconds = {"convert": time.monotonic() - t0}
    reference = case_convention(case).target(Target.parse(REFERENCE))
    session = CheckSession()
    pairs = {}
    try:
        for mode in ("prefill", "decode"):
            t0 = time.monotonic()
            result = session.run(mode, subject, candidate, reference)
            seconds[mode] = time.monotonic() - t0
            if result.status in (Status.ERROR, Status.SKIPPED):
                raise PortFailure(f"{case_name} {mode}: {result.message}")
            pairs[mode] = result.result
    finally:
        session.release()
    return CaseResult(case_name, outtype, kv, len(subject.tokens), pairs["prefill"],
                      pairs["decode"], seconds)


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
    from harness.backends.llamacpp_mtp import load_llamacpp_mtp
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
    table = r.prefill.table
    dense = table[(table["kind"] != Kind.INDEX.value) & table["layer"].notna()]
    for layer, rows in dense.groupby("layer"):
        worst = rows.loc[rows["nmse"].idxmax()]
        stem = capture_points.parse(str(worst["point"]))[0].stem
        lines.append(f"  layer {int(layer):2d}: worst {worst['nmse']:.2e} ({stem})")
    points = r.dense(r.prefill)
    for name in TRUNK_POINTS:
        if name in points:
            lines.append(f"  {name}: {points[name]:.2e}")
    lines.append(
        f"  router ids mismatch rows: {r.index_mismatch():.3f}; missing: {r.missing or '-'}"
    )
    for pair in r.pairs:
        worst = max(r.dense(pair).values(), default=float("nan"))
        lines.append(f"  {pair.mode}: worst NMSE {worst:.2e}, logits top1 {r.top1(pair):.3f}, "
                     f"{'PASS' if pair.passed else 'FAIL'}")
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
        args.json.write_text(json.dumps([_json(r) for r in results], indent=1, default=str))
    return 0 if all(getattr(r, "passed", True) for r in results) else 1


def _json(r: CaseResult | MTPResult) -> dict:
    if isinstance(r, MTPResult):
        return asdict(r)
    return {"case": r.case, "outtype": r.outtype, "kv": r.kv, "n_prompt": r.n_prompt,
            "passed": r.passed, "missing": r.missing, "seconds": r.seconds,
            **{p.mode: {"passed": p.passed, "first_divergence": p.first_divergence,
                        "top1": r.top1(p), "nmse": r.dense(p)} for p in r.pairs}}


if __name__ == "__main__":
    sys.exit(main())
