"""``python -m harness capture``: run only the reference and save its captures (a golden run),
and the ``parity --golden`` side that reads one back instead of loading the reference.

    python -m harness capture --checkpoint DIR [--prompt-tokens FILE] --out GOLDEN
    python -m harness parity --checkpoint DIR --golden GOLDEN --backends mlx,llamacpp
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.backends.targets import REFERENCE, Target
from harness.checks.golden import (
    STORE_DTYPES,
    GoldenRun,
    checkpoint_fingerprint,
    config_digest,
    open_golden,
    target_json,
    versions,
    write_golden,
)
from harness.checks.slope_convention import CHOICES as SLOPE_CHOICES
from harness.core.errors import InputError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "capture", help="run only the float64 reference and save its captures (a golden run) "
                        "for `parity --golden` on another machine")
    p.set_defaults(func=run)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="HF-layout directory: config.json + model*.safetensors (+ index)")
    p.add_argument("--out", type=Path, required=True,
                   help="the golden run's folder (must not exist or be empty)")
    from harness.cli.prompts import add_prompt_arguments

    add_prompt_arguments(p)  # a golden run holds one prompt
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


def run(args: argparse.Namespace) -> int:
    """Validate everything, run the reference once, write the golden run atomically."""
    import os

    from harness.backends.families import load_checkpoint_config
    from harness.checks.runner import Runner
    from harness.cli.inputs import (
        check_prompt_limits,
        checkpoint_convention,
        reference_target,
    )
    from harness.cli.prompts import prompts_from_args
    from references.checkpoint_io import ALLOW_EXTRA_ENV
    from references.config import read_config_json

    if args.allow_extra_tensors:
        os.environ[ALLOW_EXTRA_ENV] = "1"
    _, cfg = load_checkpoint_config(args.checkpoint)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"{args.out}: exists and is not an empty folder; a golden run is "
                         "never overwritten")
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
    runner = Runner()
    ok, why = runner.availability(reference)
    if not ok:
        raise InputError(f"the reference {reference.label} cannot run here: {why}")
    checkpoint = args.checkpoint.resolve()
    raw = read_config_json(checkpoint / "config.json")
    fingerprint = checkpoint_fingerprint(checkpoint)
    captures = runner.captures(reference, checkpoint, tokens, "prefill", args.decode_steps)
    manifest: dict[str, Any] = {
        "checkpoint": str(checkpoint), "config": raw, "config_sha256": config_digest(raw),
        "fingerprint": fingerprint, "tokens": list(tokens), "decode_steps": args.decode_steps,
        "reference": {**target_json(reference), "load": args.reference_load},
        "slope_convention": convention.to_json() if convention is not None else None,
        "findings": runner.findings + [f for m in runner.models.values()
                                       for f in getattr(m, "findings", ()) or ()],
        "versions": versions(),
    }
    runner.release()
    write_golden(args.out, captures, manifest, args.store_dtype)
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(f"golden run: {args.out} ({len(captures)} capture points of {reference.label}, "
          f"{len(tokens)} tokens, {size / 2**20:.1f} MiB {args.store_dtype})")
    return 0


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


def check_candidates(golden: GoldenRun, candidates: list[Target]) -> None:
    """A float32 store cannot judge a float64 candidate (its rounding exceeds the tolerance)."""
    if golden.store_dtype == "float64":
        return
    wide = [c.label for c in candidates if c.dtype == "float64"]
    if wide:
        raise InputError(f"{golden.path}: stored in {golden.store_dtype}, too coarse for the "
                         f"float64 candidate(s) {', '.join(wide)} (NMSE tolerance 1e-18)")
