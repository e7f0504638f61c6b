"""Command line: ``python -m harness parity --checkpoint DIR`` (a checkpoint no case made) or
``--cases NAMES`` (the suite's cases), any of the suite's checks (``--modes``), through the same
:class:`harness.checks.session.CheckSession` as the pytest plugin.

Exit codes: 0 every check passed, 1 some check failed (or a port broke), 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.backends.families import load_checkpoint_config
from harness.backends.targets import REFERENCE, Target, parse_targets
from harness.checks.golden import check_candidates
from harness.checks.session import CHECKS, CheckSession, Subject, parse_modes, plan
from harness.checks.slope_convention import CHOICES as SLOPE_CHOICES
from harness.cli.golden import golden_inputs
from harness.cli.inputs import (
    HARD_PROMPT_CAP,
    case_names,
    check_prompt_limits,
    checkpoint_convention,
    reference_target,
)
from harness.cli.prompts import Prompt, add_prompt_arguments, prompts_from_args, uses_text
from harness.core.errors import InputError, PortFailure, ReferenceFailure
from harness.report.run_folder import check_out_dir
from harness.report.summary import print_summary
from references.checkpoint_io import ALLOW_EXTRA_ENV
from references.config import read_config_json

# Other subcommands live in their own modules, each with add_parser(subparsers) and run(args).
SUBCOMMAND_MODULES = (
    "harness.cli.sweep", "harness.cli.gate", "harness.cli.mtp", "harness.report.browser_check",
    "harness.cli.golden", "harness.cli.kld",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="compare backends with the float64 reference, per layer")
    p.set_defaults(func=run_parity)
    p.add_argument("--checkpoint", type=Path,
                   help="HF-layout directory: config.json + model*.safetensors (+ index)")
    p.add_argument("--cases", default=None,
                   help="instead of --checkpoint: comma-separated case names from cases/ (each "
                        "case's prompts, tolerances and slope convention, as the pytest suite "
                        "runs them)")
    p.add_argument("--backends", default="torch,mlx",
                   help="candidates, e.g. 'torch,mlx' or 'mlx-float32' (default torch,mlx)")
    p.add_argument("--reference", default=REFERENCE, help=f"default {REFERENCE}")
    p.add_argument("--reference-load", choices=("auto", "memory", "streamed"), default="auto",
                   help="the reference's weights: all in memory, or streamed layer by layer "
                        "from the memory-mapped safetensors (memory bounded by one layer's "
                        "widths); auto streams when they would not fit comfortably")
    add_prompt_arguments(p)
    p.add_argument("--mlx-model-module", type=Path,
                   help="a user's MLX port (shaped like mlx-lm's bailing_hybrid.py) under test")
    p.add_argument("--modes", default="prefill", help=f"any of {','.join(CHECKS)}")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="decode mode: tokens fed one at a time after the prefill (>= 1, fewer "
                        "than the prompt's tokens)")
    p.add_argument("--allow-extra-tensors", action="store_true",
                   help="ignore tensors config.json does not account for (with a finding) "
                        "instead of refusing the checkpoint")
    p.add_argument("--beyond-max-positions", action="store_true",
                   help="allow a prompt longer than the config's max_position_embeddings (the "
                        f"hard cap of {HARD_PROMPT_CAP} tokens still holds)")
    p.add_argument("--out", type=Path,
                   help="output folder (must not hold a report); default reports/<time>-parity")
    p.add_argument("--slope", choices=SLOPE_CHOICES, default=None,
                   help="the checkpoint's GLA slope convention (Ling-2.6): the reference computes "
                        "with it; auto reads it off the checkpoint's own modeling code "
                        "(hf_remote); default corrected, with a note")
    p.add_argument("--golden", type=Path,
                   help="a golden run (`python -m harness capture`): compare against its saved "
                        "reference captures and tokens; the reference is not loaded")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


@dataclass
class ParityJob:
    """One checkpoint's share of a parity run: its prompts, candidates and reference."""

    checkpoint: Path
    subjects: list[Subject]
    candidates: list[Target]
    reference: Target
    convention: Any
    golden: Any = None  # GoldenInputs: the reference's captures come from a golden run
    prompts: list[Prompt] = field(default_factory=list)  # text prompts (recorded in the summary)


