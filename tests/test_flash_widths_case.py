"""The realistic-width parity case (``cases/flash-widths-ci.toml``, issue 10): Ling-2.6-flash's
real per-layer widths in the default suite, in the upstream bf16 layout, streamed by the
reference, only the checks it names, and a tolerance a real bug fails at those widths."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness.backends.targets import Target
from harness.checks.cases import (
    CASES_DIR,
    SMALL_PARAMETERS,
    load_case,
    materialize,
    parameter_count,
)
from harness.checks.session import CheckSession
from harness.core.errors import InputError
from references.weights import choose_load

CASE = CASES_DIR / "flash-widths-ci.toml"
GIB = 2**30
# Ling-2.6-flash's per-layer widths (its config.json); only layers, experts and groups are cut.
FLASH_WIDTHS = {
    "hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
    "partial_rotary_factor": 0.5, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "moe_intermediate_size": 1024, "intermediate_size": 9216, "vocab_size": 157184,
    "num_shared_experts": 1, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
}


def test_the_case_has_flash_widths_with_few_layers_and_experts() -> None:
    case = load_case(CASE)
    assert {k: case.config[k] for k in FLASH_WIDTHS} == FLASH_WIDTHS
    cfg = case.config
    assert cfg["num_hidden_layers"] == 4 and cfg["layer_group_size"] == 2  # two MLA layers
    # a group limit that drops a group and a top-k below the groups' candidates
    kept = cfg["topk_group"] * cfg["num_experts"] // cfg["n_group"]
    assert cfg["topk_group"] < cfg["n_group"] and cfg["num_experts_per_tok"] < kept
    assert 2.1e9 < parameter_count(case) < 2.3e9 and parameter_count(case) > SMALL_PARAMETERS
    assert [len(p.tokens) for p in case.prompts] == [64]


@pytest.mark.slow
def test_it_is_written_in_bf16_in_the_upstream_sharded_layout() -> None:
    ckpt = materialize(load_case(CASE))  # ~40 s the first time, cached after
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.4.eh_proj.weight"] == "model-mtp-layer.safetensors"
    files = sorted(ckpt.glob("*.safetensors"))
    assert len(files) >= 3 and all(f.stat().st_size <= 2 * 10**9 for f in files)
    assert 4.2e9 < sum(f.stat().st_size for f in files) < 4.5e9  # 2 bytes a parameter
    for f in files:
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}, f


def test_auto_streams_the_reference_and_the_torch_candidate_on_a_ci_machine() -> None:
    n = parameter_count(load_case(CASE))
    for ram in (24 * GIB, 64 * GIB):
        assert choose_load("auto", n, torch.float64, ram=ram) == "streamed"
        assert choose_load("auto", n, torch.float32, ram=ram) == "streamed"


def _collected(*args: str) -> list[str]:
    """Item ids ``pytest cases --collect-only`` would run (in-process; nothing is computed)."""
    seen: list[str] = []

    class Grab:
        def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
            seen.extend(f"{i.parent.name}::{i.name}" for i in items)

    code = pytest.main(["cases", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       plugins=[Grab()])
    assert code == pytest.ExitCode.OK
    return seen


def test_only_the_checks_the_case_names_are_collected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES_DIR.parent)
    items = _collected("--cases", "flash-widths-ci,flash-mini", "--backends", "torch,mlx,llamacpp")
    ours = [i for i in items if i.startswith("flash-widths-ci.toml::")]
    assert sorted(i.rsplit("::", 1)[1] for i in ours) == ["decode"] * 3 + ["prefill"] * 3
    mini = {i.rsplit("::", 1)[1] for i in items if i.startswith("flash-mini.toml::")}
    assert mini == {"prefill", "decode", "greedy", "mtp", "slopes"}  # no modes key: every check


@pytest.mark.parametrize(("value", "message"), [
    ('"prefill"', "expected a non-empty list of check names"),
    ("[]", "expected a non-empty list of check names"),
    ("[1]", "expected a non-empty list of check names"),
])
def test_a_bad_modes_key_names_the_file(tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CASE.read_text().replace('modes = ["prefill", "decode"]', f"modes = {value}"))
    with pytest.raises(InputError, match=message) as err:
        load_case(path)
    assert str(path) in str(err.value)


def test_an_unknown_check_in_modes_is_refused_naming_the_file() -> None:
    from harness.pytest_plugin.plugin import case_modes

    case = load_case(CASE)
    assert case_modes(case, ["prefill", "greedy", "decode"]) == ["prefill", "decode"]
    with pytest.raises(InputError, match=r"flash-widths-ci.toml: modes: unknown check\(s\) "
                                         r"\['decodes'\]"):
        case_modes(replace(case, modes=("prefill", "decodes")), ["prefill"])


def test_each_candidate_is_freed_after_its_last_item_of_the_case(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One candidate in memory at a time (at flash widths mlx and llama.cpp hold ~9 GB each)."""
    from harness.pytest_plugin.plugin import ParityItem

    monkeypatch.chdir(CASES_DIR.parent)
    flags: list[tuple[str, str, bool]] = []

    class Grab:
        def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
            flags.extend((i.prompt, i.candidate.backend, i.last_of_candidate)
                         for i in items if isinstance(i, ParityItem))

    code = pytest.main(["cases", "--collect-only", "-q", "-p", "no:cacheprovider", "--cases",
                        "flash-mini", "--backends", "torch,mlx", "--modes", "prefill,decode"],
                       plugins=[Grab()])
    assert code == pytest.ExitCode.OK
    last = [(p, b) for p, b, is_last in flags if is_last]
    # three prompts: each candidate is freed after the last prompt's items, not in between
    assert last == [("text", "torch"), ("text", "mlx")]


@pytest.mark.slow
def test_the_slope_off_by_one_fails_this_case_at_the_first_gla_point() -> None:
    """The case's float32 tolerance at real widths could have failed: the off-by-one GLA decay,
    in float64, diverges at ``gla_out-0`` (two streamed float64 forwards: minutes here)."""
    case = load_case(CASE)
    prompt = case.prompts[0]
    session = CheckSession()
    result = session.compare(
        case=case.name, prompt=prompt.name, checkpoint=materialize(case), tokens=prompt.tokens,
        candidate=Target.parse("torch-float64", {"variant": "slope_off_by_one"}),
        reference=Target.parse("torch-float64"), tolerance=case.tolerance("float32"))
    assert not result.passed, result.summary_line()
    assert result.first_divergence == "gla_out-0", result.summary_line()


def test_the_tiny_tokenizer_reaches_flash_vocabulary_for_the_converter(tmp_path: Path) -> None:
    """The llama.cpp conversion stages a tiny tokenizer of the config's vocabulary; beyond
    256 + 65536 tokens it once looped forever (two-char merges run out), quadratically slowly."""
    from tokenizers import Tokenizer

    from references.tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path, FLASH_WIDTHS["vocab_size"])
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == FLASH_WIDTHS["vocab_size"]
    assert max(tok.get_vocab().values()) == FLASH_WIDTHS["vocab_size"] - 1
    assert tok.decode(tok.encode("flash widths, 4096 wide").ids) == "flash widths, 4096 wide"
