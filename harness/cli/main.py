"""Command line: ``python -m harness parity --checkpoint DIR ...`` for a checkpoint no case made.

Exit codes: 0 every compared pair passed, 1 some pair failed (or a port broke), 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.backends.families import load_checkpoint_config
from harness.backends.llamacpp_backend import model_findings
from harness.backends.targets import REFERENCE, Target, parse_targets
from harness.checks.cases import DEFAULT_TOLERANCES
from harness.checks.compare import PairResult, explain_divergence
from harness.checks.runner import MODES, Runner
from harness.checks.slope_convention import CHOICES as SLOPE_CHOICES
from harness.cli.golden import check_candidates, golden_inputs
from harness.core.errors import ArchitectureNotSupported, InputError, PortFailure, ReferenceFailure
from harness.core.verdict import CheckVerdict, RunVerdict, Status
from harness.pytest_plugin.plugin import environment
from harness.report.run_folder import check_out_dir, write_run
from harness.report.summary import print_summary
from references.checkpoint_io import ALLOW_EXTRA_ENV
from references.config import read_config_json

DEFAULT_PROMPT_LENGTH = 64
# The float64 reference keeps every capture of the whole prompt in memory: 100k tokens of a tiny
# model took 15.6 GB and 400 s. Longer prompts are a corpus job (chunks), not one parity forward.
HARD_PROMPT_CAP = 16384
# Other subcommands live in their own modules, each with add_parser(subparsers) and run(args).
SUBCOMMAND_MODULES = (
    "harness.cli.sweep", "harness.cli.gate", "harness.cli.mtp", "harness.report.browser_check",
    "harness.cli.golden",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="compare backends with the float64 reference, per layer")
    p.set_defaults(func=run_parity)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="HF-layout directory: config.json + model*.safetensors (+ index)")
    p.add_argument("--backends", default="torch,mlx",
                   help="candidates, e.g. 'torch,mlx' or 'mlx-float32' (default torch,mlx)")
    p.add_argument("--reference", default=REFERENCE, help=f"default {REFERENCE}")
    p.add_argument("--reference-load", choices=("auto", "memory", "streamed"), default="auto",
                   help="the reference's weights: all in memory, or streamed layer by layer "
                        "from the memory-mapped safetensors (memory bounded by one layer's "
                        "widths); auto streams when they would not fit comfortably")
    p.add_argument("--prompt-tokens", type=Path,
                   help='JSON file {"tokens": [...]}; default: 64 seeded random ids')
    p.add_argument("--mlx-model-module", type=Path,
                   help="a user's MLX port (shaped like mlx-lm's bailing_hybrid.py) under test")
    p.add_argument("--modes", default="prefill", help=f"any of {','.join(MODES)}")
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


def read_prompt(path: Path | None, vocab_size: int) -> list[int]:
    """The prompt's token ids, validated against the vocabulary."""
    if path is None:
        return np.random.default_rng(0).integers(0, vocab_size, DEFAULT_PROMPT_LENGTH).tolist()
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    tokens = raw.get("tokens") if isinstance(raw, dict) else None
    if not isinstance(tokens, list) or not tokens:
        raise InputError(f'{path}: expected {{"tokens": [id, ...]}} with at least one id')
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InputError(f"{path}: 'tokens' must hold integers only")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"{path}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return tokens


def summary_json(results: Sequence[PairResult], verdict: RunVerdict) -> dict:
    """The run's verdict (harness.core.verdict: the one source of ``passed`` and the exit code),
    then
    per pair: first divergence (name or null), NMSE per capture point, top-1 agreement."""
    pairs = {}
    for r in results:
        key = f"{r.candidate} vs {r.reference}" + ("" if r.mode == "prefill" else f" ({r.mode})")
        t = r.table
        logits = t[t["point"] == "result_output"]
        pairs[key] = {
            "candidate": r.candidate,
            "reference": r.reference,
            "mode": r.mode,
            "passed": bool(r.passed),
            "first_divergence": r.first_divergence,
            "explanation": explain_divergence(r.first_divergence) if r.first_divergence else None,
            "nmse": {p: float(v) for p, v in zip(t["point"], t["nmse"], strict=True)
                     if not np.isnan(v)},
            "top1_agreement": float(logits["top1"].iloc[0]) if len(logits) else None,
        }
    return {**verdict.to_json(), "pairs": pairs}


def parse_modes(text: str) -> list[str]:
    """``--modes``: at least one known mode, each once."""
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not modes:
        raise InputError(f"--modes: no mode given in {text!r}; known: {', '.join(MODES)}")
    for m in modes:
        if m not in MODES:
            raise InputError(f"--modes: unknown mode {m!r}; known: {', '.join(MODES)}")
    return modes


def check_prompt_limits(tokens: Sequence[int], cfg: object, *, decode_steps: int,
                        modes: Sequence[str], beyond_max_positions: bool) -> None:
    """Prompt length against the model's positions and the harness's hard cap; decode steps
    within the prompt. All before any model is loaded."""
    n = len(tokens)
    if n > HARD_PROMPT_CAP:
        raise InputError(
            f"prompt of {n} tokens exceeds the harness's hard cap of {HARD_PROMPT_CAP} tokens "
            "per parity run (the reference keeps every capture of the prompt in float64)")
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if limit and n > limit and not beyond_max_positions:
        raise InputError(
            f"prompt of {n} tokens exceeds the config's max_position_embeddings = {limit}; "
            "pass --beyond-max-positions to run it anyway")
    if decode_steps < 1:
        raise InputError(f"--decode-steps must be >= 1, got {decode_steps}")
    if "decode" in modes and decode_steps >= n:
        raise InputError(
            f"--decode-steps {decode_steps} must be fewer than the prompt's {n} tokens "
            "(the rest is the prefill)")