def _candidates(args: argparse.Namespace, convention: Any) -> list[Target]:
    extra = {}
    if args.mlx_model_module is not None:
        if not args.mlx_model_module.is_file():
            raise InputError(f"{args.mlx_model_module}: --mlx-model-module file not found")
        extra["mlx"] = {"model_module": str(args.mlx_model_module.resolve())}
    candidates = parse_targets(args.backends, extra)
    # our torch reference computes with the checkpoint's convention
    return candidates if convention is None else [convention.target(c) for c in candidates]


def checkpoint_job(args: argparse.Namespace, modes: Sequence[str]) -> ParityJob:
    """``--checkpoint``: its config, prompt and slope convention (or the golden run's), all
    validated before any model is loaded."""
    family, cfg = load_checkpoint_config(args.checkpoint)
    check_out_dir(args.out)
    checkpoint = args.checkpoint.resolve()
    golden = golden_inputs(args, cfg.vocab_size) if args.golden is not None else None
    prompts = prompts_from_args(args, checkpoint, cfg.vocab_size)
    if golden is not None:
        if uses_text(args):
            if len(prompts) != 1:
                raise InputError("--golden: a golden run holds one prompt; the prompt file "
                                 f"gives {len(prompts)}")
            golden.golden.check_tokens(list(prompts[0].tokens), prompts[0].name)
        prompts = [Prompt(checkpoint.name, tuple(golden.tokens), prompts[0].text, "golden")]
    for prompt in prompts:
        check_prompt_limits(prompt.tokens, cfg, decode_steps=args.decode_steps, modes=modes,
                            beyond_max_positions=args.beyond_max_positions)
    convention = checkpoint_convention(args, cfg) if golden is None else golden.convention
    candidates = _candidates(args, convention)
    reference = (reference_target(args.reference, args.reference_load) if golden is None
                 else golden.reference)
    if convention is not None:
        reference = convention.target(reference)
    if golden is not None:
        if weighty := [m for m in modes if CHECKS[m].needs_reference_weights]:
            raise InputError(f"--modes {','.join(weighty)}: these checks run the reference "
                             "itself; a golden run holds its captures only (use prefill, "
                             "decode, mtp)")
        if "mtp" in modes and int(getattr(cfg, "num_nextn_predict_layers", 0) or 0) > 0:
            golden.golden.require_mtp()
        check_candidates(golden.golden, candidates)
    subjects = []
    for i, prompt in enumerate(prompts):
        subject = Subject.from_checkpoint(checkpoint, prompt.tokens, cfg,
                                          decode_steps=args.decode_steps, convention=convention,
                                          family=family.name)
        if prompt.text is not None:  # named as the prompt option names it
            subject = replace(subject, prompt=prompt.name, first_prompt=i == 0)
        subjects.append(subject)
    texts = [p for p in prompts if p.text is not None]
    return ParityJob(checkpoint, subjects, candidates, reference, convention, golden, texts)


def case_jobs(args: argparse.Namespace) -> list[ParityJob]:
    """``--cases``: each case's prompts, tolerances and slope convention, as pytest runs them."""
    from harness.checks.cases import CASES_DIR, load_case
    from harness.checks.slope_convention import case_convention

    names = case_names(args, ("--checkpoint", args.checkpoint), ("--golden", args.golden))
    check_out_dir(args.out)
    jobs = []
    for name in names:
        path = CASES_DIR / f"{name}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CASES_DIR.glob("*.toml")))
            raise InputError(f"--cases: no case {name!r} in {CASES_DIR}; known: {known}")
        case = load_case(path)
        convention = case_convention(case)
        reference = convention.target(reference_target(args.reference, args.reference_load))
        subjects = [Subject.from_case(case, p.name) for p in case.prompts]
        jobs.append(ParityJob(subjects[0].checkpoint, subjects, _candidates(args, convention),
                              reference, convention))
    return jobs


