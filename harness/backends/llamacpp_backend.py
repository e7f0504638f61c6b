"""llama.cpp as a candidate: the port's own converter, an inventory, then an out-of-process worker.

``load`` runs the whole chain a user of llama.cpp runs: the checkpoint is converted by the port's
``convert_hf_to_gguf.py`` (:mod:`harness.llamacpp.convert`, cached; the frictions it needed are
``model.findings``), the GGUF is checked against the port's tensor map and the checkpoint
(:mod:`harness.llamacpp.inventory`), and llama.cpp runs in a child process
(:class:`harness.llamacpp.client.WorkerClient`), so an abort, segfault or hang in the port is a
:class:`PortFailure` and the suite goes on.

dtype -> GGUF outtype: float32 -> f32, float16 -> f16, bfloat16 -> bf16 (llama.cpp has no float64
weights).  ``extra`` options (each one changes numbers or what runs, so each is in the target
label when given):

- ``outtype``: f32|f16|bf16|q8_0, overrides the dtype's outtype;
- ``quant``: a llama.cpp quantization type (Q8_0, Q4_K_M, Q5_K_M, IQ4_NL, Q4_0 ...): the f32
  conversion is quantized by llama.cpp's own quantizer (:mod:`harness.quant.gguf_quantize`,
  cached) with the build that runs the candidate; the label is ``llamacpp-<TYPE>``.  It excludes
  ``gguf=`` and a non-f32 ``outtype=`` / dtype (there is one f32 source to quantize);
- ``type_k`` / ``type_v``: KV cache type f32|f16|bf16|q8_0 (default f32: the f16 cache alone
  costs ~1e-4 relative error); ``type_v`` defaults to ``type_k``, since llama.cpp refuses
  different K and V types on an MLA model (both families), which is an input error here;
  ``flash_attn``: 0/1 (default 0);
- ``n_ctx`` (default 4096), ``n_batch`` / ``n_ubatch`` (default 512: a longer prompt runs as
  several graphs, captures concatenated), ``n_threads`` (default: all cores);
- ``tree``: a llama.cpp checkout whose converter to use (a fork); ``site``: a private site dir from
  ``python -m harness.llamacpp.build --site --patch ...`` to run a patched build;
  ``lib_path``: a directory holding a user's own libllama (as ``LLAMA_CPP_LIB_PATH``, which is
  honoured too), ABI-checked first (:mod:`harness.llamacpp.abi`);
- ``gguf``: a GGUF to run instead of converting (still inventoried against the checkpoint); one
  of another architecture, other shape-defining hyperparameters or element counts, or other
  weights (its ``bailing_parity.fingerprint``, else a few dequantized norms) is an input error;
- ``timeout``: seconds one feed may take before the worker counts as hung (default 300);
- ``mtp_chain`` / ``mtp_rollback`` / ``mtp_rs_seq``: the MTP driver's (:mod:`harness.llamacpp.mtp`).

All of them are :class:`LlamaCppOptions`, parsed once from the target's strings.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from harness.backends.base import Availability, BackendOptions, Captures
from harness.backends.options import parse_options as parse_typed
from harness.core.errors import ArchitectureNotSupported, InputError, PortFailure
from harness.llamacpp.convert import OUTTYPES

DTYPE_OUTTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
KV_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_N_CTX = 4096
_UNKNOWN_ARCH = "unknown model architecture"

__all__ = [
    "ArchitectureNotSupported", "LlamaCppBackend", "LlamaCppModel", "candidate_gguf",
    "model_findings",
]


@dataclass(frozen=True)
class Settings:
    """The backend options, parsed and validated."""

    outtype: str
    params: Any  # harness.llamacpp.client.ContextParams
    tree: Path | None = None
    site: Path | None = None
    lib_path: Path | None = None
    gguf: Path | None = None
    timeout: float = 300.0
    quant: str | None = None  # llama.cpp's type name (upper case), applied to the f32 conversion


@dataclass(frozen=True)
class LlamaCppOptions:
    """The llama.cpp candidate's knobs as typed values (None: the default the module doc gives)."""

    outtype: Literal[OUTTYPES] | None = None  # type: ignore[valid-type]
    type_k: Literal[KV_TYPES] | None = None  # type: ignore[valid-type]
    type_v: Literal[KV_TYPES] | None = None  # type: ignore[valid-type]
    flash_attn: bool = False
    n_ctx: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    n_threads: int | None = None
    tree: Path | None = None
    site: Path | None = None
    lib_path: Path | None = None
    gguf: Path | None = None
    timeout: int | None = None
    mtp_chain: Literal["nextn", "l_out"] = "nextn"
    mtp_rollback: Literal["state", "seq_rm"] = "state"
    mtp_rs_seq: int = 8  # rollback planes under mtp_rollback=seq_rm: a verification of chain <= 7
    quant: str | None = None  # a llama.cpp quantization type, normalized to its upper-case name

    def __post_init__(self) -> None:
        for key in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "timeout", "mtp_rs_seq"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"option {key}={value!r} must be a positive integer")
        if self.quant is not None:
            object.__setattr__(self, "quant", _quant_name(self.quant))
            if self.gguf is not None:
                raise ValueError(
                    f"options quant={self.quant} and gguf={self.gguf} exclude each other: gguf= "
                    "runs the given file as it is (quantize it beforehand, or drop gguf=)")
            if self.outtype not in (None, "f32"):
                raise ValueError(
                    f"options quant={self.quant} and outtype={self.outtype} exclude each other: "
                    "quant= quantizes the f32 conversion (drop outtype=)")


