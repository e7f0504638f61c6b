"""Model families that share model_type ``bailing_hybrid``, told apart by ``architectures``.

The one visible place where a checkpoint's family is decided: Ling-2.6-flash
(``BailingMoeV2_5ForCausalLM``) and Ling 3.0 (``BailingMoeV3ForCausalLM``; transformers writes
``BailingHybridForCausalLM`` for it).  Each family says how to validate a config and how to write a
synthetic checkpoint for a case; backends dispatch on :func:`family_of` too.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.errors import InputError
from harness.core.lazy import resolve


@dataclass(frozen=True)
class Family:
    """What the harness needs to know about one architecture."""

    name: str
    architecture: str  # the canonical `architectures[0]` a case writes
    aliases: tuple[str, ...]  # other names that mean the same model
    model_type: str
    # "module:function" paths, imported lazily so a family's extra packages stay optional.
    validate: str  # (raw config, path) -> config with .vocab_size and .num_hidden_layers
    write_checkpoint: str  # (config_json dict, seed, out_dir) -> None

    def validate_config(self, raw: dict[str, Any], path: Path) -> Any:
        return resolve(self.validate)(raw, path)

    def write(self, config_json: dict[str, Any], seed: int, out_dir: Path) -> None:
        resolve(self.write_checkpoint)(config_json, seed, out_dir)

    def writer_fingerprint(self) -> str:
        """A hash of the synthetic writer's source and of the tokenizer every synthetic
        checkpoint ships, so editing either invalidates cached checkpoints."""
        source = b""
        for name in (self.write_checkpoint.split(":")[0], "references.tokenizer"):
            module = importlib.import_module(name)
            source += Path(module.__file__).read_bytes() if module.__file__ else b""
        return hashlib.sha256(source).hexdigest()[:16]


FAMILIES: dict[str, Family] = {
    "ling26": Family(
        name="ling26",
        architecture="BailingMoeV2_5ForCausalLM",
        aliases=(),
        model_type="bailing_hybrid",
        validate="references.config:config_from_dict",
        write_checkpoint="references.synthetic:write_synthetic_checkpoint",
    ),
    "ling3": Family(
        name="ling3",
        architecture="BailingMoeV3ForCausalLM",
        aliases=("BailingHybridForCausalLM",),
        model_type="bailing_hybrid",
        validate="references.ling3.config:config_from_dict",
        write_checkpoint="references.ling3.synthetic:write_synthetic_checkpoint",
    ),
}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise InputError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: dict[str, Any], path: Path | str = "config.json") -> Family:
    """The family a config.json belongs to, by its `architectures` (never by model_type alone)."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for fam in FAMILIES.values():
        if any(a == fam.architecture or a in fam.aliases for a in archs):
            return fam
    known = ", ".join(f"{f.architecture} ({f.name})" for f in FAMILIES.values())
    raise InputError(f"{path}: 'architectures' is {archs!r}; the harness knows {known}")


def checkpoint_family(checkpoint_dir: Path) -> str | None:
    """The family a checkpoint directory's ``config.json`` names: the one place a checkpoint's
    family is read (backends dispatch on it through :mod:`harness.backends.registry`).

    None when config.json cannot be read: the family's own loader then names the problem.
    """
    path = Path(checkpoint_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    return family_of(raw, path).name


def load_checkpoint_config(checkpoint_dir: Path) -> tuple[Family, Any]:
    """Read ``config.json`` and validate it with its family's rules: (family, config)."""
    from references.config import read_config_json

    path = Path(checkpoint_dir) / "config.json"
    raw = read_config_json(path)
    family = family_of(raw, path)
    return family, family.validate_config(raw, path)
