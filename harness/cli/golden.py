"""``python -m harness capture``: run only the reference and save its captures (a golden run),
and the ``parity --golden`` side that reads one back instead of loading the reference.

    python -m harness capture --checkpoint DIR [--prompt-tokens FILE] --out GOLDEN
    python -m harness parity --checkpoint DIR --golden GOLDEN --backends mlx,llamacpp
    python -m harness capture --cases NAMES --out GOLDENS   # one per case and prompt
    pytest cases --cases NAMES --golden GOLDENS

On a checkpoint with an MTP layer the reference's side of the ``mtp`` check is recorded too
(``--modes`` without mtp leaves it out).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.backends.targets import REFERENCE, Target
from harness.checks.golden import (
    STORE_DTYPES,
    GoldenRun,
    case_golden_path,
    checkpoint_fingerprint,
    config_digest,
    open_golden,
    target_json,
    versions,
    write_golden,
)
from harness.checks.slope_convention import CHOICES as SLOPE_CHOICES
from harness.core.errors import InputError

if TYPE_CHECKING:
    from harness.checks.session import CheckSession

CAPTURE_MODES = ("prefill", "decode", "mtp")  # the checks a golden run can serve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "capture", help="run only the float64 reference and save its captures (a golden run) "
                        "for `parity --golden` (or `pytest cases --golden`) on another machine")
    p.set_defaults(func=run)
    p.add_argument("--checkpoint", type=Path,
                   help="HF-layout directory: config.json + model*.safetensors (+ index)")
    p.add_argument("--cases", default=None,
                   help="instead of --checkpoint: comma-separated case names; one golden run "
                        "per case and prompt, OUT/<case>/<prompt>/, for `pytest cases --golden "
                        "OUT`")
    p.add_argument("--out", type=Path, required=True,
                   help="the golden run's folder (must not exist or be empty)")
    from harness.cli.prompts import add_prompt_arguments

    add_prompt_arguments(p)  # a golden run holds one prompt
    p.add_argument("--modes", default=None,
                   help="the checks the golden run must serve, any of "
                        f"{','.join(CAPTURE_MODES)} (default: all that apply; mtp records the "
                        "MTP head's run and captures, on a checkpoint with an MTP layer)")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="checked like parity's (the reference's prefill serves decode checks)")
    p.add_argument("--reference", default=REFERENCE, help=f"default {REFERENCE}")
    p.add_argument("--reference-load", choices=("auto", "memory", "streamed"), default="auto",
                   help="the reference's weights: in memory, or streamed layer by layer")
    p.add_argument("--slope", choices=SLOPE_CHOICES, default=None,
                   help="the checkpoint's GLA slope convention (as for parity); recorded")
    p.add_argument("--store-dtype", choices=STORE_DTYPES, default="float64",
                   help="float64 (default) keeps every verdict of a direct run; float32 halves "
                        "the size (error NMSE ~1e-15) and cannot serve float64 candidates")
    p.add_argument("--allow-extra-tensors", action="store_true",
                   help="ignore tensors config.json does not account for (with a finding)")
    p.add_argument("--beyond-max-positions", action="store_true",
                   help="allow a prompt longer than the config's max_position_embeddings")


def capture_modes(text: str | None, has_mtp: bool, where: str) -> list[str]:
    """``--modes`` of ``capture``: the checks a golden run serves (default: all that apply)."""
    from harness.checks.session import parse_modes

    if text is None:
        return [m for m in CAPTURE_MODES if m != "mtp" or has_mtp]
    modes = parse_modes(text)
    if other := [m for m in modes if m not in CAPTURE_MODES]:
        raise InputError(f"--modes {','.join(other)}: these checks run the reference itself; "
                         f"a golden run serves {', '.join(CAPTURE_MODES)}")
    if "mtp" in modes and not has_mtp:
        raise InputError(f"--modes mtp: {where} has no MTP layer (num_nextn_predict_layers)")
    return modes


@dataclass(frozen=True)
class CaptureJob:
    """One golden run to write: a checkpoint, a prompt, the reference and what to record."""

    checkpoint: Path
    tokens: list[int]
    decode_steps: int
    reference: Target
    convention: Any  # SlopeConvention | None
    load: str
    mtp: bool  # record the reference's side of the mtp check
    out: Path


def run(args: argparse.Namespace) -> int:
    """Validate everything, run the reference once per prompt, write the golden run(s)
    atomically (``--cases``: one folder holding a golden run per case and prompt)."""
    import os

    from harness.checks.session import CheckSession
    from harness.core.atomic import staged_dir
    from references.checkpoint_io import ALLOW_EXTRA_ENV

    if args.allow_extra_tensors:
        os.environ[ALLOW_EXTRA_ENV] = "1"
    if (args.checkpoint is None) == (args.cases is None):
        raise InputError("capture: give --checkpoint DIR or --cases NAMES (one of them)")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"{args.out}: exists and is not an empty folder; a golden run is "
                         "never overwritten")
    if args.cases is None:
        job = _checkpoint_job(args)
        session = CheckSession()
        said = _capture(job, args.store_dtype, session)
        session.release()
        print(f"golden run: {job.out} ({said})")
        return 0
    jobs = _case_jobs(args)
    session = CheckSession()
    with staged_dir(args.out) as tmp:
        for i, job in enumerate(jobs):
            said = _capture(CaptureJob(**{**job.__dict__, "out": tmp / job.out}),
                            args.store_dtype, session)
            print(f"golden run: {args.out / job.out} ({said})")
            if i + 1 == len(jobs) or jobs[i + 1].checkpoint != job.checkpoint:
                session.release()  # one case's reference in memory at a time
    print(f"golden runs: {args.out} ({len(jobs)} prompts; pytest cases --golden {args.out})")
    return 0


def _checkpoint_job(args: argparse.Namespace) -> CaptureJob:
    from harness.backends.families import load_checkpoint_config
    from harness.cli.inputs import check_prompt_limits, checkpoint_convention, reference_target
    from harness.cli.prompts import prompts_from_args

    _, cfg = load_checkpoint_config(args.checkpoint)
    modes = capture_modes(args.modes,
                          int(getattr(cfg, "num_nextn_predict_layers", 0) or 0) > 0,
                          str(args.checkpoint))
    prompts = prompts_from_args(args, args.checkpoint.resolve(), cfg.vocab_size)
    if len(prompts) != 1:
        raise InputError(f"{args.prompt_file}: a golden run holds one prompt, the file gives "
                         f"{len(prompts)}")
    tokens = list(prompts[0].tokens)
    check_prompt_limits(tokens, cfg, decode_steps=args.decode_steps, modes=("decode",),
                        beyond_max_positions=args.beyond_max_positions)
    convention = checkpoint_convention(args, cfg)
    reference = reference_target(args.reference, args.reference_load)
    if convention is not None:
        reference = convention.target(reference)
    return CaptureJob(args.checkpoint.resolve(), tokens, args.decode_steps, reference,
                      convention, args.reference_load, "mtp" in modes, args.out)


def _case_jobs(args: argparse.Namespace) -> list[CaptureJob]:
    """``--cases``: each case's prompts, decode steps and slope convention, as pytest runs
    them; the mtp side on each case's first prompt (where the mtp check runs)."""
    from harness.checks.cases import load_cases, materialize
    from harness.checks.slope_convention import case_convention
    from harness.cli.inputs import case_names, reference_target

    names = case_names(args)
    jobs = []
    for case in load_cases(names):
        has_mtp = int(case.config.get("num_nextn_predict_layers") or 0) > 0
        modes = capture_modes(args.modes, has_mtp, f"case {case.name}")
        convention = case_convention(case)
        reference = convention.target(reference_target(args.reference, args.reference_load))
        checkpoint = materialize(case)
        jobs += [CaptureJob(checkpoint, list(p.tokens), case.decode_steps, reference, convention,
                            args.reference_load, "mtp" in modes and i == 0,
                            case_golden_path(Path(), case.name, p.name))
                 for i, p in enumerate(case.prompts)]
    return jobs