def _quant_name(qtype: str) -> str:
    """llama.cpp's name for ``qtype``; ValueError (the options parser's InputError) if unknown."""
    from harness.quant.gguf_quantize import normalize_qtype

    try:
        return normalize_qtype(qtype)
    except InputError as e:
        raise ValueError(f"option quant={qtype!r}: {e}") from None


def llamacpp_options(options: BackendOptions) -> LlamaCppOptions:
    """The typed options a target parsed, or ``options.extra`` parsed now (direct callers)."""
    if isinstance(options.settings, LlamaCppOptions):
        return options.settings
    return parse_typed(LlamaCppOptions, options.extra, "llamacpp")


def parse_options(options: BackendOptions) -> Settings:
    """BackendOptions -> Settings; InputError names the bad option and what is allowed."""
    from harness.llamacpp.client import ContextParams

    opts = llamacpp_options(options)
    if opts.quant is not None and options.dtype != "float32":
        raise InputError(
            f"llamacpp: option quant={opts.quant} and dtype {options.dtype} exclude each other: "
            "quant= quantizes the f32 conversion (use llamacpp:quant=... with dtype float32)")
    if opts.outtype is not None:
        outtype = opts.outtype
    elif options.dtype in DTYPE_OUTTYPE:
        outtype = DTYPE_OUTTYPE[options.dtype]
    else:
        raise InputError(
            f"llamacpp: no GGUF type for dtype {options.dtype!r} (llama.cpp has no float64 "
            f"weights); known: {', '.join(DTYPE_OUTTYPE)}"
        )
    n_ctx = opts.n_ctx or DEFAULT_N_CTX
    n_batch = opts.n_batch or min(512, n_ctx)
    n_ubatch = opts.n_ubatch or n_batch
    type_k = opts.type_k or "f32"
    params = ContextParams(
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=min(n_ubatch, n_batch),
        type_k=type_k,
        # V follows K unless given: MLA models (every family here) need equal K and V types
        type_v=opts.type_v or type_k,
        n_threads=opts.n_threads,
        flash_attn=opts.flash_attn,
    )
    if opts.gguf is not None and not opts.gguf.is_file():
        raise InputError(f"llamacpp: gguf={opts.gguf}: file not found")
    lib_env = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Settings(
        outtype=outtype,
        params=params,
        tree=opts.tree,
        site=opts.site,
        lib_path=opts.lib_path or (Path(lib_env) if lib_env else None),
        gguf=opts.gguf,
        timeout=float(opts.timeout or 300),
        quant=opts.quant,
    )


@dataclass(frozen=True)
class PreparedGguf:
    """What loading a checkpoint into llama.cpp starts from, for the capture and MTP workers."""

    gguf: Path
    env: dict[str, str] | None  # the worker's environment (LLAMA_CPP_LIB_PATH for a foreign lib)
    family: Any  # harness.backends.families.Family
    findings: list[str]  # converter frictions, a user-given GGUF, the inventory's findings
    inventory: Any  # harness.llamacpp.inventory.Inventory
    inventory_findings: list[str]
    config: dict[str, Any]  # the checkpoint's config.json


def _read_config(checkpoint: Path) -> tuple[dict[str, Any], Any]:
    """(config.json, family) of a checkpoint dir; InputError names an unreadable config."""
    from harness.backends.families import family_of

    cfg_path = checkpoint / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path}: cannot read ({e})") from None
    return config, family_of(config, cfg_path)


