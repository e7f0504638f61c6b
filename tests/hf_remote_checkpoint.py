"""A case's synthetic checkpoint shipped with the project's own remote code (tests/remote_code):
``auto_map`` in config.json and the modeling file beside the weights, as a Hub checkpoint ships
its ``trust_remote_code`` file.  Variants replace the marked lines of the modeling file."""

from __future__ import annotations

import json
from pathlib import Path

from harness.checks.cases import load_case, write_checkpoint

REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"
MODELING = "modeling_ling26_remote.py"
CONFIGURATION = "configuration_ling26_remote.py"
AUTO_MAP = {
    "AutoConfig": "configuration_ling26_remote.Ling26RemoteConfig",
    "AutoModelForCausalLM": "modeling_ling26_remote.Ling26RemoteForCausalLM",
}
# The marked lines of the modeling file, and what each variant puts there.
SLOPE_LINE = "factor = 1 - self.layer_idx / denom + 1e-5  # SLOPE"
ROUTE_LINE = "scores = probs + self.expert_bias  # ROUTE"
LOGITS_LINE = "logits = F.linear(x, self.weight)  # LOGITS"
VARIANTS: dict[str, dict[str, str]] = {
    "corrected": {},
    "hf_off_by_one": {SLOPE_LINE: "factor = 1 - (self.layer_idx - 1) / denom + 1e-5  # SLOPE"},
    "half_slope": {SLOPE_LINE: "factor = 0.5 * (1 - self.layer_idx / denom + 1e-5)  # SLOPE"},
    "expert_bias_dropped": {ROUTE_LINE: "scores = probs  # ROUTE"},
    # the router computed in float32 whatever the model's dtype (as authors' code often casts)
    "router_in_float32": {LOGITS_LINE: "logits = F.linear(x.float(), self.weight.float())"},
}


def modeling_source(variant: str) -> str:
    """The modeling file with the variant's lines replaced (each must occur exactly once)."""
    text = (REMOTE_CODE / MODELING).read_text()
    for old, new in VARIANTS[variant].items():
        assert text.count(old) == 1, f"{MODELING}: marked line moved: {old!r}"
        text = text.replace(old, new)
    return text


def write_remote_checkpoint(out: Path, case: str = "flash-mini", variant: str = "corrected",
                            **config: object) -> Path:
    """The case's checkpoint in ``out`` with the project's remote code (variant ``variant``);
    ``config`` adds keys to config.json (e.g. ``transformers_version``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(load_case(Path(__file__).resolve().parent.parent / "cases" / f"{case}.toml"),
                     out)
    raw = json.loads((out / "config.json").read_text())
    raw.update({"auto_map": AUTO_MAP, **config})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / MODELING).write_text(modeling_source(variant))
    (out / CONFIGURATION).write_text((REMOTE_CODE / CONFIGURATION).read_text())
    return out