def run_parity(args: argparse.Namespace) -> int:
    if args.allow_extra_tensors:  # read by the reference and the llama.cpp staging alike
        os.environ[ALLOW_EXTRA_ENV] = "1"
    _, cfg = load_checkpoint_config(args.checkpoint)
    check_out_dir(args.out)
    modes = parse_modes(args.modes)
    golden = golden_inputs(args, cfg.vocab_size) if args.golden is not None else None
    tokens = (golden.tokens if golden is not None
              else read_prompt(args.prompt_tokens, cfg.vocab_size))
    check_prompt_limits(tokens, cfg, decode_steps=args.decode_steps, modes=modes,
                        beyond_max_positions=args.beyond_max_positions)
    extra = {}
    if args.mlx_model_module is not None:
        if not args.mlx_model_module.is_file():
            raise InputError(f"{args.mlx_model_module}: --mlx-model-module file not found")
        extra["mlx"] = {"model_module": str(args.mlx_model_module.resolve())}
    convention = _convention(args, cfg) if golden is None else golden.convention
    candidates = parse_targets(args.backends, extra)
    reference = (reference_target(args.reference, args.reference_load) if golden is None
                 else golden.reference)
    if convention is not None:  # our torch reference computes with the checkpoint's convention
        candidates = [convention.target(c) for c in candidates]
        reference = convention.target(reference)
    runner = Runner()
    if convention is not None:
        runner.findings.append(convention.note)
    checkpoint = args.checkpoint.resolve()
    if golden is not None:  # its captures stand for the reference, whose weights stay on disk
        check_candidates(golden.golden, candidates)
        golden.golden.check_checkpoint(checkpoint, read_config_json(checkpoint / "config.json"))
        runner.seed(reference, checkpoint, tokens, args.decode_steps, golden.golden.captures())
        runner.findings.append(f"reference captures read from the golden run {args.golden} "
                               f"({golden.golden.store_dtype}); the reference was not loaded")
    else:
        ok, why = runner.availability(reference)
        if not ok:
            raise InputError(f"the reference {reference.label} cannot run here: {why}")
        # The reference runs first and alone (validating the checkpoint before any candidate);
        # its captures are kept, its weights freed, then each candidate is loaded, run and
        # freed in turn.
        try:
            runner.captures(reference, checkpoint, tokens, "prefill", args.decode_steps)
        except PortFailure as e:  # nothing to judge ports against: not a finding about a port
            raise ReferenceFailure(f"the reference could not run {checkpoint}: {e}") from None
        runner.release(checkpoint, reference)
    verdict = RunVerdict()
    prompt = f"{len(tokens)} tokens"
    for cand in candidates:
        def record(mode: str, status: Status, detail: str, cand: Target = cand) -> None:
            verdict.add(CheckVerdict(checkpoint.name, prompt, cand.label, reference.label, mode,
                                     status, detail))

        ok, why = runner.availability(cand)
        if not ok:
            runner.findings.append(f"{cand.label} not run: {why}")
            for mode in modes:
                record(mode, Status.SKIPPED, why)
            continue
        for mode in modes:
            try:
                result = runner.compare(
                    case=checkpoint.name, prompt=prompt, checkpoint=checkpoint, tokens=tokens,
                    candidate=cand, reference=reference,
                    tolerance=DEFAULT_TOLERANCES[cand.dtype], mode=mode,
                    n_decode=args.decode_steps)
            except ArchitectureNotSupported as e:  # the port's coverage: a finding, not bad input
                runner.findings.append(f"{cand.label}: {e}")
                record(mode, Status.SKIPPED, str(e))
                continue
            except PortFailure as e:
                runner.findings.append(str(e))
                record(mode, Status.ERROR, str(e))
                continue
            record(mode, Status.PASSED if result.passed else Status.FAILED,
                   result.summary_line())
        runner.release(checkpoint, cand)
    runner.findings += [f for f in model_findings(runner.models.values())
                        if f not in runner.findings]
    summary = summary_json(runner.results, verdict)
    summary["findings"] = runner.findings
    summary["checkpoint"] = str(checkpoint)
    if convention is not None:
        summary["slope_convention"] = convention.to_json()
    summary["n_tokens"] = len(tokens)
    out = write_run(runner.results, Path("reports"), title=f"parity: {checkpoint}",
                    findings=runner.findings, environment=environment(), name="parity",
                    out=args.out, verdict=verdict, summary=summary)
    print_summary(runner.results, runner.findings)
    print(verdict.headline())
    print(f"report: {out / 'index.html'}")
    return verdict.exit_code


def _convention(args: argparse.Namespace, cfg: object):
    """The GLA slope convention of a Ling-2.6 checkpoint (None for a family without slopes)."""
    from harness.checks.slope_convention import resolve
    from references.config import BailingHybridConfig

    if not isinstance(cfg, BailingHybridConfig):
        if args.slope is not None:
            raise InputError("--slope: only Ling-2.6 checkpoints have a GLA slope convention")
        return None
    return resolve(args.slope, args.checkpoint.resolve())


def reference_target(spec: str, load: str) -> Target:
    """The reference target; a forced weight loading mode becomes its ``load`` option (``auto``
    keeps the plain label)."""
    if load == "auto":
        return Target.parse(spec)
    return Target.parse(f"{spec}:load={load}")


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
