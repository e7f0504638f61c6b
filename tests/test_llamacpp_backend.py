"""The llama.cpp backend end to end on Ling 3.0: converter -> inventory -> worker -> comparison.

Needs the harness's llama-cpp-python build (``python -m harness.llamacpp.build --install``),
``gguf``, transformers >= 5.23 and the ling3 family (``cases/ling3-mini.toml``); without them
these tests skip, unless ``BAILING_PARITY_REQUIRE_LLAMACPP=1``.  The reference is
``torch-float64`` (transformers' own model in float64 for Ling 3.0).

Figures printed with ``-s`` (the report's numbers): per-point NMSE of the f32 GGUF with an f32
and with an f16 KV cache, greedy agreement over 64 tokens, and the cost of capturing every
``l_out-N`` against a plain forward (measured, not asserted: machines differ).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.backends.base import BackendOptions, forward
from harness.backends.llamacpp_backend import (
    ArchitectureNotSupported,
    LlamaCppBackend,
    model_findings,
    parse_options,
)
from harness.backends.targets import BACKENDS, Target, parse_targets
from harness.checks.cases import load_case, materialize
from harness.checks.greedy import GREEDY_STEPS, greedy_compare
from harness.checks.session import CheckSession
from harness.core.capture_points import all_points
from harness.core.errors import InputError, PortFailure
from harness.llamacpp import abi
from harness.llamacpp.inventory import rewrite_gguf
from tests.llamacpp_testing import require_llamacpp

ROOT = Path(__file__).resolve().parent.parent
NMSE_MAX = 1e-8


@pytest.fixture(scope="module")
def case():
    from harness.backends.families import FAMILIES

    pytest.importorskip("transformers.models.bailing_hybrid")
    if "ling3" not in FAMILIES:
        pytest.skip("the ling3 family is not registered yet")
    return load_case(ROOT / "cases" / "ling3-mini.toml")


@pytest.fixture(scope="module")
def ckpt(case) -> Path:
    return materialize(case)


@pytest.fixture(scope="module")
def runner() -> CheckSession:
    return CheckSession()


@pytest.fixture(scope="module")
def f32(runner: CheckSession, ckpt: Path):
    """The f32 GGUF with an f32 KV cache, loaded once for the module."""
    require_llamacpp()
    return runner.model(Target.parse("llamacpp"), ckpt)


# --- registration and options (no llama.cpp needed) ---------------------------------------------
def test_registered_with_float32_default_and_spec_options() -> None:
    assert "llamacpp" in BACKENDS
    assert Target.parse("llamacpp").label == "llamacpp-float32"
    t = Target.parse("llamacpp-bfloat16:type_k=f16:type_v=f16")
    assert t.label == "llamacpp-bfloat16,type_k=f16,type_v=f16"
    s = parse_options(t.options())
    assert (s.outtype, s.params.type_k, s.params.type_v) == ("bf16", "f16", "f16")
    assert [x.label for x in parse_targets("torch,llamacpp:outtype=q8_0")] == [
        "torch-float32", "llamacpp-float32,outtype=q8_0"]
    d = parse_options(BackendOptions(dtype="float32"))
    assert (d.outtype, d.params.type_k, d.params.type_v, d.params.flash_attn) == (
        "f32", "f32", "f32", False)


@pytest.mark.parametrize(
    ("dtype", "extra", "match"),
    [
        ("float64", {}, "no GGUF type"),
        ("float32", {"type_k": "q4_0"}, "type_k"),
        ("float32", {"outtype": "q4_k"}, "outtype"),
        ("float32", {"n_ubatch": "0"}, "positive"),
        ("float32", {"flash_attn": "maybe"}, "0/1"),
        ("float32", {"bogus": "1"}, "unknown option"),
    ],
)
def test_bad_options_are_input_errors(dtype: str, extra: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_options(BackendOptions(dtype=dtype, extra=extra))


# --- numbers ------------------------------------------------------------------------------------
def _table(result) -> str:
    t = result.table
    return "\n".join(f"    {p:<20} {n:.2e}" for p, n in zip(t["point"], t["nmse"], strict=True)
                     if not np.isnan(n))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_f32_gguf_with_f32_kv_matches_the_float64_reference(runner, ckpt, case, f32, mode) -> None:
    assert f32.n_layers == 5 and f32.port is not None
    for prompt in case.prompts:
        r = runner.compare(
            case=case.name, prompt=prompt.name, checkpoint=ckpt, tokens=prompt.tokens,
            candidate=Target.parse("llamacpp"), reference=Target.parse("torch-float64"),
            tolerance=case.tolerance("float32"), mode=mode, n_decode=case.decode_steps,
        )
        nmse = r.table["nmse"].dropna()
        print(f"\n{prompt.name} {mode}: llamacpp f32 GGUF + f32 KV vs torch-float64, NMSE per "
              f"point (worst {nmse.max():.2e}):\n{_table(r)}")
        assert r.passed, r.summary_line()
        assert nmse.max() <= NMSE_MAX
        points = set(r.table["point"])
        assert {"l_out-0", "l_out-4", "attn_out-1", "ffn_moe_topk-1", "result_output"} <= points


@pytest.mark.slow
def test_f16_kv_cache_figure(runner, ckpt, case) -> None:
    require_llamacpp()
    prompt = next(p for p in case.prompts if p.name == "random-80")
    figures = {}
    for spec in ("llamacpp", "llamacpp:type_k=f16:type_v=f16"):
        r = runner.compare(
            case=case.name, prompt=prompt.name, checkpoint=ckpt, tokens=prompt.tokens,
            candidate=Target.parse(spec), reference=Target.parse("torch-float64"),
            tolerance=case.tolerance("float32"),
        )
        t = r.table.set_index("point")
        figures[spec] = (t.loc["result_output", "nmse"], r.first_divergence)
        print(f"\n{prompt.name}: {Target.parse(spec).label}: logits NMSE "
              f"{figures[spec][0]:.2e}, first divergence at 1e-8: {r.first_divergence}\n"
              f"{_table(r)}")
    f32_kv, f16_kv = figures["llamacpp"][0], figures["llamacpp:type_k=f16:type_v=f16"][0]
    assert f32_kv < 1e-10 < f16_kv < 1e-5  # the KV cache type is what costs precision


# --- coverage and failures ----------------------------------------------------------------------
def test_ling26_through_the_stock_converter_is_architecture_not_supported(tmp_path: Path) -> None:
    """Upstream llama.cpp (no port patches) has no Ling-2.6: a clear skip reason, not a crash."""
    from harness.llamacpp.build import sdist_tree
    from tests.test_llamacpp_convert import need_converter
    from tests.tiny_checkpoint import write_tiny_checkpoint

    require_llamacpp()
    need_converter()
    ckpt = write_tiny_checkpoint(tmp_path / "ling26")
    stock = {"tree": str(sdist_tree() / "vendor" / "llama.cpp")}
    with pytest.raises(ArchitectureNotSupported, match=r"^architecture not supported by this"):
        LlamaCppBackend().load(ckpt, BackendOptions(dtype="float32", extra=stock))
    assert issubclass(ArchitectureNotSupported, InputError)


def test_converter_findings_are_on_the_model(f32) -> None:
    text = "\n".join(f32.findings)
    assert "KeyError 'norm_topk_prob'" in text and "named it 'default'" in text
    assert model_findings([f32, f32, object()]) == f32.findings
    assert f32.describe()["type_k"] == "f32"


@pytest.mark.parametrize(
    ("damage", "expect_port", "expect_inventory"),
    [
        ({"drop_tensors": ["blk.1.attn_k_b.weight"]}, "blk.1.attn_k_b.weight",
         "tensors missing from the GGUF"),
        ({"drop_keys": ["bailingmoe3.expert_gating_func"]}, "bailingmoe3.expert_gating_func",
         "required metadata keys missing"),
    ],
)
def test_a_damaged_gguf_is_a_port_failure_with_the_inventory(
    f32, ckpt, tmp_path: Path, damage: dict, expect_port: str, expect_inventory: str
) -> None:
    bad = rewrite_gguf(f32.gguf, tmp_path / "bad.gguf", **damage)
    with pytest.raises(PortFailure) as e:
        LlamaCppBackend().load(ckpt, BackendOptions(extra={"gguf": str(bad)}))
    msg = str(e.value)
    assert expect_port in msg and expect_inventory in msg, msg


@pytest.mark.slow
def test_an_abort_is_a_finding_and_the_run_goes_on(runner, ckpt, case, f32, tmp_path) -> None:
    """GGML_ASSERT at load (a KDA gate bound >= 0) kills the worker, not this process."""
    bad = rewrite_gguf(f32.gguf, tmp_path / "assert.gguf",
                       set_keys={"bailingmoe3.kda.gate_lower_bound": 1.0})
    prompt = case.prompts[0]
    kw = dict(case=case.name, prompt=prompt.name, checkpoint=ckpt, tokens=prompt.tokens,
              reference=Target.parse("torch-float64"), tolerance=case.tolerance("float32"))
    broken = Target.parse(f"llamacpp:gguf={bad}")
    with pytest.raises(PortFailure) as e:
        runner.compare(candidate=broken, **kw)
    msg = str(e.value)
    assert "SIGABRT" in msg and "GGML_ASSERT(hparams.kda_gate_lower_bound < 0.0f)" in msg
    assert "kda.gate_lower_bound=1.0 but config.json has kda_lower_bound=-5.0" in msg
    with pytest.raises(PortFailure):  # memoised: not retried per item
        runner.compare(candidate=broken, **kw)
    assert runner.compare(candidate=Target.parse("llamacpp"), **kw).passed  # the rest runs


# --- greedy -------------------------------------------------------------------------------------
class _Scripted:
    """A LoadedModel whose logits at step i come from a script (one row per position)."""

    n_layers = 0

    def __init__(self, rows: dict[int, list[float]], vocab: int = 8) -> None:
        self.rows, self.vocab = rows, vocab

    def _row(self, pos: int) -> np.ndarray:
        return np.array(self.rows.get(pos, [0.0] * self.vocab), dtype=np.float64)

    def start(self, capture=()):
        model, state = self, {"n": 0}

        class S:
            def feed(self, tokens):
                n0 = state["n"]
                state["n"] += len(tokens)
                return {"result_output": np.stack([model._row(n0 + i) for i in range(len(tokens))])}

        return S()


def _onehot(i: int, second: int | None = None, vocab: int = 8) -> list[float]:
    row = [0.0] * vocab
    row[i] = 2.0
    if second is not None:
        row[second] = 1.0
    return row


def test_greedy_rule() -> None:
    prompt = [0, 1]  # positions 0, 1; step k's logits sit at position 1 + k
    ref = _Scripted({1: _onehot(3), 2: _onehot(4, 5), 3: _onehot(6)})
    same = _Scripted({1: _onehot(3), 2: _onehot(4, 5), 3: _onehot(6)})
    tie = _Scripted({1: _onehot(3), 2: _onehot(5, 4), 3: _onehot(6)})
    far = _Scripted({1: _onehot(3), 2: _onehot(7, 1), 3: _onehot(6)})
    r = greedy_compare(same, ref, prompt, n_steps=3, top_k=2)
    assert (r.rule, r.first_mismatch, r.passed, r.candidate_tokens) == ("identical", None, True,
                                                                       [3, 4, 6])
    r = greedy_compare(tie, ref, prompt, n_steps=3, top_k=2)
    assert (r.rule, r.first_mismatch, r.passed) == ("mutual-top-k", 1, True)
    assert "near-tie" in r.summary() and r.agreed_steps == 1
    r = greedy_compare(far, ref, prompt, n_steps=3, top_k=2)
    assert (r.rule, r.first_mismatch, r.passed) == ("not-in-top-k", 1, False)
    assert greedy_compare(tie, ref, prompt, 3, 2, reference_mode="decode").rule == "mutual-top-k"


@pytest.mark.slow
def test_greedy_llamacpp_vs_reference(runner, ckpt, case, f32) -> None:
    ref = runner.model(Target.parse("torch-float64"), ckpt)
    f16kv = runner.model(Target.parse("llamacpp:type_k=f16:type_v=f16"), ckpt)
    for prompt in case.prompts:
        r = greedy_compare(f32, ref, prompt.tokens, n_steps=GREEDY_STEPS)
        r16 = greedy_compare(f16kv, ref, prompt.tokens, n_steps=GREEDY_STEPS)
        print(f"\n{prompt.name}: f32 KV {r.summary()}\n{prompt.name}: f16 KV {r16.summary()}")
        assert r.rule == "identical", r.summary()
        assert r16.passed, r16.summary()


# --- capture cost (a figure, not an assertion) --------------------------------------------------
@pytest.mark.slow
def test_capture_overhead_figure(f32) -> None:
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, f32.info["n_vocab"], 256).tolist()
    sets = {
        "plain forward (logits only)": (),
        f"all l_out-N ({f32.n_layers})": [f"l_out-{i}" for i in range(f32.n_layers)],
        "every canonical point": all_points(f32.n_layers),
    }
    times = {}
    for label, names in sets.items():
        forward(f32, tokens, names)  # warm
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            caps = forward(f32, tokens, names)
            runs.append(time.perf_counter() - t0)
        times[label] = float(np.median(runs))
        assert caps["result_output"].shape == (256, f32.info["n_vocab"])
    base = times["plain forward (logits only)"]
    print("\ncapture overhead, 256-token prefill of ling3-mini (median of 5, incl. IPC):")
    for label, t in times.items():
        print(f"    {label:<32} {t * 1e3:7.1f} ms  ({t / base:.2f}x)")


# --- a user's own libllama: ABI check -----------------------------------------------------------
def _vendored_lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "lib"


def _fake_libllama(tmp: Path, body: str) -> Path:
    """A libllama.so overriding some functions; every other symbol resolves to the real one."""
    if shutil.which("gcc") is None or sys.platform != "linux":
        pytest.skip("needs gcc on Linux to build a fake libllama")
    real = _vendored_lib_dir()
    out = tmp / "lib"
    out.mkdir()
    (tmp / "fake.c").write_text("#include <stdlib.h>\n#include <string.h>\n" + body)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(out / "libllama.so"), str(tmp / "fake.c"),
         f"-L{real}", "-Wl,--no-as-needed", "-l:libllama.so", f"-Wl,-rpath,{real}"],
        check=True,
    )
    return out


def test_abi_vendored_library_is_compatible() -> None:
    require_llamacpp()
    probe = abi.check_library(_vendored_lib_dir())
    ctx = probe.structs["llama_context_params"]
    assert ctx["fields"]["n_batch"] == 2048 and ctx["fields"]["type_k"] == 1
    if ctx["extent"] is not None:
        assert ctx["extent"] == ctx["sizeof"]


def test_abi_refuses_a_directory_without_libllama(tmp_path: Path) -> None:
    require_llamacpp()
    with pytest.raises(InputError, match="cannot bind this library"):
        abi.check_library(tmp_path)


def test_abi_refuses_a_larger_struct(tmp_path: Path) -> None:
    require_llamacpp()
    lib = _fake_libllama(tmp_path, (
        "typedef struct { unsigned char b[168]; } big_t;\n"
        "big_t llama_context_default_params(void) { big_t r; memset(&r, 0, sizeof r);"
        " return r; }\n"))
    with pytest.raises(InputError) as e:
        abi.check_library(lib)
    msg = str(e.value)
    assert "not ABI-compatible" in msg and "llama_context_params" in msg
    assert "n_batch=0 (expected 2048)" in msg
    if abi.platform.machine() in ("x86_64", "AMD64"):
        assert "writes 168 bytes" in msg


def test_abi_probe_crash_is_caught_and_refused(tmp_path: Path) -> None:
    require_llamacpp()
    lib = _fake_libllama(tmp_path, "void llama_model_default_params(void) { abort(); }\n")
    with pytest.raises(InputError, match="crashed the ABI probe"):
        abi.check_library(lib)
    # through the backend: refused before any worker starts or any GGUF is loaded
    with pytest.raises(InputError, match="crashed the ABI probe"):
        LlamaCppBackend().load(ROOT / "cases", BackendOptions(extra={"lib_path": str(lib)}))


# --- the pytest plugin ----------------------------------------------------------------------
@pytest.mark.slow
def test_plugin_skips_an_unsupported_architecture_and_runs_greedy(case) -> None:
    """Under --require-backends a Ling-2.6 case skips on upstream's converter (port coverage,
    not a missing backend); greedy items pass."""
    from harness.llamacpp.build import sdist_tree

    require_llamacpp()
    stock = sdist_tree() / "vendor" / "llama.cpp"  # upstream, without our port's patches
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "cases", "--cases", "flash-mini,ling3-mini",
         "--backends", f"llamacpp:tree={stock}", "--modes", "greedy", "--require-backends",
         "-p", "no:cacheprovider", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "3 passed, 3 skipped" in out, out[-4000:]  # three prompts a case
    assert "architecture not supported by this build" in out
