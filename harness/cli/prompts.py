"""The prompts of a ``--checkpoint`` run: token ids as given (``--prompt-tokens``), text through
the checkpoint's own tokenizer (``--prompt-text``, ``--prompt-file``), optionally through its chat
template (``--chat``), or the seeded random default. All refused (exit 2) before a model loads."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cli.inputs import read_prompt
from harness.core.errors import InputError


@dataclass(frozen=True)
class Prompt:
    """One prompt: its name in the report, its token ids, and the text they came from."""

    name: str
    tokens: tuple[int, ...]
    text: str | None = None
    source: str = "default"  # default | tokens | text | file | chat

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "text": self.text, "tokens": list(self.tokens),
                "source": self.source}


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """``--prompt-tokens``, ``--prompt-text``, ``--prompt-file``, ``--chat``."""
    p.add_argument("--prompt-tokens", type=Path,
                   help='JSON file {"tokens": [...]}; default: 64 seeded random ids')
    p.add_argument("--prompt-text", default=None,
                   help="a text prompt, tokenized by the checkpoint's tokenizer")
    p.add_argument("--prompt-file", type=Path, default=None,
                   help='a text file (one prompt), or a .jsonl file: one {"text": ...} or '
                        '{"messages": [...]} per line, optional "name"')
    p.add_argument("--chat", action="store_true",
                   help="apply the checkpoint's chat template (add_generation_prompt) to text "
                        "prompts")


def uses_text(args: argparse.Namespace) -> bool:
    """Whether the options ask for a text prompt (so the tokenizer is needed)."""
    return (getattr(args, "prompt_text", None) is not None
            or getattr(args, "prompt_file", None) is not None)


def prompts_from_args(args: argparse.Namespace, checkpoint: Path,
                      vocab_size: int) -> list[Prompt]:
    """The run's prompts; mutually exclusive options and ids outside the vocabulary refused."""
    given = [flag for flag, value in (("--prompt-tokens", args.prompt_tokens),
                                      ("--prompt-text", getattr(args, "prompt_text", None)),
                                      ("--prompt-file", getattr(args, "prompt_file", None)))
             if value is not None]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)}: give one prompt option, not several")
    chat = bool(getattr(args, "chat", False))
    if chat and not uses_text(args):
        raise InputError("--chat: applies to --prompt-text or --prompt-file only")
    if not uses_text(args):
        tokens = read_prompt(args.prompt_tokens, vocab_size)
        source = "default" if args.prompt_tokens is None else "tokens"
        return [Prompt(checkpoint.name, tuple(tokens), source=source)]
    if args.prompt_text is not None:
        raw = [("text", {"text": args.prompt_text}, "--prompt-text")]
    else:
        raw = _read_prompt_file(args.prompt_file)
    tok = Tokenization(checkpoint)
    prompts = []
    for name, item, where in raw:
        text, ids, templated = tokenize(tok, item, chat=chat, where=where, vocab_size=vocab_size)
        source = "chat" if templated else "text" if args.prompt_text is not None else "file"
        prompts.append(Prompt(name, ids, text=text, source=source))
    names = [p.name for p in prompts]
    if len(set(names)) != len(names):
        raise InputError(f"{args.prompt_file}: prompt names repeat: {names}")
    return prompts


def tokenize(tok: Tokenization, item: dict[str, Any], *, chat: bool, where: str,
             vocab_size: int) -> tuple[str, tuple[int, ...], bool]:
    """One text prompt (``{"text": ...}`` or ``{"messages": [...]}``) through the checkpoint's
    tokenizer: (the text tokenized, its ids, whether the chat template made it).  The one path
    for ``--prompt-text``, ``--prompt-file`` and a case file's text prompts; an empty text, no
    tokens or ids outside ``[0, vocab_size)`` are refused naming ``where``."""
    if "messages" in item or chat:
        messages = item.get("messages") or [{"role": "user", "content": item.get("text")}]
        text, templated = tok.chat(messages, where), True
    else:
        text, templated = item["text"], False
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: empty text prompt")
    ids = tok.encode(text, special=not templated)  # a template holds its own BOS
    if not ids:
        raise InputError(f"{where}: the tokenizer gave no tokens for {text[:40]!r}")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"{where}: the tokenizer gave ids {bad[:5]} outside the model's "
                         f"vocabulary [0, {vocab_size}) (does "
                         f"{tok.checkpoint / 'tokenizer.json'} belong to this checkpoint?)")
    return text, tuple(ids), templated


