"""``python -m harness kld``: KLD over a corpus as llama-perplexity computes it. The reference
against itself is exactly KLD 0 / same top 100%; right float32 ports sit near 0 and a wrong GLA
slope far above them; a saved base gives the same numbers without loading the reference; bad
input (a base of something else, a short or missing corpus, no tokenizer) is exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.checks.cases import CASES_DIR, load_case, materialize
from harness.checks.corpus_kld import KLD_PERCENTILES, kld_summary
from harness.cli.main import main
from tests.bare_checkpoint import bare_copy

pytest.importorskip("tokenizers")
pytest.importorskip("mlx_lm")

CTX, CHUNKS = 64, 3
SCORED = CTX - 1 - CTX // 2  # positions 32..62 of each chunk
MUTANT = "torch-float32:variant=slope_off_by_one"
LLAMA_LINES = ("Mean PPL(Q)                   :", "Mean PPL(base)                :",
               "Cor(ln(PPL(Q)), ln(PPL(base))):", "Mean ln(PPL(Q)/PPL(base))     :",
               "Mean PPL(Q)/PPL(base)         :", "Mean PPL(Q)-PPL(base)         :",
               "Mean    KLD:", "Maximum KLD:", "99.9%   KLD:", "99.0%   KLD:", "95.0%   KLD:",
               "90.0%   KLD:", "Median  KLD:", "10.0%   KLD:", " 5.0%   KLD:", " 1.0%   KLD:",
               " 0.1%   KLD:", "Minimum KLD:", "Mean    Δp:", "Maximum Δp:", "75.0%   Δp:",
               "Median  Δp:", "25.0%   Δp:", "Minimum Δp:", "RMS Δp    :", "Same top p:")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    """The flash-mini case's checkpoint: it ships the harness's tiny byte-level tokenizer."""
    return materialize(load_case(CASES_DIR / "flash-mini.toml"))


@pytest.fixture(scope="module")
def bare(checkpoint: Path, tmp_path_factory) -> Path:
    """The same weights with no tokenizer beside them."""
    return bare_copy(checkpoint, tmp_path_factory.mktemp("flash-mini-bare") / "ckpt")


def kld(*args: str) -> tuple[int, str, str]:
    """Run the subcommand; its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["kld", *args])
    return code, out.getvalue(), err.getvalue()


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def backend(run: Path, label: str) -> dict:
    return next(b for b in summary(run)["backends"] if b["label"] == label)


@pytest.fixture(scope="module")
def direct(checkpoint, tmp_path_factory) -> tuple[Path, Path, str]:
    """The default corpus (README.md) through the reference, two right float32 ports and the
    slope mutant, saving the base: (run folder, base folder, stdout)."""
    tmp = tmp_path_factory.mktemp("kld")
    run, base = tmp / "run", tmp / "base"
    code, out, err = kld("--checkpoint", str(checkpoint), "--ctx", str(CTX), "--chunks",
                         str(CHUNKS), "--backends", f"torch-float32,mlx,{MUTANT}",
                         "--save-base", str(base), "--out", str(run))
    assert code == 0, err
    return run, base, out


def test_it_prints_llama_perplexitys_table_per_backend(direct):
    _, _, out = direct
    for line in LLAMA_LINES:
        assert out.count(line) == 4, line  # the reference against itself + three candidates
    assert "README.md: 3 chunks of 64 tokens, positions 32..62 scored (93 tokens" in out
    report = (direct[0] / "index.html").read_text()
    assert "Corpus KLD" in report and "torch-float32,variant=slope_off_by_one" in report


def test_the_reference_against_itself_is_exactly_kld_0_and_same_top_100(direct):
    run, _, out = direct
    s = backend(run, "torch-float64 (itself)")["summary"]
    assert s["mean_kld"] == 0.0 and s["kld_max"] == 0.0 and s["rms_delta_p"] == 0.0
    assert s["same_top_p"] == 1.0 and s["mean_ppl_ratio"] == 1.0
    assert "Same top p: 100.000 ± 0.000 %" in out


