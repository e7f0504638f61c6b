"""Parity cases as data: a TOML file per case (config, weight seed, prompts, tolerances).

A case is materialised into an HF-layout checkpoint directory deterministically (per-tensor seeds
derived from the case seed and the tensor name) and cached by a hash of its content, so every
backend reads the same bytes and a rerun costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.families import family_named
from harness.core import atomic, cache
from harness.core.errors import InputError
from harness.core.tolerances import Tolerance

CASES_DIR = Path(__file__).resolve().parents[2] / "cases"
GENERATOR_VERSION = 1  # bump when a synthetic writer changes: invalidates the cache

# Defaults by the candidate's dtype; a case may tighten or loosen them.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(nmse=1e-18, top1=1.0, index_agreement=1.0),
    "float32": Tolerance(nmse=1e-8, top1=1.0, index_agreement=1.0),
    "bfloat16": Tolerance(nmse=5e-2, top1=0.8, index_agreement=0.0),
    # A quantized port against the reference on its own weights, activations rounded as the
    # port rounds them, sublayer-local (harness.checks.quantized): float32 arithmetic plus the
    # activations a float32 ulp puts on the other side of a rounding step. Measured right ports:
    # <= 3.9e-7 on the tiny cases, <= 5.3e-6 at Ling-2.6-flash's widths; the wrong GLA slope:
    # >= 1.0e-3 (tiny), 1.2e-2 (flash widths) at gla_out-0.
    "quantized": Tolerance(nmse=1e-4, top1=1.0, index_agreement=1.0),
}


@dataclass(frozen=True)
class Prompt:
    """A case's prompt: its token ids, and for a text prompt the text (and whether the chat
    template was applied) they came from."""

    name: str
    tokens: tuple[int, ...]
    text: str | None = None
    chat: bool = False


@dataclass(frozen=True)
class Case:
    """One parity case: a model config, a weight seed and the prompts to run through it."""

    name: str
    description: str
    seed: int
    config: dict[str, Any]
    prompts: tuple[Prompt, ...]
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    decode_steps: int = 8
    source: Path | None = None
    family: str = "ling26"
    # backend name (every check) or "backend:mode" (one check) -> why that port is known to
    # fail this case (a finding kept visible as a strict xfail: the day the port is fixed, the
    # item XPASSes and the entry must go)
    known_failures: dict[str, str] = field(default_factory=dict)
    # the GLA slope convention the checkpoint was published with (harness.checks.slope_convention);
    # None: Ling-2.6-flash's default, ``corrected``, with a note in the run
    slope: str | None = None
    # the checks this case runs (None: every check the run asks for): a realistic-width case
    # skips what costs minutes there and nothing width-specific
    modes: tuple[str, ...] | None = None

    def runs(self, mode: str) -> bool:
        """Whether this case runs the ``mode`` check (its ``modes`` key; absent: every check)."""
        return self.modes is None or mode in self.modes

    def known_failure(self, backend: str, mode: str) -> str | None:
        """Why ``backend`` is known to fail this case's ``mode`` check, if it is."""
        return self.known_failures.get(f"{backend}:{mode}") or self.known_failures.get(backend)

    def tolerance(self, dtype: str) -> Tolerance:
        """The tolerance for a candidate computing in ``dtype``."""
        return self.tolerances.get(dtype, DEFAULT_TOLERANCES[dtype])

    def config_json(self) -> dict[str, Any]:
        """The ``config.json`` this case writes (architecture keys filled in by the family)."""
        fam = family_named(self.family)
        return {"architectures": [fam.architecture], "model_type": fam.model_type, **self.config}

    def content_hash(self) -> str:
        blob = json.dumps(
            {"config": self.config_json(), "seed": self.seed, "generator": GENERATOR_VERSION,
             "writer": family_named(self.family).writer_fingerprint()},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_CASE_KEYS = {"description", "family", "seed", "config", "prompts", "tolerances", "decode_steps",
              "known_failures", "slope", "modes"}
SLOPES = ("corrected", "hf_off_by_one")


def load_case(path: Path) -> Case:
    """Parse and validate one case file; errors name the file and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    unknown = set(raw) - _CASE_KEYS
    if unknown:
        raise InputError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(_CASE_KEYS)}")
    for key in ("seed", "config", "prompts"):
        if key not in raw:
            raise InputError(f"{path}: missing key {key!r}")
    family = family_named(str(raw.get("family", "ling26")))
    cfg = family.validate_config({"architectures": [family.architecture], **raw["config"]}, path)
    tokenizer = _CaseTokenizer(cfg.vocab_size)
    try:
        prompts = tuple(_prompt(path, i, p, cfg.vocab_size, tokenizer)
                        for i, p in enumerate(raw["prompts"]))
    finally:
        tokenizer.close()
    tolerances = {}
    for dtype, t in raw.get("tolerances", {}).items():
        if dtype not in DEFAULT_TOLERANCES:
            raise InputError(f"{path}: tolerances.{dtype}: unknown dtype")
        base = DEFAULT_TOLERANCES[dtype].__dict__ | dict(t)
        try:
            tolerances[dtype] = Tolerance.from_mapping(base)
        except ValueError as e:
            raise InputError(f"{path}: tolerances.{dtype}: {e}") from None
    return Case(
        name=path.stem,
        description=str(raw.get("description", "")),
        seed=int(raw["seed"]),
        config=dict(raw["config"]),
        prompts=prompts,
        tolerances=tolerances,
        decode_steps=int(raw.get("decode_steps", 8)),
        source=path,
        family=family.name,
        known_failures={str(k): str(v) for k, v in raw.get("known_failures", {}).items()},
        slope=_slope(path, raw.get("slope"), family.name),
        modes=_modes(path, raw.get("modes")),
    )


def _modes(path: Path, value: Any) -> tuple[str, ...] | None:
    """The case's ``modes`` key: a non-empty list of check names, or absent (the names are
    checked against the session's checks where the plan is made: the pytest plugin)."""
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(m, str) and m for m in value)):
        raise InputError(f"{path}: modes: expected a non-empty list of check names, "
                         f"got {value!r}")
    return tuple(dict.fromkeys(value))