def read_text(path: Path) -> str:
    """A UTF-8 text file a user gave (prompts, a corpus); InputError naming it otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None


def has_tokenizer(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a tokenizer :class:`Tokenization` can load."""
    return any((checkpoint / f).exists() for f in
               ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))


def _read_prompt_file(path: Path) -> list[tuple[str, dict[str, Any], str]]:
    """(name, {"text"|"messages": ...}, where) per prompt of a text or .jsonl file."""
    body = read_text(path)
    if path.suffix != ".jsonl":
        return [("file-1", {"text": body}, str(path))]
    out = []
    for n, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            item = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(item, dict) or ("text" in item) == ("messages" in item):
            raise InputError(f'{where}: expected {{"text": "..."}} or {{"messages": [...]}}')
        if "messages" in item and not (
                isinstance(item["messages"], list) and item["messages"]
                and all(isinstance(m, dict) and "role" in m and "content" in m
                        for m in item["messages"])):
            raise InputError(f'{where}: "messages" must be a non-empty list of '
                             '{"role": ..., "content": ...}')
        name = item.get("name", f"file-{len(out) + 1}")
        if not isinstance(name, str) or not name:
            raise InputError(f'{where}: "name" must be a non-empty string')
        out.append((name, item, where))
    if not out:
        raise InputError(f"{path}: no prompt in the file")
    return out


class Tokenization:
    """The checkpoint's tokenizer: ``tokenizer.json`` through ``tokenizers`` (fast, no
    transformers), else ``AutoTokenizer``; the chat template always through transformers."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self._fast: Any = None
        self._auto: Any = None
        path = checkpoint / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer

            try:
                self._fast = Tokenizer.from_file(str(path))
            except Exception as e:  # any parse error is the user's file
                raise InputError(f"{path}: cannot be loaded by tokenizers ({e})") from None

    def _auto_tokenizer(self) -> Any:
        if self._auto is None:
            if self._fast is None and not has_tokenizer(self.checkpoint):
                raise InputError(
                    f"{self.checkpoint}: no tokenizer in the checkpoint folder (tokenizer.json "
                    "or tokenizer.model) for a text prompt; give token ids with "
                    "--prompt-tokens instead")
            try:
                from transformers import AutoTokenizer

                self._auto = AutoTokenizer.from_pretrained(str(self.checkpoint))
            except ImportError:
                raise InputError("a text prompt without tokenizer.json needs transformers; "
                                 "give token ids with --prompt-tokens instead") from None
            except (OSError, ValueError) as e:
                raise InputError(f"{self.checkpoint}: its tokenizer cannot be loaded ({e}); "
                                 "give token ids with --prompt-tokens instead") from None
        return self._auto

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """The ids of ``text`` as the checkpoint's tokenizer gives them (``special``: with the
        special tokens it adds, e.g. BOS)."""
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=special).ids)
        return list(self._auto_tokenizer().encode(text, add_special_tokens=special))

    def chat(self, messages: list[dict[str, Any]], where: str) -> str:
        """The chat template applied to ``messages``, ready for the assistant's turn."""
        tok = self._auto_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise InputError(f"{where}: --chat: {self.checkpoint} has no chat template "
                             "(tokenizer_config.json 'chat_template' or chat_template.jinja)")
        for m in messages:
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise InputError(f"{where}: empty text prompt")
        return str(tok.apply_chat_template(messages, add_generation_prompt=True,
                                           tokenize=False))