def test_right_float32_ports_are_near_zero_and_a_wrong_slope_far_above(direct):
    run, _, _ = direct
    right = [backend(run, label)["summary"] for label in ("torch-float32", "mlx-float32")]
    wrong = backend(run, "torch-float32,variant=slope_off_by_one")["summary"]
    for s in right:
        assert s["mean_kld"] < 1e-9 and s["same_top_p"] == 1.0
    # measured: 3.7e-13 (torch), 4.0e-13 (mlx) against 5.4e-2 for the off-by-one decay
    assert wrong["mean_kld"] > 1e6 * max(s["mean_kld"] for s in right)
    assert wrong["same_top_p"] < 0.9 and abs(wrong["mean_ln_ppl_ratio"]) > 1e-3


def test_kld_parquet_holds_every_scored_token_of_every_backend(direct, checkpoint):
    run, _, _ = direct
    df = pd.read_parquet(run / "kld.parquet")
    assert list(df.columns[:9]) == ["backend", "chunk", "position", "token", "kld", "delta_p",
                                    "p_ref_top", "p_backend_top", "same_top"]
    assert df.groupby("backend").size().to_dict() == {
        label: CHUNKS * SCORED for label in ("torch-float64 (itself)", "torch-float32",
                                             "mlx-float32",
                                             "torch-float32,variant=slope_off_by_one")}
    one = df[df["backend"] == "torch-float32"]
    assert sorted(set(one["position"])) == list(range(CTX // 2, CTX - 1))
    assert one["kld"].mean() == pytest.approx(backend(run, "torch-float32")["summary"]
                                              ["mean_kld"], rel=1e-12)
    assert (df["kld"] >= 0).all() and df["p_ref_top"].between(0, 1).all()


def test_each_scored_position_predicts_the_next_token_of_its_chunk(direct, checkpoint):
    """NLL(base) at position p is −log softmax(reference logits at p)[token p+1]: computed
    here independently on chunk 0 (a target shifted by one would fail)."""
    from harness.backends.base import forward
    from harness.backends.targets import Target, get_backend
    from harness.cli.prompts import Tokenization

    run, _, _ = direct
    readme = Path(__file__).resolve().parents[1] / "README.md"
    ids = Tokenization(checkpoint).encode(readme.read_text(encoding="utf-8"), special=False)
    chunk = ids[:CTX]
    ref = Target.parse("torch-float64")
    model = get_backend("torch").load(checkpoint, ref.options())
    logits = np.asarray(forward(model, chunk, ["result_output"])["result_output"], np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    df = pd.read_parquet(run / "kld.parquet")
    rows = df[(df["backend"] == "torch-float32") & (df["chunk"] == 0)].sort_values("position")
    want = [-logp[p, chunk[p + 1]] for p in rows["position"]]
    assert rows["token"].tolist() == chunk[CTX // 2 + 1:]
    np.testing.assert_allclose(rows["nll_base"], want, rtol=1e-12)


def test_a_saved_base_gives_identical_numbers_without_loading_the_reference(direct, checkpoint,
                                                                            tmp_path):
    run, base, _ = direct
    assert summary(run)["loaded"][0] == "torch-float64"
    again = tmp_path / "again"
    code, _, err = kld("--checkpoint", str(checkpoint), "--base", str(base),
                         "--backends", "torch-float32,mlx", "--out", str(again))
    assert code == 0, err
    assert summary(again)["loaded"] == ["torch-float32", "mlx-float32"]
    for label in ("torch-float64 (itself)", "torch-float32", "mlx-float32"):
        assert backend(again, label) == backend(run, label)
    a, b = pd.read_parquet(run / "kld.parquet"), pd.read_parquet(again / "kld.parquet")
    a = a[a["backend"].isin(b["backend"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_a_base_of_another_ctx_corpus_or_weights_is_refused(direct, checkpoint, tmp_path):
    _, base, _ = direct
    common = ("--base", str(base), "--backends", "mlx")
    code, _, err = kld("--checkpoint", str(checkpoint), "--ctx", "32", *common)
    assert code == 2 and "--ctx 32" in err and "ctx 64" in err
    other_text = tmp_path / "other.txt"
    other_text.write_text("something else entirely. " * 40)
    code, _, err = kld("--checkpoint", str(checkpoint), "--corpus", str(other_text), *common)
    assert code == 2 and "tokens differ from the base's" in err
    from safetensors.numpy import load_file, save_file

    other = tmp_path / "other-weights"
    shutil.copytree(checkpoint, other, symlinks=False)
    shard = other / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(shard))
    code, _, err = kld("--checkpoint", str(other), *common)
    assert code == 2 and "other weights" in err and name in err


def test_bad_corpus_or_checkpoint_is_exit_2_naming_it(checkpoint, bare, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hi there")
    code, _, err = kld("--checkpoint", str(checkpoint), "--corpus", str(short), "--ctx", "64")
    assert code == 2 and str(short) in err and "too short for one chunk of --ctx 64" in err
    missing = tmp_path / "missing.txt"
    code, _, err = kld("--checkpoint", str(checkpoint), "--corpus", str(missing))
    assert code == 2 and str(missing) in err and "not found" in err
    code, _, err = kld("--checkpoint", str(bare), "--ctx", "64")
    assert code == 2 and "no tokenizer" in err and str(bare.resolve()) in err
    code, _, err = kld("--checkpoint", str(checkpoint), "--ctx", "2")
    assert code == 2 and "--ctx 2" in err


def test_a_crashing_backend_is_its_finding_and_the_others_are_reported(direct, checkpoint,
                                                                       tmp_path, monkeypatch):
    from harness.backends import mlx_backend

    def broken(self, *_a, **_k):
        raise RuntimeError("mlx exploded")

    monkeypatch.setattr(mlx_backend.MlxLoadedModel, "start", broken)
    _, base, _ = direct
    run = tmp_path / "run"
    code, out, _ = kld("--checkpoint", str(checkpoint), "--base", str(base),
                       "--backends", "mlx,torch-float32", "--out", str(run))
    assert code == 1
    crashed = backend(run, "mlx-float32")
    assert crashed["summary"] is None and "mlx exploded" in crashed["error"]
    assert "crashed on corpus chunk 1" in crashed["error"]
    assert backend(run, "torch-float32")["summary"]["same_top_p"] == 1.0
    assert "crashed: " in out and out.count("Mean    KLD:") == 2


def test_the_summary_follows_llama_perplexitys_formulas():
    """On known numbers: PPL = exp(mean NLL), percentiles interpolated on the sorted values,
    same-top uncertainty sqrt(p(1−p)/(N−1)), standard errors 0 for ten values or fewer."""
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame({"nll": rng.uniform(1, 3, n), "nll_base": rng.uniform(1, 3, n),
                          "kld": rng.exponential(0.1, n), "delta_p": rng.normal(0, 0.01, n),
                          "same_top": np.arange(n) % 4 != 0})
    s = kld_summary(frame)
    assert s["mean_ppl_q"] == pytest.approx(np.exp(frame["nll"].mean()))
    assert s["mean_ln_ppl_ratio"] == pytest.approx(frame["nll"].mean() - frame["nll_base"].mean())
    for name, q in KLD_PERCENTILES:
        assert s[f"kld_{name}"] == pytest.approx(np.quantile(frame["kld"], q))
    assert s["same_top_p"] == 0.75
    assert s["same_top_p_unc"] == pytest.approx(np.sqrt(0.75 * 0.25 / (n - 1)))
    assert s["mean_kld_unc"] == pytest.approx(frame["kld"].std(ddof=0) / np.sqrt(n - 1))
    assert s["rms_delta_p"] == pytest.approx(np.sqrt((frame["delta_p"] ** 2).mean()))
    assert kld_summary(frame.head(10))["mean_kld_unc"] == 0.0
