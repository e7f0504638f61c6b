"""The port's own converter on Ling 3.0 / Ling-2.6 checkpoints, every friction a listed finding.

Needs the pinned llama-cpp-python sdist (its vendored ``convert_hf_to_gguf.py`` and ``gguf-py``;
``harness.llamacpp.build.sdist_tree`` downloads it once), torch and transformers >= 5.23 (for
``BailingHybridForCausalLM``).  No llama.cpp library is needed: nothing here runs a GGUF.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from harness.core.errors import InputError, PortFailure
from harness.llamacpp import convert as cv
from harness.llamacpp.convert import (
    ArchitectureNotSupported,
    ConversionFailed,
    convert,
    write_tiny_tokenizer,
)
from tests.llamacpp_testing import REQUIRE_ENV

ROOT = Path(__file__).resolve().parent.parent

# A raw transformers Ling 3.0: 6 layers in groups of 3 (KDA 0,1,3,4; MLA 2,5), q-LoRA, 8 experts
# in 4 groups, one dense lead layer.  head_dim == qk_rope_head_dim because transformers'
# BailingHybridConfig overwrites head_dim with qk_rope_head_dim on load (see the report).
RAW_LING3: dict[str, Any] = dict(
    vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16,
    n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
    num_local_experts=8, head_dim=16, layer_group_size=3, num_mtp_layers=0, pad_token_id=0,
    eos_token_id=1, max_position_embeddings=512,
)

# Each converter friction of ling3-crosscheck.md, as a phrase its finding must contain.
RAW_FRICTIONS = {
    "architecture name": "architectures=['BailingMoeV3ForCausalLM']",
    "transformers' key names (n_group silently lost)": "n_group=4 (from num_expert_group)",
    "AutoConfig renames norm_topk_prob": "KeyError 'norm_topk_prob'",
    "no moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size=32",
    "no score_function": "score_function='sigmoid'",
    "KDA LoRA flag": "no_kda_lora=true",
    "head-wise gate flag": "gated_attention_proj_granularity_type='head_wise'",
    "no tokenizer": "tiny byte-level BPE",
    "BPE pre-tokenizer hash": "named it 'default'",
}


def need_converter() -> Path:
    """The vendored llama.cpp tree, or skip (fail under BAILING_PARITY_REQUIRE_LLAMACPP=1)."""
    import os

    pytest.importorskip("transformers.models.bailing_hybrid")
    try:
        return cv.default_tree()
    except Exception as e:  # no network and no cached sdist
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but the llama-cpp-python sdist is unavailable: {e}")
        pytest.skip(f"llama-cpp-python sdist unavailable: {e}")


def write_raw_ling3(out: Path, seed: int = 0, **overrides: Any) -> Path:
    """A Ling 3.0 checkpoint exactly as transformers' save_pretrained writes it (no fixes)."""
    import torch
    from transformers import BailingHybridConfig, BailingHybridForCausalLM

    torch.manual_seed(seed)
    model = BailingHybridForCausalLM(BailingHybridConfig(**{**RAW_LING3, **overrides})).eval()
    with torch.no_grad():  # non-trivial norms and expert bias, so dropping one would show
        gen = torch.Generator().manual_seed(seed)
        for name, t in sorted([*model.named_parameters(), *model.named_buffers()]):
            if name.endswith("norm.weight"):
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    model.save_pretrained(out)
    return out


def ling3_case_checkpoint(cache: Path) -> Path:
    """The ``ling3-mini`` case (normalised upstream layout) if the family is there, else None."""
    from harness.backends.families import FAMILIES
    from harness.checks.cases import load_case, materialize

    if "ling3" not in FAMILIES:
        pytest.skip("the ling3 family is not registered yet")
    return materialize(load_case(ROOT / "cases" / "ling3-mini.toml"), cache)


def dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def raw_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_converter()
    return write_raw_ling3(tmp_path_factory.mktemp("raw-ling3") / "ckpt")


@pytest.fixture(scope="module")
def raw_conversion(raw_ckpt: Path, gguf_cache: Path) -> tuple[cv.Conversion, str]:
    before = dir_digest(raw_ckpt)
    return convert(raw_ckpt, "f32", cache=gguf_cache), before


def test_raw_transformers_checkpoint_converts_with_every_friction_listed(
    raw_ckpt: Path, raw_conversion: tuple[cv.Conversion, str]
) -> None:
    conv, before = raw_conversion
    assert conv.supported and conv.gguf is not None and conv.gguf.is_file()
    assert conv.architecture == "BailingMoeV3ForCausalLM"
    text = "\n".join(conv.findings)
    missing = {k: v for k, v in RAW_FRICTIONS.items() if v not in text}
    assert not missing, f"frictions not reported: {missing}\n{text}"
    print("\nconverter findings on a raw transformers checkpoint:")
    for f in conv.findings:
        print(" -", f)
    # The user's directory is never modified (the tokenizer went into the staged copy).
    assert dir_digest(raw_ckpt) == before
    assert not (raw_ckpt / "tokenizer.json").exists()


def test_gguf_metadata_reflects_the_staged_fixes(raw_conversion) -> None:
    from harness.llamacpp.inventory import read_gguf

    meta, tensors = read_gguf(raw_conversion[0].gguf)
    a = "bailingmoe3"
    assert meta["general.architecture"] == a
    assert meta[f"{a}.expert_group_count"] == 4  # the silent one
    assert meta[f"{a}.expert_gating_func"] == 2  # sigmoid
    assert meta[f"{a}.expert_weights_norm"] is True
    assert meta[f"{a}.attention.head_count_kv"] == [0, 0, 1, 0, 0, 1]
    assert meta["tokenizer.ggml.pre"] == "default"
    assert tensors["blk.1.ffn_gate_exps.weight"][0] == (64, 32, 8)


