"""A checkpoint with no tokenizer, for the tests of what happens then: synthetic checkpoints
ship the harness's tiny tokenizer, so such a checkpoint is made explicitly from one."""

from __future__ import annotations

from pathlib import Path

from references.tokenizer import TOKENIZER_FILES


def bare_copy(checkpoint: Path, into: Path) -> Path:
    """``into`` holding links to ``checkpoint``'s files except its tokenizer (the weights are
    shared, not copied)."""
    into.mkdir(parents=True, exist_ok=True)
    for f in sorted(checkpoint.iterdir()):
        if f.name not in TOKENIZER_FILES:
            (into / f.name).symlink_to(f.resolve())
    assert not any((into / name).exists() for name in TOKENIZER_FILES)
    return into
