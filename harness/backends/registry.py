"""Every implementation the harness can run, keyed by (backend, family), with what it can do.

One entry per (backend name, model family): the class that loads it, its options dataclass, its
default dtype, its MTP loader if it has one, and its declared :class:`Capabilities` (the way
transformers' model testers declare flags).  Test items, CLI validation and the MTP check read
these declarations instead of probing objects; ``tests/test_registry.py`` exercises every declared
capability on a case, so a declaration a backend does not live up to fails there.

Names say what runs: ``torch`` is our PyTorch reference (Ling-2.6), ``transformers`` is
transformers' ``BailingHybridForCausalLM`` (Ling 3.0).  ``torch`` on a Ling 3.0 checkpoint is kept
as an alias of ``transformers`` (with a finding) because the stored baseline and every Ling 3.0
run are labelled ``torch-float32`` / ``torch-float64``.

Adding a backend: write its module (a class with ``name``, ``availability()`` and
``load(checkpoint_dir, BackendOptions)``, plus a frozen options dataclass) and add one
:class:`Implementation` per family to :data:`REGISTRY`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.backends.base import Availability, Backend, BackendOptions, LoadedModel
from harness.backends.options import parse_options
from harness.core.errors import InputError
from harness.core.lazy import resolve


@dataclass(frozen=True)
class Capabilities:
    """What one implementation can do; each flag is exercised by tests/test_registry.py."""

    captures: bool = True  # intermediate capture points, not only the logits
    decode: bool = True  # a session cache: a prefill, then one-token feeds
    greedy: bool = True  # greedy decoding through that cache
    mtp: bool = False  # speculative decoding with the MTP head (it has an MTP loader)
    mtp_captures: bool = False  # its MTP model captures mtp_* points teacher-forced
    slope_introspection: bool = False  # exposes its GLA decays (the slopes check reads them)
    quantized: bool = False  # runs quantized weights (``quant=<TYPE>``, mlx ``bits=``)

    def declared(self) -> tuple[str, ...]:
        """The capabilities this implementation claims, by name."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name))


CAPABILITIES = tuple(f.name for f in dataclasses.fields(Capabilities))


@dataclass(frozen=True)
class Implementation:
    """One backend on one family: how to load it and what it declares."""

    backend: str
    family: str
    summary: str  # what runs, in words
    loader: str  # "module:Class" of a harness.backends.base.Backend
    options: str  # "module:Class" of its frozen options dataclass
    capabilities: Capabilities
    # "module:function(checkpoint_dir, BackendOptions, label) -> harness.checks.mtp.MtpModel"
    mtp_loader: str | None = None
    default_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.capabilities.mtp != (self.mtp_loader is not None):
            raise ValueError(f"{self.backend}/{self.family}: mtp is declared "
                             f"{self.capabilities.mtp} but the MTP loader is {self.mtp_loader!r}")

    def backend_object(self) -> Backend:
        return resolve(self.loader)()

    def options_class(self) -> type:
        return resolve(self.options)

    def parse_options(self, values: Mapping[str, str]) -> Any:
        """The option strings as this implementation's dataclass (InputError names the key)."""
        return parse_options(self.options_class(), values, self.backend)

    def typed(self, options: BackendOptions) -> BackendOptions:
        """``options`` with ``settings`` of this implementation's class (re-parsed from the strings
        when an alias hands over another backend's)."""
        if isinstance(options.settings, self.options_class()):
            return options
        refuse = getattr(options.settings, "refuse_family", None)
        if refuse is not None:  # the alias's options may name what this family cannot do
            refuse(self.family)
        return dataclasses.replace(options, settings=self.parse_options(options.extra))

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> LoadedModel:
        return self.backend_object().load(Path(checkpoint_dir), self.typed(options))

    def load_mtp(self, checkpoint_dir: Path, options: BackendOptions, label: str) -> Any:
        """The model with its MTP head (InputError when none is declared)."""
        if self.mtp_loader is None:
            raise InputError(require_message(self.backend, self.family, "mtp"))
        loader: Callable[..., Any] = resolve(self.mtp_loader)
        return loader(Path(checkpoint_dir), self.typed(options), label)


_REFERENCE = Capabilities(mtp=True, mtp_captures=True, slope_introspection=True)

def _entries() -> list[Implementation]:
    b = "harness.backends."
    return [
        Implementation(
            "torch", "ling26", "our PyTorch reference (references.model)",
            b + "torch_backend:TorchBackend", b + "torch_backend:TorchOptions", _REFERENCE,
            mtp_loader=b + "torch_backend:load_mtp"),
        Implementation(
            "transformers", "ling3", "transformers' BailingHybridForCausalLM",
            b + "transformers_ling3:TransformersBackend",
            b + "transformers_ling3:TransformersOptions",
            Capabilities(mtp=True, mtp_captures=True),
            mtp_loader=b + "transformers_ling3:load_mtp"),
        Implementation(
            "mlx", "ling26", "mlx-lm's bailing_hybrid (or model_module=)",
            b + "mlx_backend:MlxBackend", b + "mlx_backend:MlxOptions",
            Capabilities(mtp=True, mtp_captures=True, slope_introspection=True, quantized=True),
            mtp_loader=b + "mlx_mtp:load_mlx_mtp"),
        Implementation(
            "mlx", "ling3", "mlx-lm's bailing_moe_v3 (or model_module=)",
            b + "mlx_backend:MlxBackend", b + "mlx_backend:MlxOptions",
            Capabilities(mtp=True, mtp_captures=True, quantized=True),
            mtp_loader=b + "mlx_mtp:load_mlx_mtp"),
        *(Implementation(
            "llamacpp", family, f"llama.cpp ({arch}) in a worker process",
            b + "llamacpp_backend:LlamaCppBackend", b + "llamacpp_backend:LlamaCppOptions",
            Capabilities(mtp=True, mtp_captures=True, quantized=True),
            mtp_loader="harness.backends.llamacpp_mtp:load_llamacpp_mtp")
          for family, arch in (("ling26", "our port's bailing_hybrid"),
                               ("ling3", "upstream bailingmoe3"))),
        *(Implementation(
            "hf_remote", family, "the checkpoint's own modeling code (auto_map) under "
            "trust_remote_code, in a child process",
            b + "hf_remote:HfRemoteBackend", "harness.backends.options:NoOptions",
            Capabilities())
          for family in ("ling26", "ling3")),
    ]