def _built_gguf(checkpoint: Path, settings: Settings, family: Any) -> tuple[Path, list[str]]:
    """The converted GGUF (cached), quantized by llama.cpp when ``quant`` is set (cached), with
    the converter's findings; ArchitectureNotSupported when the converter lacks the family."""
    from harness.llamacpp.convert import convert

    conv = convert(checkpoint, settings.outtype, tree=settings.tree)
    if not conv.supported:
        raise ArchitectureNotSupported(
            f"{conv.reason}; the checkpoint is {family.name} ({family.architecture})"
        )
    gguf = conv.require()
    if settings.quant is not None:
        from harness.quant.gguf_quantize import quantize

        # the build that runs the candidate quantizes (site None: the installed llama_cpp)
        gguf = quantize(gguf, settings.quant, site=settings.site)
    return gguf, list(conv.findings)


def candidate_gguf(target_or_options: Any, checkpoint_dir: Path) -> Path:
    """The exact GGUF file a llama.cpp target runs on ``checkpoint_dir``: the f32 (or outtype)
    conversion, its ``quant=`` quantization, or the user's ``gguf=`` file; built and cached as
    needed, without loading the model (a dequantized reference reads the same file).

    ``target_or_options``: a :class:`~harness.backends.targets.Target` or
    :class:`BackendOptions` of the llamacpp backend.
    """
    from harness.backends.targets import options_of

    settings = parse_options(options_of(target_or_options, "llamacpp", "GGUF"))
    if settings.gguf is not None:
        return settings.gguf.resolve()
    checkpoint = Path(checkpoint_dir).expanduser().resolve()
    _, family = _read_config(checkpoint)
    return _built_gguf(checkpoint, settings, family)[0]


def prepare_gguf(checkpoint_dir: Path, settings: Settings) -> PreparedGguf:
    """ABI-check a foreign library first (before any work), read config.json, convert (cached)
    and quantize (``quant``, cached) unless the user gave a GGUF, and inventory the GGUF against
    the checkpoint."""
    from harness.llamacpp import abi, identity
    from harness.llamacpp.inventory import inventory, read_gguf, render
    from harness.llamacpp.tensor_maps import PORT_MAPS

    checkpoint = Path(checkpoint_dir).expanduser().resolve()
    env = None
    if settings.lib_path is not None:
        abi.check_library(settings.lib_path, site=settings.site)
        env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(settings.lib_path.resolve()))
    config, family = _read_config(checkpoint)
    findings: list[str] = []
    if settings.gguf is not None:
        gguf = settings.gguf.resolve()
        findings.append(f"GGUF given by the user, not converted here: {gguf}")
        meta, _ = read_gguf(gguf)
        identity.check_architecture(gguf, str(meta.get("general.architecture", "")), family)
    else:
        gguf, conv_findings = _built_gguf(checkpoint, settings, family)
        findings += conv_findings
        meta, _ = read_gguf(gguf)
    _check_kv_types(settings, meta)
    inv = inventory(gguf, checkpoint)
    if settings.gguf is not None:
        keys = PORT_MAPS[inv.port].config_keys if inv.port else {}
        findings += identity.check_user_gguf(gguf, checkpoint, meta, inv, config, keys)
    inv_findings = render(inv)
    return PreparedGguf(gguf, env, family, [*findings, *inv_findings], inv, inv_findings, config)


