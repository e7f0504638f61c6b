"""Synthetic checkpoints ship a small real tokenizer (with a chat template), and a case file's
``[[prompts]]`` may give ``text = "..."`` (``chat = true``): tokenized by that tokenizer through
the CLI's own code, so a case's text prompt has exactly the ids ``--prompt-text`` gives."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.cli.prompts import add_prompt_arguments, prompts_from_args
from harness.core.errors import InputError
from references.tokenizer import TINY_CHAT_TEMPLATE

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")


def cli_tokens(checkpoint: Path, *options: str) -> tuple[int, ...]:
    """The ids the CLI's prompt options give on ``checkpoint``."""
    parser = argparse.ArgumentParser()
    add_prompt_arguments(parser)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    (prompt,) = prompts_from_args(parser.parse_args(list(options)), checkpoint, vocab)
    return prompt.tokens


@pytest.mark.parametrize("case", ["flash-mini", "ling3-mini"])
def test_a_materialised_checkpoint_ships_a_tokenizer_of_exactly_its_vocabulary(case: str) -> None:
    from transformers import AutoTokenizer

    ckpt = materialize(load_case(CASES_DIR / f"{case}.toml"))
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = tok.get_vocab().values()
    assert len(ids) == vocab and sorted(ids) == list(range(vocab))
    assert tok.chat_template == TINY_CHAT_TEMPLATE


def test_the_flash_widths_checkpoint_ships_its_157184_token_tokenizer_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its writer is run with the 8 GB weight writing left out: the tokenizer is what is
    measured (0.3 s here)."""
    from tokenizers import Tokenizer

    import references.synthetic as synthetic

    case = load_case(CASES_DIR / "flash-widths-ci.toml")
    monkeypatch.setattr(synthetic, "write_sharded_checkpoint", lambda *a, **k: None)
    start = time.perf_counter()
    synthetic.write_synthetic_checkpoint(case.config_json(), case.seed, tmp_path)
    took = time.perf_counter() - start
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == case.config["vocab_size"] == 157184
    assert max(tok.get_vocab().values()) == 157184 - 1
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert took < 10, f"writing the flash-widths tokenizer took {took:.1f} s"


def test_a_case_text_prompt_has_the_ids_of_the_clis_prompt_text() -> None:
    case = load_case(CASES_DIR / "flash-mini.toml")
    (prompt,) = [p for p in case.prompts if p.text is not None]
    assert not prompt.chat and len(prompt.tokens) > 8
    assert prompt.tokens == cli_tokens(materialize(case), "--prompt-text", prompt.text)


def test_a_case_chat_prompt_has_the_ids_of_the_clis_chat() -> None:
    case = load_case(CASES_DIR / "ling3-mini.toml")
    (prompt,) = [p for p in case.prompts if p.text is not None]
    ckpt = materialize(case)
    assert prompt.chat
    assert prompt.tokens == cli_tokens(ckpt, "--prompt-text", prompt.text, "--chat")
    plain = cli_tokens(ckpt, "--prompt-text", prompt.text)
    user = cli_tokens(ckpt, "--prompt-text", "<|user|>")
    assert prompt.tokens[: len(user)] == user and prompt.tokens != plain  # templated


def _case_with_prompt(tmp_path: Path, body: str) -> Path:
    """heads-6's case file (token prompts only) with one more prompt, its second (``body``: its
    TOML lines)."""
    path = tmp_path / "mine.toml"
    text = (CASES_DIR / "heads-6.toml").read_text()
    assert text.count("[[prompts]]") == 1
    path.write_text(f'{text}\n[[prompts]]\nname = "extra"\n{body}\n')
    return path


@pytest.mark.parametrize(("body", "message"), [
    ('text = "hi"\ntokens = [1, 2]', "give one of 'tokens', 'random' or 'text', not 'tokens' and "
                                     "'text'"),
    ('text = "   "', "empty text prompt"),
    ('text = ""\nchat = true', "empty text prompt"),
    ("tokens = [1, 2]\nchat = true", "'chat' must be true or false, and only with 'text'"),
    ('text = "hi"\nchat = "yes"', "'chat' must be true or false"),
    ('text = "hi"\nchta = true', r"unknown key\(s\) \['chta'\]"),
])
def test_bad_text_prompts_name_the_case_file_and_the_prompt(tmp_path: Path, body: str,
                                                            message: str) -> None:
    path = _case_with_prompt(tmp_path, body)
    with pytest.raises(InputError, match=message) as e:
        load_case(path)
    assert f"{path}: prompts[1] ('extra')" in str(e.value)


def test_a_text_prompt_on_a_checkpoint_without_a_tokenizer_names_the_case_and_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that shipped no tokenizer (the tokenizer writer made a no-op)."""
    import references.tokenizer

    path = _case_with_prompt(tmp_path, 'text = "hello"')
    monkeypatch.setattr(references.tokenizer, "write_checkpoint_tokenizer", lambda *a: None)
    with pytest.raises(InputError, match="no tokenizer") as e:
        load_case(path)
    assert f"{path}: prompts[1] ('extra')" in str(e.value)
    assert "has no usable tokenizer for a text prompt" in str(e.value)


def test_the_tiny_tokenizer_is_told_from_a_bare_or_foreign_one(tmp_path: Path) -> None:
    """Our port's converter names the pre-tokenizer 'default' only for the harness's tokenizer
    (ports.llamacpp.port.stage_checkpoint); a real checkpoint's goes through unchanged."""
    from references.tokenizer import is_tiny_tokenizer, write_tiny_tokenizer
    from tests.bare_checkpoint import bare_copy

    ckpt = materialize(load_case(CASES_DIR / "flash-mini.toml"))
    assert is_tiny_tokenizer(ckpt)
    assert not is_tiny_tokenizer(bare_copy(ckpt, tmp_path / "bare"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_tiny_tokenizer(foreign, 64)
    config = json.loads((foreign / "tokenizer_config.json").read_text())
    config.pop("bailing_parity_tokenizer")
    (foreign / "tokenizer_config.json").write_text(json.dumps(config))
    assert not is_tiny_tokenizer(foreign)