REGISTRY: dict[tuple[str, str], Implementation] = {(i.backend, i.family): i for i in _entries()}

# (backend, family) -> the backend that really runs, for names kept for their stored labels.
ALIASES: dict[tuple[str, str], str] = {("torch", "ling3"): "transformers"}


def backend_names() -> tuple[str, ...]:
    """Every backend name a target may use, in registry order."""
    return tuple(dict.fromkeys(b for b, _ in REGISTRY))


def families_of(backend: str) -> tuple[str, ...]:
    """The families ``backend`` has an implementation (or an alias) for."""
    own = [f for b, f in REGISTRY if b == backend]
    return tuple(dict.fromkeys(own + [f for b, f in ALIASES if b == backend]))


def _check_backend(backend: str) -> None:
    if backend not in backend_names():
        raise InputError(f"unknown backend {backend!r}; known: {', '.join(backend_names())}")


def implementation(backend: str, family: str) -> Implementation:
    """What ``backend`` runs on ``family`` (aliases followed); InputError names what exists."""
    _check_backend(backend)
    real = ALIASES.get((backend, family), backend)
    if (real, family) not in REGISTRY:
        runs = [b for b, f in REGISTRY if f == family] + [b for b, f in ALIASES if f == family]
        raise InputError(
            f"backend {backend!r} has no implementation for the {family} family (it runs: "
            f"{', '.join(families_of(backend))}); {family} runs on: {', '.join(runs)}")
    return REGISTRY[(real, family)]


def alias_note(backend: str, family: str) -> str | None:
    """The finding a run gets when ``backend`` on ``family`` is an alias (None: it is not)."""
    real = ALIASES.get((backend, family))
    if real is None:
        return None
    return (f"{backend} on a {family} checkpoint runs {REGISTRY[(real, family)].summary} (the "
            f"{real!r} backend); the name {backend!r} is kept for its stored labels: name "
            f"{real!r} to say what runs")


def options_class(backend: str) -> type:
    """The options dataclass of ``backend`` (one per backend name, whatever the family)."""
    _check_backend(backend)
    return next(i for (b, _), i in REGISTRY.items() if b == backend).options_class()


def default_dtype(backend: str) -> str:
    _check_backend(backend)
    return next(i for (b, _), i in REGISTRY.items() if b == backend).default_dtype


def supports(backend: str, family: str, capability: str) -> bool:
    """Whether ``backend`` on ``family`` declares ``capability`` (False: no implementation)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    try:
        impl = implementation(backend, family)
    except InputError:
        return False
    return bool(getattr(impl.capabilities, capability))


def backend_supports(backend: str, capability: str, family: str | None = None) -> bool:
    """:func:`supports` on ``family``, or (None) on any family ``backend`` runs."""
    families = (family,) if family is not None else families_of(backend)
    return any(supports(backend, f, capability) for f in families)


def require_message(backend: str, family: str, capability: str) -> str:
    """Why ``backend`` on ``family`` cannot do ``capability``, naming those that can."""
    able = [b for (b, f), i in REGISTRY.items() if f == family and getattr(i.capabilities,
                                                                          capability)]
    return (f"backend {backend!r} declares no {capability} capability for the {family} family; "
            f"those that do: {', '.join(able) or '(none)'}")


def require(backend: str, family: str, capability: str) -> Implementation:
    """The implementation, if it declares ``capability``; InputError naming those that do."""
    impl = implementation(backend, family)
    if not getattr(impl.capabilities, capability):
        raise InputError(require_message(backend, family, capability))
    return impl


class Dispatch:
    """A backend name as the :class:`Backend` protocol: each load picks the implementation for
    the checkpoint's family (read once, by :func:`harness.backends.families.checkpoint_family`)."""

    def __init__(self, name: str) -> None:
        _check_backend(name)
        self.name = name

    def availability(self) -> Availability:
        """The first implementation's (every family of a backend needs the same packages)."""
        return implementation(self.name, families_of(self.name)[0]).backend_object().availability()

    def implementation_for(self, checkpoint_dir: Path) -> Implementation:
        from harness.backends.families import checkpoint_family

        family = checkpoint_family(Path(checkpoint_dir)) or families_of(self.name)[0]
        return implementation(self.name, family)

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> LoadedModel:
        impl = self.implementation_for(checkpoint_dir)
        model = impl.load(checkpoint_dir, options)
        note = alias_note(self.name, impl.family)
        if note:
            try:
                findings = [*(getattr(model, "findings", None) or ()), note]
                model.findings = findings  # type: ignore[attr-defined]
            except AttributeError:  # a model with fixed attributes keeps only its own findings
                pass
        return model


def get_backend(name: str) -> Backend:
    """The named backend (InputError for an unknown name), dispatching by family at load."""
    return Dispatch(name)