def _check_kv_types(settings: Settings, meta: dict[str, Any]) -> None:
    """llama.cpp refuses different K and V cache types on an MLA model: say so before loading."""
    p = settings.params
    arch = meta.get("general.architecture", "")
    if p.type_k != p.type_v and f"{arch}.attention.key_length_mla" in meta:
        raise InputError(
            f"llamacpp: type_k={p.type_k} and type_v={p.type_v} differ, but {arch} is an MLA "
            f"model and llama.cpp needs equal K and V cache types (give type_k alone: type_v "
            "follows it)"
        )


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python, driven out of process."""

    name = "llamacpp"

    def availability(self) -> Availability:
        """llama_cpp and gguf importable (nothing native is loaded here)."""
        from harness.llamacpp.build import missing_llamacpp

        reason = missing_llamacpp()
        return Availability(False, reason) if reason else Availability(True)

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> LlamaCppModel:
        """Convert (cached), inventory, ABI-check a foreign library, start a worker, load."""
        from harness.llamacpp.client import WorkerClient

        settings = parse_options(options)
        prep = prepare_gguf(checkpoint_dir, settings)
        gguf, env, family, findings = prep.gguf, prep.env, prep.family, prep.findings
        inv, inv_findings = prep.inventory, prep.inventory_findings

        client = WorkerClient(
            env=env, site=settings.site, timeout=settings.timeout, label=f"llama.cpp ({gguf.name})"
        )
        try:
            info = client.load(gguf, settings.params)
        except PortFailure as e:
            client.close()
            text = str(e)
            if _UNKNOWN_ARCH in text:
                raise ArchitectureNotSupported(
                    f"architecture not supported by this build: libllama refuses GGUF "
                    f"architecture {inv.arch!r} ({_UNKNOWN_ARCH}); the checkpoint is "
                    f"{family.name} ({family.architecture})"
                ) from None
            raise PortFailure(
                text + "".join(f"\n  {f}" for f in inv_findings or ["inventory: clean"])
            ) from None
        except BaseException:
            client.close()
            raise
        return LlamaCppModel(client, info, gguf, settings, findings, inv.arch)


@dataclass
class LlamaCppModel:
    """A GGUF loaded in a worker; one live session at a time (a new start() resets the cache)."""

    client: Any  # WorkerClient
    info: dict[str, Any]
    gguf: Path
    settings: Settings
    findings: list[str] = field(default_factory=list)
    arch: str = ""
    n_layers: int = 0
    port: Any = None  # harness.llamacpp.names.PortNames, None when the arch has no name map
    _generation: int = 0

    def __post_init__(self) -> None:
        from harness.llamacpp.known_ports import port_for_arch

        n_layer, nextn = int(self.info["n_layer"]), int(self.info.get("n_layer_nextn") or 0)
        # llama_model_n_layer counts the trunk; guard against a build that counts MTP blocks too
        self.n_layers = n_layer - nextn if n_layer > nextn and self._counts_mtp() else n_layer
        try:
            self.port = port_for_arch(self.arch or str(self.info.get("arch", "")))
        except KeyError:
            self.port = None
            self.findings.append(
                f"no eval-callback name map for GGUF architecture {self.arch!r}: only logits "
                "are compared (register a PortNames in harness.llamacpp.names)"
            )
        weakref.finalize(self, self.client.close)

    def _counts_mtp(self) -> bool:
        from harness.llamacpp.inventory import read_gguf

        meta, _ = read_gguf(self.gguf)
        return int(meta.get(f"{self.arch}.block_count", 0)) == int(self.info["n_layer"])

    def describe(self) -> dict[str, Any]:
        """What ran: GGUF, outtype and every context parameter (for reports)."""
        return {"gguf": str(self.gguf), "outtype": self.settings.outtype,
                **({"quant": self.settings.quant} if self.settings.quant else {}),
                **self.settings.params.record(), "n_threads_used": self.info.get("n_threads")}

    def start(self, capture: Collection[str] = ()) -> LlamaCppSession:
        """A fresh sequence: KV cache and recurrent state cleared in the worker."""
        if self.client.info.get("n_past"):
            self.client.reset()
        self._generation += 1
        return LlamaCppSession(self, self._generation, frozenset(capture))

    def close(self) -> None:
        self.client.close()


@dataclass
class LlamaCppSession:
    """One sequence in the worker; superseded (and refusing to feed) once start() runs again."""

    model: LlamaCppModel
    generation: int
    capture: frozenset[str]

    def feed(self, tokens: Sequence[int]) -> Captures:
        from harness.llamacpp.names import to_canonical, wanted_names

        m = self.model
        if self.generation != m._generation:
            raise RuntimeError("this llama.cpp session was superseded by a later start()")
        tokens = [int(t) for t in tokens]
        points = set(self.capture) - {"result_output"}
        wanted = wanted_names(m.port, points) if m.port is not None else set()
        r = m.client.feed(tokens, wanted, timeout=m.settings.timeout)
        caps = to_canonical(m.port, r.tensors, points, len(tokens)) if m.port else {}
        caps["result_output"] = np.asarray(r.logits, dtype=np.float64)
        return caps


def model_findings(models: Iterable[Any]) -> list[str]:
    """The ``findings`` of every loaded model that has them (for run reports), deduplicated."""
    seen: dict[str, None] = {}
    for m in models:
        for f in getattr(m, "findings", ()) or ():
            seen.setdefault(f, None)
    return list(seen)
