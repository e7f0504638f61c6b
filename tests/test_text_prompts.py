"""Text prompts: ``--prompt-text``, ``--prompt-file`` (text or jsonl) and ``--chat`` go through
the checkpoint's own tokenizer, and the ids and text are recorded in summary.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.cli.main import main
from references.tokenizer import write_tiny_tokenizer
from tests.bare_checkpoint import bare_copy

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    """The flash-mini case's checkpoint: it ships the harness's tiny tokenizer and chat
    template."""
    return materialize(load_case(CASES_DIR / "flash-mini.toml"))


@pytest.fixture(scope="module")
def bare(checkpoint: Path, tmp_path_factory) -> Path:
    """The same weights with no tokenizer beside them."""
    return bare_copy(checkpoint, tmp_path_factory.mktemp("flash-mini-bare") / "ckpt")


def ids(checkpoint: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(text).ids


def parity(checkpoint: Path, out: Path, *args: str) -> int:
    return main(["parity", "--checkpoint", str(checkpoint), "--backends", "mlx",
                 "--out", str(out), *args])


def test_a_text_prompt_passes_and_its_tokens_are_the_tokenizers(checkpoint, tmp_path):
    out = tmp_path / "run"
    assert parity(checkpoint, out, "--prompt-text", "hello world") == 0
    summary = json.loads((out / "summary.json").read_text())
    (prompt,) = summary["prompts"]
    assert prompt["name"] == "text" and prompt["text"] == "hello world"
    assert prompt["tokens"] == ids(checkpoint, "hello world")
    assert summary["n_tokens"] == len(prompt["tokens"])
    assert "hello world" in (out / "index.html").read_text()


def test_a_jsonl_file_with_two_prompts_runs_two_subjects(checkpoint, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"name": "greeting", "text": "hello there, world"}) + "\n\n"
                 + json.dumps({"text": "the quick brown fox jumps"}) + "\n")
    out = tmp_path / "run"
    assert parity(checkpoint, out, "--prompt-file", str(f)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["name"], p["text"]) for p in summary["prompts"]] == [
        ("greeting", "hello there, world"), ("file-2", "the quick brown fox jumps")]
    assert [p["tokens"] for p in summary["prompts"]] == [
        ids(checkpoint, "hello there, world"), ids(checkpoint, "the quick brown fox jumps")]
    rows = (out / "summary.json").read_text()
    assert "greeting" in rows and "file-2" in rows


def test_chat_applies_the_checkpoints_template(checkpoint, tmp_path):
    out = tmp_path / "run"
    assert parity(checkpoint, out, "--prompt-text", "hello world", "--chat") == 0
    (prompt,) = json.loads((out / "summary.json").read_text())["prompts"]
    assert prompt["text"] == "<|user|>hello world\n<|assistant|>"
    assert prompt["source"] == "chat"
    prefix = ids(checkpoint, "<|user|>")
    assert prompt["tokens"][: len(prefix)] == prefix
    assert prompt["tokens"] == ids(checkpoint, prompt["text"])


def test_a_plain_text_file_is_one_prompt(checkpoint, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("a whole file\nof text\n")
    out = tmp_path / "run"
    assert parity(checkpoint, out, "--prompt-file", str(f)) == 0
    (prompt,) = json.loads((out / "summary.json").read_text())["prompts"]
    assert prompt["name"] == "file-1" and prompt["tokens"] == ids(checkpoint, f.read_text())


def _jsonl(tmp_path: Path, *lines: str) -> str:
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return str(f)


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda t: ["--prompt-text", "   "], "--prompt-text: empty text prompt"),
    (lambda t: ["--prompt-file", _jsonl(t, '{"text": "ok"}', "{not json")],
     r"p\.jsonl: line 2: not valid JSON"),
    (lambda t: ["--prompt-file", _jsonl(t, '{"prompt": "x"}')],
     r'line 1: expected \{"text"'),
    (lambda t: ["--prompt-text", "hi", "--prompt-tokens", "x.json"],
     "--prompt-tokens and --prompt-text: give one prompt option"),
    (lambda t: ["--chat"], "--chat: applies to --prompt-text or --prompt-file only"),
])
def test_bad_text_prompts_exit_2_with_a_specific_message(checkpoint, tmp_path, capsys,
                                                         make_args, message):
    assert parity(checkpoint, tmp_path / "run", *make_args(tmp_path)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_ids_outside_the_vocabulary_are_refused(checkpoint, tmp_path, capsys):
    small = bare_copy(checkpoint, tmp_path / "small")
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": vocab + 5}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(small / "tokenizer.json"))  # a tokenizer from a bigger model
    assert parity(small, tmp_path / "run", "--prompt-text", "hello") == 2
    assert f"outside the model's vocabulary [0, {vocab})" in capsys.readouterr().err


def test_a_checkpoint_without_a_tokenizer_names_the_folder(bare, tmp_path, capsys):
    assert parity(bare, tmp_path / "run", "--prompt-text", "hello") == 2
    err = capsys.readouterr().err
    assert str(bare) in err and "no tokenizer" in err and "--prompt-tokens" in err


def test_a_checkpoint_without_a_chat_template_is_refused_for_chat(checkpoint, tmp_path, capsys):
    plain = bare_copy(checkpoint, tmp_path / "plain")
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    write_tiny_tokenizer(plain, vocab)
    assert parity(plain, tmp_path / "run", "--prompt-text", "hi", "--chat") == 2
    assert "has no chat template" in capsys.readouterr().err


def test_text_options_are_refused_with_cases(tmp_path, capsys):
    assert main(["parity", "--cases", "flash-mini", "--prompt-text", "hi"]) == 2
    assert "--prompt-text: not with --cases" in capsys.readouterr().err


def test_a_golden_run_captures_a_text_prompt_and_parity_checks_it(checkpoint, tmp_path, capsys):
    golden = tmp_path / "golden"
    assert main(["capture", "--checkpoint", str(checkpoint), "--prompt-text", "hello world",
                 "--out", str(golden)]) == 0
    manifest = json.loads((golden / "manifest.json").read_text())
    assert manifest["tokens"] == ids(checkpoint, "hello world")
    assert parity(checkpoint, tmp_path / "same", "--golden", str(golden),
                  "--prompt-text", "hello world") == 0
    assert parity(checkpoint, tmp_path / "other", "--golden", str(golden),
                  "--prompt-text", "hello there") == 2
    assert "tokens differ from the golden run's" in capsys.readouterr().err