def _slope(path: Path, value: Any, family: str) -> str | None:
    """The case's ``slope`` field: a convention, on a family whose GLA has slopes."""
    if value is None:
        return None
    if family != "ling26":
        raise InputError(f"{path}: slope: only Ling-2.6 cases have a GLA slope convention")
    if value not in SLOPES:
        raise InputError(f"{path}: slope {value!r}; expected one of {', '.join(SLOPES)} (a case "
                         "writes no modeling code to detect it from)")
    return str(value)


_PROMPT_KEYS = ("name", "tokens", "random", "text", "chat")


def _prompt(path: Path, i: int, raw: dict[str, Any], vocab: int,
            tokenizer: _CaseTokenizer) -> Prompt:
    where = f"{path}: prompts[{i}]"
    if not isinstance(raw, dict) or "name" not in raw:
        raise InputError(f"{where}: missing key 'name'")
    where = f"{where} ({raw['name']!r})"
    unknown = sorted(set(raw) - set(_PROMPT_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected {list(_PROMPT_KEYS)}")
    given = [k for k in ("tokens", "random", "text") if k in raw]
    if len(given) > 1:
        raise InputError(f"{where}: give one of 'tokens', 'random' or 'text', not "
                         f"{' and '.join(repr(k) for k in given)}")
    chat = raw.get("chat", False)
    if not isinstance(chat, bool) or (chat and "text" not in raw):
        raise InputError(f"{where}: 'chat' must be true or false, and only with 'text'")
    text = None
    if "tokens" in raw:
        tokens = [int(t) for t in raw["tokens"]]
    elif "random" in raw:
        spec = raw["random"]
        rng = np.random.default_rng(int(spec["seed"]))
        tokens = rng.integers(0, vocab, size=int(spec["length"])).tolist()
    elif "text" in raw:
        text = raw["text"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: empty text prompt (expected text = \"...\")")
        tokens = list(tokenizer.tokenize(text, chat, where))
    else:
        raise InputError(f"{where}: needs 'tokens = [...]', 'random = {{length, seed}}' or "
                         "'text = \"...\"'")
    if not tokens:
        raise InputError(f"{where}: empty prompt")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise InputError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return Prompt(name=str(raw["name"]), tokens=tuple(tokens), text=text, chat=chat)


class _CaseTokenizer:
    """The tokenizer the case's checkpoint ships, written alone into a temporary folder (the
    weights are not needed to tokenize) and read by the CLI's own code
    (:func:`harness.cli.prompts.tokenize`), so a case's text prompt has exactly the ids
    ``--prompt-text`` (or ``--chat``) gives on the materialised checkpoint."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self._dir: Any = None
        self._tok: Any = None

    def tokenize(self, text: str, chat: bool, where: str) -> tuple[int, ...]:
        from harness.cli.prompts import Tokenization, tokenize

        try:
            if self._tok is None:
                import tempfile

                from references.tokenizer import write_checkpoint_tokenizer

                self._dir = tempfile.TemporaryDirectory(prefix="case-tokenizer-")
                write_checkpoint_tokenizer(Path(self._dir.name), self.vocab)
                self._tok = Tokenization(Path(self._dir.name))
            return tokenize(self._tok, {"text": text}, chat=chat, where=where,
                            vocab_size=self.vocab)[1]
        except InputError as e:
            msg = str(e)
            raise InputError(msg if msg.startswith(where) else
                             f"{where}: the case's checkpoint has no usable tokenizer for a "
                             f"text prompt ({msg})") from None

    def close(self) -> None:
        """Remove the temporary folder (if a text prompt made one)."""
        if self._dir is not None:
            self._dir.cleanup()


def load_cases(names: list[str] | None = None, cases_dir: Path = CASES_DIR) -> list[Case]:
    """All cases in ``cases_dir`` (sorted by name), or just the named ones."""
    found = {p.stem: p for p in sorted(Path(cases_dir).glob("*.toml"))}
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise InputError(f"unknown case(s) {unknown}; available: {sorted(found)}")
        return [load_case(found[n]) for n in names]
    return [load_case(p) for p in found.values()]


# Tests that load every Ling-2.6 case in memory, or copy its checkpoint, keep to cases below this
# (every case but the realistic-width one, whose 2.2e9 parameters are the point of it).
SMALL_PARAMETERS = 100_000_000


def parameter_count(case: Case) -> int:
    """Elements in a Ling-2.6 case's checkpoint, from its tensor spec (nothing is written)."""
    import math

    from references.checkpoint_spec import expected_tensors
    from references.config import config_from_dict

    cfg = config_from_dict(case.config_json(), case.source or Path(f"{case.name}.toml"))
    return sum(math.prod(t.shape) for t in expected_tensors(cfg))


def materialize(case: Case, root: Path | None = None) -> Path:
    """The case's checkpoint directory, written once (atomically), reused while its hash holds."""
    root = root or cache.root()
    target = root / "checkpoints" / f"{case.name}-{case.content_hash()}"
    if (target / "config.json").is_file():
        return target
    with atomic.locked(target.with_name(f".{target.name}.lock")):
        if not (target / "config.json").is_file():  # else another process wrote it meanwhile
            with atomic.staged_dir(target, replace=True) as tmp:
                write_checkpoint(case, tmp)
    return target


def write_checkpoint(case: Case, out_dir: Path) -> None:
    """Write the case's checkpoint into ``out_dir`` with its family's synthetic writer."""
    family_named(case.family).write(case.config_json(), case.seed, out_dir)
