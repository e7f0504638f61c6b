"""What a parity or golden run reads from the command line before any model is loaded: the
prompt, its limits, the checkpoint's slope convention and the reference target.

Shared by ``parity``, ``capture`` and ``mtp`` so that each subcommand refuses bad input with the
same message (exit 2).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.backends.targets import Target
from harness.core.errors import InputError

DEFAULT_PROMPT_LENGTH = 64

# The float64 reference keeps every capture of the whole prompt in memory: 100k tokens of a tiny
# model took 15.6 GB and 400 s. Longer prompts are a corpus job (chunks), not one parity forward.
HARD_PROMPT_CAP = 16384


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


def checkpoint_convention(args: argparse.Namespace, cfg: object):
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


def case_names(args: argparse.Namespace, *exclusive: tuple[str, object]) -> list[str]:
    """``--cases``' names, after refusing the options a case decides itself (its prompts and
    slope convention) and ``exclusive`` (flag, value) pairs the subcommand adds."""
    given = (("--prompt-tokens", args.prompt_tokens), ("--slope", args.slope),
             ("--prompt-text", args.prompt_text), ("--prompt-file", args.prompt_file),
             ("--chat", args.chat or None), *exclusive)
    for flag, value in given:
        if value is not None:
            raise InputError(f"{flag}: not with --cases (a case names its checkpoint, prompts "
                             "and slope convention)")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    if not names:
        raise InputError(f"--cases: no case given in {args.cases!r}")
    return names
