"""The GLA decay diagnosis names the formula a backend uses, from what it exposes and, separately,
from its activations alone; both paths agree, and a formula that is neither is reported with its
fitted values.  On an HF-style checkpoint no case made (tests/upstream_writer.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.backends.base import BackendOptions
from harness.backends.mlx_backend import MlxBackend
from harness.checks.slope_diagnostics import (
    NEITHER,
    diagnose,
    formula_growth,
    reference_pair,
    slope_section,
)
from harness.cli.main import main
from harness.report.page import render_section
from references.model import BailingHybridReference, ReferenceOptions
from references.ops import layer_factor
from references.variant import Variant
from tests.upstream_writer import write_upstream_checkpoint

needs_mlx = pytest.mark.skipif(
    not MlxBackend().availability().ok, reason=MlxBackend().availability().reason
)
STOCK = "1 - self.layer_idx / denom + 1e-5"  # mlx-lm's layer factor
PORTS = {  # the same line in each port
    "off_by_one": "1 - (self.layer_idx - 1) / denom + 1e-5",  # HF-R's original
    "half": "0.5 * (1 - self.layer_idx / denom + 1e-5)",  # neither formula
}
LENGTHS = (16, 64, 256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_upstream_checkpoint(tmp_path_factory.mktemp("upstream") / "ling26")


@pytest.fixture(scope="module")
def refs(checkpoint):
    return reference_pair(checkpoint)


@pytest.fixture(scope="module")
def ports(tmp_path_factory) -> dict[str, Path]:
    source = Path(__import__("mlx_lm.models.bailing_hybrid").models.bailing_hybrid.__file__)
    text = source.read_text()
    assert text.count(STOCK) == 1, "mlx-lm's slope line moved: update this test"
    folder = tmp_path_factory.mktemp("ports")
    out = {}
    for name, factor in PORTS.items():
        out[name] = folder / f"bailing_hybrid_{name}.py"
        out[name].write_text(text.replace(STOCK, factor))
    return out


def _mlx(checkpoint: Path, module: Path | None = None):
    extra = {"model_module": str(module)} if module else {}
    return MlxBackend().load(checkpoint, BackendOptions(extra=extra))


def _factors(v, path: str) -> dict[int, float]:
    return {d.layer: d.factor for d in getattr(v, path)}


@needs_mlx
def test_mlx_lm_uses_the_corrected_formula_on_both_paths(checkpoint, refs):
    v = diagnose("mlx", _mlx(checkpoint), refs, lengths=LENGTHS)
    assert v.verdict == v.black_box_verdict == "corrected" and v.agree
    assert [d.layer for d in v.black_box] == [0, 2]  # the GLA layers of a 4-layer, G=2 model
    for path in ("exposed", "black_box"):
        for layer, f in _factors(v, path).items():
            assert f == pytest.approx(layer_factor(layer, 4, "corrected"), rel=1e-5)
    for d in v.black_box:
        assert d.error["corrected"] < 1e-10 < 1e-4 < d.error["hf_off_by_one"]
    assert max(v.growth.values()) < 1e-10  # the port's logits match the reference at every T


@needs_mlx
def test_a_port_with_layer_idx_minus_one_is_named_hf_off_by_one_on_both_paths(
    checkpoint, refs, ports
):
    v = diagnose("mlx-off", _mlx(checkpoint, ports["off_by_one"]), refs, lengths=LENGTHS)
    assert v.verdict == v.black_box_verdict == "hf_off_by_one" and v.agree
    for path in ("exposed", "black_box"):
        for layer, f in _factors(v, path).items():
            assert f == pytest.approx(layer_factor(layer, 4, "hf_off_by_one"), rel=1e-5)
    # Its logits error is exactly the error between the two formulas, at every length.
    between = formula_growth(refs, LENGTHS)
    for t in LENGTHS:
        assert v.growth[t] == pytest.approx(between[t], rel=1e-4)


@needs_mlx
def test_a_third_formula_is_neither_and_its_fitted_decays_are_reported(checkpoint, refs, ports):
    v = diagnose("mlx-half", _mlx(checkpoint, ports["half"]), refs)
    assert v.verdict == v.black_box_verdict == NEITHER and v.agree
    exposed = {d.layer: d.log_decay for d in v.exposed}
    for d in v.black_box:
        assert d.factor == pytest.approx(0.5 * layer_factor(d.layer, 4, "corrected"), rel=1e-4)
        assert d.log_decay == pytest.approx(exposed[d.layer], rel=1e-4)  # fit == stored values
        assert d.error["fit"] < 1e-10 < 1e-4 < min(d.error["corrected"], d.error["hf_off_by_one"])


def test_the_reference_itself_is_diagnosed_by_either_path(checkpoint, refs):
    """A backend with no ``_slope`` attribute: the reference, run with the off-by-one variant."""
    off = BailingHybridReference.from_checkpoint(
        checkpoint, ReferenceOptions(variant=Variant(slope_formula="hf_off_by_one"))
    )
    v = diagnose("torch-off", off, refs)
    assert v.verdict == v.black_box_verdict == "hf_off_by_one" and v.agree


def test_the_slope_choice_matters_at_every_context_length(refs):
    growth = formula_growth(refs, LENGTHS)
    assert list(growth) == list(LENGTHS)
    assert all(x > 1e-2 for x in growth.values())
    assert growth[64] > growth[16]  # the state carries the wrong decay further


@needs_mlx
def test_slopes_cli_names_the_off_by_one_port_and_fails(checkpoint, ports, tmp_path):
    out = tmp_path / "run"
    argv = [
        "slopes",
        "--checkpoint",
        str(checkpoint),
        "--mlx-model-module",
        str(ports["off_by_one"]),
        "--lengths",
        "16,64",
        "--out",
        str(out),
    ]
    assert main(argv) == 1
    summary = json.loads((out / "slopes.json").read_text())
    (backend,) = summary["backends"].values()
    assert backend["verdict"] == backend["black_box_verdict"] == "hf_off_by_one"
    assert backend["agree"] is True
    assert set(summary["formula_growth"]) == {"16", "64"}
    html = (out / "index.html").read_text()
    assert "GLA decay (slopes)" in html and "hf_off_by_one" in html


@needs_mlx
def test_slope_section_tabulates_every_layer_and_length(checkpoint, refs):
    v = diagnose("mlx", _mlx(checkpoint), refs, lengths=(16,))
    html = render_section(slope_section([v], formula_growth(refs, (16,))))
    assert html.count("<td>mlx</td>") == 1 + 2 * 2  # verdict row + (exposed, black box) x 2
    assert "T = 16" in html and "off-by-one vs corrected" in html
