"""The memory benchmark (harness.perf.memory_bench) measures each run in its own process."""

from __future__ import annotations

import json

from harness.checks.cases import load_case, materialize
from harness.perf.memory_bench import doubled, main, prompt_tokens
from tests.test_mutations import CASES


def test_doubling_keeps_the_widths_and_doubles_layers_and_experts():
    case = load_case(CASES / "flash-mini.toml")
    big = doubled(case)
    assert big.name == "flash-mini-x2"
    changed = {k for k in case.config if case.config[k] != big.config[k]}
    assert changed == {"num_hidden_layers", "num_experts"}
    assert (big.config["num_hidden_layers"], big.config["num_experts"]) == (16, 32)


def test_prompt_tokens_extend_the_first_prompt_to_the_length_asked():
    case = load_case(CASES / "flash-mini.toml")
    tokens = prompt_tokens(case, 20)
    assert tokens[:16] == list(case.prompts[0].tokens) and len(tokens) == 20
    assert all(0 <= t < 512 for t in tokens)


def test_the_benchmark_reports_a_peak_per_fresh_process(tmp_path, capsys):
    out = tmp_path / "figures.json"
    rc = main(["--case", str(CASES / "flash-mini.toml"), "--tokens", "8",
               "--load", "streamed,memory", "--captures", "logits", "--threads", "1",
               "--json", str(out)])
    assert rc == 0
    figures = json.loads(out.read_text())
    row = figures["rows"][0]
    streamed, memory = row["streamed/logits"], row["memory/logits"]
    assert (streamed["load"], memory["load"]) == ("streamed", "memory")
    assert streamed["tokens"] == memory["tokens"] == 8
    assert streamed["threads"] == memory["threads"] == 1
    for r in (streamed, memory):
        assert r["peak_rss"] >= r["rss_after_load"] >= r["rss_after_imports"] > 0
    ckpt = materialize(load_case(CASES / "flash-mini.toml"))
    assert 0 < streamed["bytes_read"] <= sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert memory["bytes_read"] is None
    assert row["bandwidth_cold"] > 0 and row["bandwidth_warm"] > 0


def test_unknown_choices_are_refused_with_exit_2(capsys):
    assert main(["--load", "disk"]) == 2
    assert "disk" in capsys.readouterr().err
