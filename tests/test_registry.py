"""Specification of the backend registry: one (backend, family) table whose declared capabilities
are what the implementations do, and typed options parsed once, with errors naming the key."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pytest

from harness.backends import registry
from harness.backends.base import Availability, BackendOptions, forward, greedy, stepwise
from harness.backends.families import FAMILIES, checkpoint_family
from harness.backends.options import NoOptions, parse_options
from harness.backends.registry import (
    REGISTRY,
    Capabilities,
    Implementation,
    alias_note,
    backend_names,
    implementation,
    options_class,
    require,
    supports,
)
from harness.backends.targets import REFERENCE, Target, parse_targets
from harness.checks.cases import CASES_DIR, load_case, load_cases, materialize
from harness.core.errors import InputError
from harness.core.lazy import resolve

DEFAULT_CANDIDATES = "torch,mlx,llamacpp"  # the pytest plugin's --backends default


# ---------------------------------------------------------------------------------------------
# The table


def _case_families() -> set[str]:
    cases = [load_case(p) for p in sorted(CASES_DIR.glob("*.toml"))]
    return {c.family for c in cases} | {c.family for c in load_cases(cases_dir=CASES_DIR / "bench")}


def test_every_pair_a_case_can_name_resolves() -> None:
    families = _case_families()
    assert families == set(FAMILIES)
    for family in families:
        for target in [*parse_targets(DEFAULT_CANDIDATES), Target.parse(REFERENCE)]:
            impl = target.implementation(family)
            assert impl.family == family
            assert callable(resolve(impl.loader))  # the module and class exist
            assert dataclasses.is_dataclass(impl.options_class())
            if impl.mtp_loader:
                assert callable(resolve(impl.mtp_loader))


def test_each_backend_name_has_one_options_class_and_default_dtype() -> None:
    for name in backend_names():
        impls = [i for (b, _), i in REGISTRY.items() if b == name]
        assert {i.options for i in impls} == {impls[0].options}
        assert {i.default_dtype for i in impls} == {impls[0].default_dtype}
        assert options_class(name) is impls[0].options_class()


def test_names_say_what_runs() -> None:
    assert implementation("torch", "ling26").loader.endswith("torch_backend:TorchBackend")
    real = implementation("transformers", "ling3")
    assert real.loader.endswith("transformers_ling3:TransformersBackend")
    # the Ling 3.0 reference keeps its stored label, and says what runs
    assert implementation("torch", "ling3") is real
    assert "transformers" in (alias_note("torch", "ling3") or "")
    assert alias_note("torch", "ling26") is None and alias_note("transformers", "ling3") is None


def test_a_backend_without_an_implementation_for_a_family_is_refused_by_name() -> None:
    with pytest.raises(InputError, match=r"'transformers' has no implementation for the ling26 "
                                         r"family \(it runs: ling3\); ling26 runs on: torch, mlx"):
        implementation("transformers", "ling26")
    with pytest.raises(InputError, match="unknown backend 'vllm'; known: torch, transformers"):
        implementation("vllm", "ling26")


def test_the_family_is_read_from_the_checkpoint() -> None:
    flash, ling3 = (materialize(load_case(CASES_DIR / f"{n}.toml"))
                    for n in ("flash-mini", "ling3-plain"))
    assert (checkpoint_family(flash), checkpoint_family(ling3)) == ("ling26", "ling3")
    dispatch = registry.Dispatch("torch")
    assert dispatch.implementation_for(ling3).backend == "transformers"
    assert dispatch.implementation_for(flash).backend == "torch"


def test_declaring_mtp_without_a_loader_is_refused() -> None:
    with pytest.raises(ValueError, match="mtp is declared True"):
        Implementation("x", "ling26", "", "m:C", "m:O", Capabilities(mtp=True))


# ---------------------------------------------------------------------------------------------
# Typed options


def test_options_are_parsed_once_when_the_target_is_built() -> None:
    t = Target.parse("llamacpp:type_k=f16:n_ctx=256:flash_attn=1:gguf=~/m.gguf")
    s = t.settings
    assert (s.type_k, s.n_ctx, s.flash_attn, s.gguf) == ("f16", 256, True, Path.home() / "m.gguf")
    assert t.options().settings is s  # the backend receives the typed object
    # labels are the strings the baseline is keyed by
    assert t.label == "llamacpp-float32,flash_attn=1,gguf=~/m.gguf,n_ctx=256,type_k=f16"
    assert Target.parse("llamacpp:type_k=f16").label == "llamacpp-float32,type_k=f16"
    mlx = Target.parse("mlx", {"model_module": "/x/my_port.py"})
    assert mlx.label == "mlx-float32,module=my_port.py"
    assert mlx.settings.model_module == Path("/x/my_port.py")


def test_an_unknown_key_names_the_key_the_backend_and_the_known_keys() -> None:
    with pytest.raises(InputError, match=r"llamacpp-float32: unknown option\(s\) \['type_kk'\]; "
                                         r"known: outtype, type_k, type_v"):
        Target.parse("llamacpp:type_kk=f16")
    with pytest.raises(InputError, match=r"mlx-float32: unknown option\(s\) \['chunk'\]; "
                                         r"known: model_module"):
        parse_targets("torch,mlx:chunk=64")
    with pytest.raises(InputError, match=r"hf_remote-float32: unknown option\(s\) \['x'\]"):
        Target.parse("hf_remote:x=1")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("llamacpp:n_ctx=lots", r"n_ctx='lots': expected an integer"),
        ("torch:chunk_size=1.5", r"chunk_size='1.5': expected an integer"),
        ("llamacpp:flash_attn=maybe", r"flash_attn='maybe': expected 0/1"),
        ("torch:gla_impl=fast", r"gla_impl='fast': expected one of chunked, recurrent"),
        ("llamacpp:type_k=q4_0", r"type_k='q4_0': expected one of f32, f16, bf16, q8_0"),
        ("llamacpp:n_ubatch=0", r"n_ubatch=0 must be a positive integer"),
        ("transformers:attn_implementation=flash", r"attn_implementation='flash'"),
    ],
)
def test_a_bad_value_names_the_key_and_the_value(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=rf"{spec.split(':')[0]}-float32: .*{message}"):
        Target.parse(spec)


def test_the_generic_parser_converts_every_field_type() -> None:
    @dataclasses.dataclass(frozen=True)
    class Knobs:
        n: int = 0
        x: float = 0.0
        on: bool = False
        path: Path | None = None
        mode: typing.Literal["a", "b"] = "a"
        name: str | None = None

    k = parse_options(Knobs, {"n": "3", "x": "0.5", "on": "yes", "path": "/p", "mode": "b",
                              "name": " y "}, "knobs")
    assert k == Knobs(3, 0.5, True, Path("/p"), "b", "y")
    assert parse_options(Knobs, {"path": ""}, "knobs").path is None  # key= keeps the default
    assert parse_options(NoOptions, {}, "none") == NoOptions()
    with pytest.raises(InputError, match=r"knobs: option x='fast': expected a number"):
        parse_options(Knobs, {"x": "fast"}, "knobs")


def test_an_alias_hands_its_strings_to_the_real_backend_options() -> None:
    from harness.backends.transformers_ling3 import TransformersOptions

    target = Target.parse("torch-float64", {"variant": "mtp_wrong_token"})
    typed = implementation("torch", "ling3").typed(target.options())
    assert typed.settings == TransformersOptions(variant="mtp_wrong_token")
    with pytest.raises(InputError, match=r"transformers: unknown option\(s\) \['gla_impl'\]"):
        implementation("torch", "ling3").typed(Target.parse("torch:gla_impl=recurrent").options())


# ---------------------------------------------------------------------------------------------
# Capabilities are what the backends do


def test_a_backend_declaring_no_mtp_is_refused_by_the_mtp_check(tmp_path: Path) -> None:
    from harness.checks.mtp import load_mtp_model
    from harness.checks.session import supports as check_supports

    flash = materialize(load_case(CASES_DIR / "flash-mini.toml"))
    assert not supports("hf_remote", "ling26", "mtp")
    assert not check_supports(Target.parse("hf_remote"), "mtp")
    assert check_supports(Target.parse("transformers"), "mtp")
    with pytest.raises(InputError, match=r"'hf_remote' declares no mtp capability for the ling26 "
                                         r"family; those that do: torch, mlx, llamacpp"):
        load_mtp_model(Target.parse("hf_remote"), flash)
    with pytest.raises(InputError, match="declares no slope_introspection"):
        require("llamacpp", "ling26", "slope_introspection")


def exercise(impl: Implementation, ckpt: Path, tokens: Sequence[int]) -> list[str]:
    """Every capability ``impl`` declares, tried on ``ckpt``: the ones it does not live up to."""
    from harness.checks.mtp_decoding import plain_greedy, speculative_greedy
    from harness.checks.slope_diagnostics import exposed_log_decays

    caps, failed = impl.capabilities, []
    options = BackendOptions(dtype="float32")
    model = impl.load(ckpt, options)
    full = forward(model, tokens)["result_output"]
    if caps.captures and "l_out-0" not in forward(model, tokens, ["l_out-0"]):
        failed.append("captures")
    if caps.decode:
        steps = stepwise(model, tokens, len(tokens) - 3)["result_output"]
        if not np.allclose(steps, full, rtol=1e-4, atol=1e-4):
            failed.append("decode")
    if caps.greedy and greedy(model, tokens, 3)[0] != int(np.argmax(full[-1])):
        failed.append("greedy")
    if caps.slope_introspection and exposed_log_decays(model) is None:
        failed.append("slope_introspection")
    if caps.quantized:
        hints = typing.get_type_hints(impl.options_class())
        if "bits" in hints:  # mlx: quantized by mlx-lm, it runs and its logits move
            q8 = impl.load(ckpt, BackendOptions(dtype="float32", extra={"bits": "8"}))
            logits = forward(q8, tokens)["result_output"]
            if not np.isfinite(logits).all() or np.array_equal(logits, full):
                failed.append("quantized")
        elif "q8_0" not in str(hints.get("outtype")):
            failed.append("quantized")
    if caps.mtp:
        mtp = impl.load_mtp(ckpt, options, impl.backend)
        if plain_greedy(mtp, tokens, 4) != list(speculative_greedy(mtp, tokens, 4, 1).tokens):
            failed.append("mtp")
        if caps.mtp_captures and not any(k.startswith("mtp_") for k in mtp.capture(tokens)):
            failed.append("mtp_captures")
    return failed


def _flash() -> tuple[Path, tuple[int, ...]]:
    case = load_case(CASES_DIR / "flash-mini.toml")
    return materialize(case), case.prompts[0].tokens


@pytest.mark.parametrize("backend", ["torch", "mlx", pytest.param("llamacpp",
                                                                  marks=pytest.mark.slow)])
def test_every_declared_capability_works_on_flash_mini(backend: str) -> None:
    impl = implementation(backend, "ling26")
    available = impl.backend_object().availability()
    if not available.ok:
        pytest.skip(f"{backend}: {available.reason}")
    assert exercise(impl, *_flash()) == []


class _LogitsOnlySession:
    def __init__(self, inner) -> None:
        self.inner = inner

    def feed(self, tokens: Sequence[int]):
        return {"result_output": self.inner.feed(tokens)["result_output"]}


class _LogitsOnlyModel:
    def __init__(self, inner) -> None:
        self.inner, self.n_layers = inner, inner.n_layers

    def start(self, capture: Collection[str] = ()) -> _LogitsOnlySession:
        return _LogitsOnlySession(self.inner.start(capture))


class LogitsOnlyBackend:
    """Our reference behind a wrapper that exposes logits only (no captures, no decays)."""

    name = "logits_only"

    def availability(self) -> Availability:
        return Availability(True)

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> _LogitsOnlyModel:
        from harness.backends.torch_backend import TorchBackend

        plain = BackendOptions(dtype=options.dtype)
        return _LogitsOnlyModel(TorchBackend().load(checkpoint_dir, plain))


def test_mutation_a_capability_declared_but_lacking_is_caught_on_flash_mini(monkeypatch) -> None:
    lying = Implementation("logits_only", "ling26", "logits only", f"{__name__}:LogitsOnlyBackend",
                           "harness.backends.options:NoOptions",
                           Capabilities(captures=True, slope_introspection=True))
    monkeypatch.setitem(REGISTRY, ("logits_only", "ling26"), lying)
    assert exercise(lying, *_flash()) == ["captures", "slope_introspection"]
    honest = dataclasses.replace(lying, capabilities=Capabilities(captures=False))
    assert exercise(honest, *_flash()) == []


def test_the_mtp_check_reads_mtp_captures_from_the_declaration(monkeypatch) -> None:
    from harness.checks.mtp import MtpPrompt, MtpRunner

    ckpt, tokens = _flash()
    prompt = MtpPrompt("flash-mini", "short", tokens)
    _, run = MtpRunner(steps=4).run(ckpt, prompt, [Target.parse("torch-float32")])
    assert run.mtp_first_divergence == "none"
    torch26 = REGISTRY["torch", "ling26"]
    no_captures = dataclasses.replace(torch26.capabilities, mtp_captures=False)
    monkeypatch.setitem(REGISTRY, ("torch", "ling26"),
                        dataclasses.replace(torch26, capabilities=no_captures))
    _, run = MtpRunner(steps=4).run(ckpt, prompt, [Target.parse("torch-float32")])
    assert run.mtp_first_divergence == "" and run.error == ""