def _run_reference(session: CheckSession, job: ParityJob, modes: Sequence[str]) -> None:
    """The reference runs first and alone (validating the checkpoint before any candidate);
    its captures are kept and, unless a check runs it again, its weights freed."""
    if job.golden is not None:  # its captures stand for the reference, whose weights stay on disk
        golden = job.golden.golden
        golden.check_checkpoint(job.checkpoint,
                                read_config_json(job.checkpoint / "config.json"))
        for s in job.subjects:
            session.seed_golden(job.reference, job.checkpoint, s.tokens, s.decode_steps, golden)
        session.note(f"reference captures read from the golden run {golden.path} "
                     f"({golden.store_dtype}); the reference was not loaded")
        return
    ok, why = session.availability(job.reference)
    if not ok:
        raise InputError(f"the reference {job.reference.label} cannot run here: {why}")
    try:
        for s in job.subjects:
            session.captures(job.reference, job.checkpoint, s.tokens, "prefill", s.decode_steps)
    except PortFailure as e:  # nothing to judge ports against: not a finding about a port
        raise ReferenceFailure(f"the reference could not run {job.checkpoint}: {e}") from None
    session.release(job.checkpoint, job.reference)


def run_parity(args: argparse.Namespace) -> int:
    """Every check in ``--modes`` on ``--checkpoint`` or ``--cases``, through one
    :class:`CheckSession`; then its findings, verdict and run folder."""
    if args.allow_extra_tensors:  # read by the reference and the llama.cpp staging alike
        os.environ[ALLOW_EXTRA_ENV] = "1"
    if (args.checkpoint is None) == (args.cases is None):
        raise InputError("parity: give --checkpoint DIR or --cases NAMES (one of them)")
    modes = parse_modes(args.modes)
    jobs = case_jobs(args) if args.cases is not None else [checkpoint_job(args, modes)]
    session = CheckSession()
    for job in jobs:
        if args.cases is None and job.convention is not None:
            session.note(job.convention.note)
        for prompt in job.prompts:
            shown = prompt.text if len(prompt.text or "") <= 80 else f"{prompt.text[:77]}..."
            session.note(f"prompt {prompt.name} ({prompt.source}): {len(prompt.tokens)} tokens "
                         f"from {shown!r} through the checkpoint's tokenizer")
        _run_reference(session, job, modes)
        for cand in job.candidates:
            ok, why = session.availability(cand)
            for subject, _, mode in plan(job.subjects, [cand], modes):
                if ok:
                    session.run(mode, subject, cand, job.reference)
                else:
                    session.skip(mode, subject, cand, job.reference, why)
            if not ok:
                session.note(f"{cand.label} not run: {why}")
            session.release(job.checkpoint)  # one backend in memory at a time
    if args.cases is None:
        job = jobs[0]
        extra: dict[str, Any] = {"checkpoint": str(job.checkpoint)}
        if job.convention is not None:
            extra["slope_convention"] = job.convention.to_json()
        extra["n_tokens"] = len(job.subjects[0].tokens)
        if job.prompts:
            extra["prompts"] = [p.to_json() for p in job.prompts]
        title, families = f"parity: {job.checkpoint}", ()
    else:
        extra = {"cases": [j.subjects[0].name for j in jobs]}
        title = f"parity: {', '.join(extra['cases'])}"
        families = sorted({_family(j.checkpoint) for j in jobs})
    outcome = session.finish(args.out, reports_root=Path("reports"), title=title, name="parity",
                             modes=modes, families=families, summary_extra=extra)
    print_summary(session.results, session.findings)
    print(session.verdict.headline())
    print(f"report: {outcome.folder / 'index.html'}")
    return outcome.exit_code


def _family(checkpoint: Path) -> str:
    family, _ = load_checkpoint_config(checkpoint)
    return family.name


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; SIGTERM/SIGINT unwind it (children killed, temporary files removed)
    and exit with 128 + the signal's number."""
    from harness.core import lifecycle

    parser = build_parser()
    args = parser.parse_args(argv)
    with lifecycle.termination_handling():
        try:
            try:
                return int(args.func(args))
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        except lifecycle.Terminated as e:
            lifecycle.release_children()
            print(f"error: {e}; child processes stopped, temporary files removed, no report "
                  "written", file=sys.stderr)
            return e.exit_code