def _capture(job: CaptureJob, store_dtype: str, session: CheckSession) -> str:
    """Run the reference on one prompt (and its MTP head) in ``session`` (its models are
    reused across a case's prompts), write the golden run; what it holds, in words."""
    from harness.checks.mtp import mtp_captures_declared, record_reference
    from harness.checks.session import MTP_STEPS
    from references.config import read_config_json

    ok, why = session.availability(job.reference)
    if not ok:
        raise InputError(f"the reference {job.reference.label} cannot run here: {why}")
    raw = read_config_json(job.checkpoint / "config.json")
    fingerprint = checkpoint_fingerprint(job.checkpoint)
    captures = session.captures(job.reference, job.checkpoint, job.tokens, "prefill",
                                job.decode_steps)
    mtp = None
    if job.mtp:
        model = session.mtp_model(job.reference, job.checkpoint)
        mtp = record_reference(model, job.tokens, MTP_STEPS, 1,
                               mtp_captures_declared(job.reference, job.checkpoint))
    manifest: dict[str, Any] = {
        "checkpoint": str(job.checkpoint), "config": raw, "config_sha256": config_digest(raw),
        "fingerprint": fingerprint, "tokens": list(job.tokens), "decode_steps": job.decode_steps,
        "reference": {**target_json(job.reference), "load": job.load},
        "slope_convention": job.convention.to_json() if job.convention is not None else None,
        "findings": session.findings + [f for m in session.models.values()
                                        for f in getattr(m, "findings", ()) or ()],
        "versions": versions(),
    }
    write_golden(job.out, captures, manifest, store_dtype, mtp)
    size = sum(p.stat().st_size for p in job.out.glob("*.safetensors"))
    extra = f", MTP run of {MTP_STEPS} steps" if mtp is not None else ""
    return (f"{len(captures)} capture points of {job.reference.label}, {len(job.tokens)} "
            f"tokens{extra}, {size / 2**20:.1f} MiB {store_dtype}")


@dataclass(frozen=True)
class GoldenInputs:
    """What ``parity --golden`` takes from the golden run instead of computing it."""

    golden: GoldenRun
    tokens: list[int]
    reference: Target
    convention: Any  # harness.checks.slope_convention.SlopeConvention | None


def golden_inputs(args: argparse.Namespace, vocab_size: int) -> GoldenInputs:
    """The golden run's tokens, reference target and slope convention, after refusing every
    option that disagrees with it (before any model is loaded)."""
    from harness.checks.slope_convention import SlopeConvention
    from harness.cli.inputs import read_prompt

    golden = open_golden(args.golden)
    tokens = golden.tokens
    if args.prompt_tokens is not None:
        golden.check_tokens(read_prompt(args.prompt_tokens, vocab_size), str(args.prompt_tokens))
    if args.reference != REFERENCE or args.reference_load != "auto":
        raise InputError("--reference/--reference-load: with --golden the reference is the "
                         f"golden run's ({golden.reference.label}) and is not loaded")
    recorded = golden.slope_convention
    convention = SlopeConvention(**recorded) if recorded is not None else None
    if args.slope is not None and (convention is None or args.slope != convention.slope):
        held = convention.slope if convention is not None else "none"
        raise InputError(f"--slope {args.slope}: the golden run's reference computed with "
                         f"slope convention {held}; leave --slope out or capture again")
    return GoldenInputs(golden, tokens, golden.reference, convention)
