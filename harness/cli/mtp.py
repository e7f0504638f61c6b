"""``python -m harness mtp`` (speculative decoding with the MTP head) and ``python -m harness
slopes`` (which GLA decay formula each backend uses).

mtp: exit 0 when every backend kept its greedy output under speculation and drafted exactly the
reference's tokens with draft logits within the float32 NMSE tolerance (bfloat16/float16
candidates need only the former), 1 otherwise, 2 bad input.  Ling-2.6 drafts against our
reference's MTP head; Ling 3.0 against our MTP head on transformers' trunk (transformers has none).
slopes: exit 0 when every backend applies the checkpoint's convention (--slope; default
corrected) and both diagnosis paths agree.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.backends.targets import REFERENCE, Target, get_backend, parse_targets
from harness.core.errors import InputError, PortFailure
from harness.core.verdict import CheckVerdict, RunVerdict, Status
from harness.report.run_folder import check_out_dir

_LOW_PRECISION = ("bfloat16", "float16")


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InputError(f"{option}: expected positive integers, got {text!r}")
    return values


def add_parser(subparsers: Any) -> None:
    """Register ``mtp`` and ``slopes`` on the harness CLI's subparsers."""
    p = subparsers.add_parser(
        "mtp",
        help="speculative greedy decoding with the MTP head: acceptance per backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="HF-layout checkpoint directory")
    src.add_argument("--cases", help="comma-separated case names (their prompts are used)")
    p.add_argument(
        "--backends",
        default="torch,mlx",
        help="candidates besides the float64 reference (default torch,mlx)",
    )
    p.add_argument("--steps", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument(
        "--chain", type=int, default=1, help="drafts per step (the one MTP layer reused; default 1)"
    )
    from harness.cli.prompts import add_prompt_arguments

    add_prompt_arguments(p)  # with --checkpoint
    p.add_argument("--mlx-model-module", type=Path, help="a user's MLX port under test")
    p.add_argument("--out", type=Path, help="output folder (empty or absent)")

    s = subparsers.add_parser(
        "slopes",
        help="GLA decay per backend: corrected, hf_off_by_one or neither",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.set_defaults(func=run)
    s.add_argument("--checkpoint", type=Path, required=True, help="HF-layout checkpoint directory")
    s.add_argument("--backends", default="mlx", help="backends to diagnose (default mlx)")
    s.add_argument("--mlx-model-module", type=Path, help="a user's MLX port under test")
    s.add_argument("--probe-length", type=int, default=128, help="black-box probe prompt length")
    s.add_argument(
        "--lengths", default="16,64,256,1024", help="context lengths for the error-growth table"
    )
    s.add_argument("--out", type=Path, help="output folder (empty or absent)")
    s.add_argument("--slope", choices=("corrected", "hf_off_by_one", "auto"), default=None,
                   help="the convention the checkpoint expects (auto: read off its own modeling "
                        "code through hf_remote); default corrected, with a note")


def run(args: argparse.Namespace) -> int:
    if args.command == "slopes":
        return run_slopes(args)
    return run_mtp(args)


def _targets(args: argparse.Namespace) -> list[Target]:
    extra: dict[str, dict[str, str]] = {}
    if args.mlx_model_module is not None:
        if not args.mlx_model_module.is_file():
            raise InputError(f"{args.mlx_model_module}: --mlx-model-module file not found")
        extra["mlx"] = {"model_module": str(args.mlx_model_module.resolve())}
    return parse_targets(args.backends, extra)


def _available(target: Target, findings: list[str]) -> bool:
    try:
        avail = get_backend(target.backend).availability()
    except ImportError as e:  # the backend module itself needs a missing package
        findings.append(f"{target.label} not run: {e}")
        return False
    if not avail.ok:
        findings.append(f"{target.label} not run: {avail.reason}")
    return avail.ok


def _write(title: str, name: str, findings: list[str], sections: list, out: Path | None,
           extra=None, verdict: RunVerdict | None = None) -> Path:
    from harness.report.environment import environment
    from harness.report.run_folder import write_run

    return write_run(
        [],
        Path("reports"),
        title=title,
        findings=findings,
        environment=environment(),
        name=name,
        sections=sections,
        out=out,
        extra=extra,
        verdict=verdict,
    )


def run_mtp(args: argparse.Namespace) -> int:
    from harness.checks.mtp import MtpRunner, mtp_frame, mtp_section, save_mtp

    check_out_dir(args.out)
    if args.steps < 1 or args.chain < 1:
        raise InputError("--steps and --chain must be >= 1")
    candidates = _targets(args)
    runner = MtpRunner(steps=args.steps, chain=args.chain)
    jobs = _mtp_jobs(args)
    candidates = [t for t in candidates if _available(t, runner.findings)]
    for checkpoint, prompts in jobs:
        for prompt in prompts:
            runner.run(checkpoint, prompt, candidates)
    df = mtp_frame(runner.runs)
    verdict = mtp_verdict(runner.runs)
    out = _write(
        f"MTP: {', '.join(str(c) for c, _ in jobs)}",
        "mtp",
        runner.findings,
        [mtp_section(runner.runs)],
        args.out,
        extra=lambda folder: save_mtp(df, folder),
        verdict=verdict,
    )
    cols = [
        "case",
        "prompt",
        "backend",
        "acceptance_rate",
        "mean_acceptance_length",
        "draft_top1",
        "greedy_unchanged",
        "drafts_match_reference",
    ]
    print(df[cols].to_string(index=False))
    for f in runner.findings:
        print(f"finding: {f}")
    print(verdict.headline())
    print(f"report: {out / 'index.html'}")
    return verdict.exit_code


def mtp_verdict(runs: Sequence[Any]) -> RunVerdict:
    """One check per backend run; the reference's own row checks that speculation kept its
    greedy output."""
    reference = Target.parse(REFERENCE).label
    verdict = RunVerdict()
    for r in runs:
        low_precision = r.backend.split(",")[0].endswith(_LOW_PRECISION)
        if r.error:
            status = Status.ERROR
        elif (r.greedy_unchanged and (r.drafts_match_reference or low_precision)
              and r.draft_logits_ok):
            status = Status.PASSED
        else:
            status = Status.FAILED
        verdict.add(CheckVerdict(r.case, r.prompt, r.backend, reference, "mtp", status, r.error))
    return verdict


def _mtp_jobs(args: argparse.Namespace) -> list[tuple[Path, list[Any]]]:
    """(checkpoint, prompts) pairs from --checkpoint or --cases."""
    from harness.checks.mtp import MtpPrompt

    if args.checkpoint is not None:
        from harness.backends.families import load_checkpoint_config
        from harness.cli.prompts import prompts_from_args

        _, cfg = load_checkpoint_config(args.checkpoint)
        checkpoint = args.checkpoint.resolve()
        prompts = prompts_from_args(args, checkpoint, cfg.vocab_size)
        return [(checkpoint, [
            MtpPrompt(checkpoint.name,
                      p.name if p.text is not None else f"{len(p.tokens)} tokens", p.tokens)
            for p in prompts])]
    from harness.checks.cases import load_cases, materialize
    from harness.cli.prompts import uses_text

    if uses_text(args) or args.chat:
        raise InputError("--prompt-text/--prompt-file/--chat: not with --cases (a case names "
                         "its prompts)")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    return [
        (materialize(case), [MtpPrompt(case.name, p.name, p.tokens) for p in case.prompts])
        for case in load_cases(names)
    ]


def run_slopes(args: argparse.Namespace) -> int:
    from harness.checks.slope_diagnostics import (
        diagnose,
        formula_growth,
        reference_pair,
        slope_section,
    )
    from references.config import load_config

    check_out_dir(args.out)
    lengths = _ints(args.lengths, "--lengths")
    if args.probe_length < 2:
        raise InputError("--probe-length must be >= 2")
    from harness.checks.slope_convention import resolve

    load_config(args.checkpoint)  # a clear InputError before anything loads
    checkpoint = args.checkpoint.resolve()
    targets = _targets(args)
    convention = resolve(args.slope, checkpoint)
    expected = convention.slope
    findings: list[str] = [convention.note]
    refs = reference_pair(checkpoint)
    between = formula_growth(refs, lengths)
    verdicts = []
    for target in targets:
        if not _available(target, findings):
            continue
        try:
            if target == Target.parse(REFERENCE):
                loaded = refs[expected]
            else:
                loaded = get_backend(target.backend).load(checkpoint, target.options())
            v = diagnose(
                target.label, loaded, refs, probe_length=args.probe_length, lengths=lengths,
                expected=expected,
            )
        except PortFailure as e:
            findings.append(f"{target.label}: {e}")
            continue
        verdicts.append(v)
        findings += [f"{target.label}: {n}" for n in v.notes]
        if v.verdict != expected:
            factors = ", ".join(f"l={d.layer}: f={d.factor:.5f}" for d in v.black_box)
            findings.append(f"{convention.mismatch(target.label, v.verdict)} (fitted {factors})")
    out = _write(
        f"GLA slopes: {checkpoint}",
        "slopes",
        findings,
        [slope_section(verdicts, between)],
        args.out,
    )
    (out / "slopes.json").write_text(json.dumps(
        {"slope_convention": convention.to_json(), **_slopes_json(verdicts, between)}, indent=2))
    for v in verdicts:
        print(
            f"{v.backend}: {v.verdict} (exposed: "
            f"{'n/a' if v.exposed is None else v.verdict}, black box: {v.black_box_verdict})"
        )
    print(
        "logits NMSE, off-by-one vs corrected reference: "
        + ", ".join(f"T={t}: {x:.2e}" for t, x in between.items())
    )
    for f in findings:
        print(f"finding: {f}")
    print(f"report: {out / 'index.html'}")
    ok = verdicts and all(v.verdict == expected and v.agree is not False for v in verdicts)
    return 0 if ok and len(verdicts) == len(targets) else 1


def _slopes_json(verdicts: list, between: dict[int, float]) -> dict[str, Any]:
    def layers(ds: list | None) -> list[dict[str, Any]] | None:
        if ds is None:
            return None
        return [
            {
                "layer": d.layer,
                "verdict": d.verdict,
                "factor": d.factor,
                "log_decay": [float(x) for x in d.log_decay],
                "error": {k: (None if math.isnan(x) else x) for k, x in d.error.items()},
            }
            for d in ds
        ]

    return {
        "formula_growth": {str(t): x for t, x in between.items()},
        "backends": {
            v.backend: {
                "verdict": v.verdict,
                "black_box_verdict": v.black_box_verdict,
                "agree": v.agree,
                "exposed": layers(v.exposed),
                "black_box": layers(v.black_box),
                "growth": {str(t): x for t, x in v.growth.items()},
                "notes": v.notes,
            }
            for v in verdicts
        },
    }