def test_conversion_is_cached_by_content(raw_ckpt: Path, raw_conversion, gguf_cache: Path) -> None:
    first = raw_conversion[0]
    again = convert(raw_ckpt, "f32", cache=gguf_cache)
    assert again.cached and again.gguf == first.gguf and again.findings == first.findings
    key = cv.cache_key(raw_ckpt, cv.default_tree(), "f32")
    assert first.gguf.parent.name == key
    assert cv.cache_key(raw_ckpt, cv.default_tree(), "q8_0") != key  # outtype is in the key


@pytest.mark.slow
@pytest.mark.parametrize(("outtype", "file_type"), [("f16", 1), ("bf16", 32), ("q8_0", 7)])
def test_outtypes(raw_ckpt: Path, gguf_cache: Path, outtype: str, file_type: int) -> None:
    from harness.llamacpp.inventory import read_gguf

    conv = convert(raw_ckpt, outtype, cache=gguf_cache)
    meta, _ = read_gguf(conv.require())
    assert meta["general.file_type"] == file_type


def test_normalised_checkpoint_needs_only_the_converter_side_fixes(
    tmp_path_factory: pytest.TempPathFactory, gguf_cache: Path
) -> None:
    need_converter()
    ckpt = ling3_case_checkpoint(tmp_path_factory.mktemp("cases"))
    conv = convert(ckpt, "f32", cache=gguf_cache)
    text = "\n".join(conv.findings)
    assert "KeyError 'norm_topk_prob'" in text
    for phrase in ("architectures=[", "score_function=", "no_kda_lora=", "n_group=",
                   "tiny byte-level BPE"):
        assert phrase not in text, f"{phrase!r} reported for a checkpoint that has it"


def gguf_tokenizer(gguf: Path) -> dict[str, Any]:
    """The GGUF's tokenizer metadata: its tokens (in id order) and chat template (or None)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    template = fields.get("tokenizer.chat_template")
    return {"tokens": fields["tokenizer.ggml.tokens"].contents(),
            "chat_template": template.contents() if template is not None else None}


@pytest.mark.parametrize("case", ["flash-mini", "ling3-mini"])
def test_a_synthetic_case_converts_with_its_own_tokenizer_a_bare_copy_with_the_staged_one(
    case: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, gguf_cache: Path
) -> None:
    from harness.checks.cases import load_case, materialize
    from references.tokenizer import TINY_CHAT_TEMPLATE
    from tests.bare_checkpoint import bare_copy

    need_converter()
    ckpt = materialize(load_case(ROOT / "cases" / f"{case}.toml"), tmp_path_factory.mktemp(case))
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    own_vocab = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    own = convert(ckpt, "f32", cache=gguf_cache)
    assert "tiny byte-level BPE" not in "\n".join(own.findings)  # nothing was staged
    meta = gguf_tokenizer(own.require())
    assert meta["tokens"] == sorted(own_vocab, key=own_vocab.__getitem__)
    assert len(meta["tokens"]) == vocab
    assert meta["chat_template"] == TINY_CHAT_TEMPLATE  # the checkpoint's tokenizer_config.json

    bare = convert(bare_copy(ckpt, tmp_path / "bare"), "f32", cache=gguf_cache)
    assert "tiny byte-level BPE" in "\n".join(bare.findings)  # the staged fallback
    staged = gguf_tokenizer(bare.require())
    assert len(staged["tokens"]) == vocab and staged["chat_template"] is None


def test_ling26_is_not_supported_by_upstream(tmp_path: Path, gguf_cache: Path) -> None:
    from tests.tiny_checkpoint import write_tiny_checkpoint

    need_converter()
    from harness.llamacpp.build import sdist_tree

    ckpt = write_tiny_checkpoint(tmp_path / "ling26")
    stock = sdist_tree() / "vendor" / "llama.cpp"  # upstream, without our port's patches
    conv = convert(ckpt, "f32", tree=stock, cache=gguf_cache)
    assert not conv.supported and conv.gguf is None
    assert conv.reason.startswith("architecture not supported by this build")
    assert "BailingMoeV2_5ForCausalLM" in conv.reason
    with pytest.raises(ArchitectureNotSupported) as e:
        conv.require()
    assert isinstance(e.value, InputError)
    assert convert(ckpt, "f32", tree=stock, cache=gguf_cache).cached  # the refusal is cached too


def test_a_converter_crash_on_a_known_architecture_is_a_port_failure(
    raw_ckpt: Path, tmp_path: Path, gguf_cache: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(raw_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["kv_lora_rank"]  # the converter indexes it unconditionally
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionFailed) as e:
        convert(bad, "f32", cache=gguf_cache)
    assert isinstance(e.value, PortFailure)
    msg = str(e.value)
    assert "KeyError: 'kv_lora_rank'" in msg and "after staging:" in msg


def test_bad_inputs_are_input_errors(raw_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="outtype"):
        convert(raw_ckpt, "q4_k")
    with pytest.raises(InputError, match=r"no config\.json"):
        convert(tmp_path, "f32")
    with pytest.raises(InputError, match=r"not a llama\.cpp tree"):
        convert(raw_ckpt, "f32", tree=tmp_path)


def test_tiny_tokenizer_has_exactly_the_vocab(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    for n in (5, 64, 300, 600):
        d = tmp_path / str(n)
        d.mkdir()
        write_tiny_tokenizer(d, n)
        tok = AutoTokenizer.from_pretrained(d)
        assert len(tok.get_vocab()) == n and max(tok.get_vocab().values()) == n - 1
    with pytest.raises(InputError):
        write_tiny_tokenizer(tmp_path, 2)
