"""A tiny, real byte-level BPE tokenizer that every synthetic checkpoint ships
(:func:`write_checkpoint_tokenizer`): text prompts, ``--chat`` and the llama.cpp converter then
take the same path as with a real checkpoint's tokenizer.  The converter also stages it into the
copy of a user's checkpoint that has none."""

from __future__ import annotations

import json
from pathlib import Path

from harness.core.errors import InputError

# The files :func:`write_tiny_tokenizer` writes (remove them for a checkpoint with no tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The tokenizer_config.json key that marks a tokenizer as this module's: llama.cpp's converter
# knows no hash for its pre-tokenizer, and our port's converter names it "default" only for it.
TINY_MARK = "bailing_parity_tokenizer"

# One role marker per message, then the assistant's: enough for ``--chat`` to be tested end to end.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (the alphabet of a byte-level BPE),
    in GPT-2's order: printable bytes first."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def write_tiny_tokenizer(out: Path, vocab_size: int, *, chat_template: bool = False) -> None:
    """A byte-level BPE with exactly ``vocab_size`` tokens and at least one merge (GGUF needs
    merges); deterministic, every id < ``vocab_size``.

    ``chat_template`` adds :data:`TINY_CHAT_TEMPLATE` to tokenizer_config.json. Its
    pre-tokenizer is unknown to the llama.cpp converter's hash table.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < 3:
        raise InputError(f"vocab_size {vocab_size} is too small for a tokenizer")
    chars = list(byte_alphabet().values())
    tokens = chars[: min(256, vocab_size - 1)]
    merges = [(tokens[0], tokens[1])]
    tokens.append(tokens[0] + tokens[1])
    known = set(tokens)  # a list lookup per candidate was quadratic: hours at vocab 157184
    i = 2
    while len(tokens) < vocab_size and i < 2 + 256 * 256:  # pad with two-char merges...
        a, b = chars[i % 256], chars[(i // 256 + 2) % 256]
        if a + b not in known and a in known and b in known:
            tokens.append(a + b)
            known.add(a + b)
            merges.append((a, b))
        i += 1
    pairs = len(tokens)
    for j in range(257, pairs):  # ...then three-char ones (256 + 65536 pairs < Ling's vocab)
        for c in chars:
            if len(tokens) >= vocab_size:
                break
            if tokens[j] + c not in known:
                tokens.append(tokens[j] + c)
                known.add(tokens[-1])
                merges.append((tokens[j], c))
    vocab = {t: k for k, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    config: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                 "model_max_length": 1 << 20,
                                 TINY_MARK: "tiny byte-level BPE (references/tokenizer.py)"}
    if chat_template:
        config["chat_template"] = TINY_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def write_checkpoint_tokenizer(out: Path, vocab_size: int) -> None:
    """The tokenizer a synthetic checkpoint ships: the tiny BPE of the model's vocabulary with
    the chat template, so ``--prompt-text``, ``--chat`` and a case's text prompts work on it.
    Case files tokenize their text prompts with this same tokenizer (harness.checks.cases)."""
    write_tiny_tokenizer(out, vocab_size, chat_template=True)


def is_tiny_tokenizer(checkpoint: Path) -> bool:
    """Whether ``checkpoint``'s tokenizer is the harness's tiny one (its :data:`TINY_MARK`), as
    in every synthetic case's checkpoint."""
    try:
        config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and TINY_MARK in config
