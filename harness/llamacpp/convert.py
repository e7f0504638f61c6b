"""HF checkpoint -> GGUF with the port's OWN ``convert_hf_to_gguf.py``, frictions made explicit.

The converter is part of the port under test (its tensor map and metadata ARE the port's view of
the model), so the harness never writes GGUFs itself for a checkpoint: it runs the converter of
the llama.cpp tree in use (default: the vendored tree of the pinned llama-cpp-python sdist; or any
checkout, e.g. a fork) in a subprocess with ``PYTHONPATH=<tree>/gguf-py``.

What stands between a checkpoint as transformers writes it and what the converter accepts is
handled in a STAGED copy (config rewritten, weights symlinked; the user's directory is never
touched), and every such step is returned as a finding about the port, e.g. the converter reading
its config through ``AutoConfig`` and losing the upstream key names (``norm_topk_prob``).  The
frictions are those of ``/work/shared/docs/ling3-crosscheck.md`` §1-6, detected, not assumed:
a checkpoint that does not need a fix gets none and no finding.

Results are cached under ``<cache>/gguf/<key>/`` with key = hash(checkpoint files' bytes,
converter sources, outtype, STAGING_VERSION); an architecture the tree cannot convert is cached
as such too, so a suite asks once.  An entry appears complete or not at all
(:func:`harness.core.atomic.staged_dir`), holds ``gguf.record.json`` (size + digest of the GGUF's
header and sampled blocks), and is checked against it before use: a truncated or corrupted entry
is removed and rebuilt, with a finding naming it.  The GGUF carries ``bailing_parity.fingerprint``
(the checkpoint's sampled-weights hash) and, for our port, ``bailing_parity.port_map``, added by
the shim through gguf-py's writer.  A tensor in two files, or tensors config.json does not account
for, are input errors before the converter runs; allowed extras are left out of the staged copy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.core import lifecycle
from harness.core.cache import file_sha256
from harness.core.errors import ArchitectureNotSupported, InputError, PortFailure
from harness.core.progress import Progress, converter_tensor, follow_log
from harness.llamacpp.identity import (
    checkpoint_identity,
    file_record,
    metadata_for,
    record_mismatch,
)
from references.tokenizer import write_tiny_tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
STAGING_VERSION = 2  # bump when the staging rules change: invalidates cached conversions
RECORD_NAME = "gguf.record.json"  # size + digest of the cached GGUF, checked before use
KV_FILE = ".bailing_parity_kv.json"  # in the staged dir: keys the shim adds to the GGUF
SHIM_MARKER = "BAILING_PARITY_SHIM "
LOG_TAIL_LINES = 30
# Names a checkpoint may carry that mean an architecture under another name (transformers'
# save_pretrained writes the class it instantiated); used when harness.backends.families has no
# alias.
ARCH_ALIASES = {"BailingHybridForCausalLM": "BailingMoeV3ForCausalLM"}
LING3_ARCH = "BailingMoeV3ForCausalLM"



class ConversionFailed(PortFailure):
    """The port's converter failed on an architecture it claims to support (a port finding)."""


@dataclass(frozen=True)
class Conversion:
    """One checkpoint converted (or refused) by one converter tree at one outtype."""

    gguf: Path | None  # None when the architecture is not supported
    outtype: str
    architecture: str
    converter: Path  # the convert_hf_to_gguf.py that ran
    findings: tuple[str, ...] = ()
    supported: bool = True
    reason: str = ""  # why not supported (the converter's own words)
    cached: bool = False
    seconds: float = 0.0  # converter wall time when it ran (0 for a cache hit)

    def require(self) -> Path:
        """The GGUF path, or ArchitectureNotSupported."""
        if not self.supported or self.gguf is None:
            raise ArchitectureNotSupported(self.reason)
        return self.gguf


@dataclass
class Staged:
    """A staged checkpoint dir plus what was done to it and what the converter must be told."""

    path: Path
    config: dict[str, Any]
    findings: list[str] = field(default_factory=list)
    bypass_autoconfig: list[str] = field(default_factory=list)  # upstream keys AutoConfig renames
    tokenizer_written: bool = False
    source_name: str = "checkpoint"  # the user's directory name, for general.name


# --- locations and hashes ---------------------------------------------------------------------
def default_tree() -> Path:
    """The converter of the default build: the pinned sdist's llama.cpp with our Ling-2.6 port's
    patches applied (they only add an architecture), or the plain sdist if ports/ is absent."""
    try:
        from ports.llamacpp.port import converter_tree
    except ImportError:
        from harness.llamacpp.build import sdist_tree

        return sdist_tree() / "vendor" / "llama.cpp"
    return converter_tree()


def resolve_tree(tree: Path | str | None) -> Path:
    """A llama.cpp root with ``convert_hf_to_gguf.py`` and ``gguf-py`` (InputError otherwise)."""
    root = default_tree() if tree is None else Path(tree).expanduser().resolve()
    if root.is_file() and root.name.endswith(".py"):
        root = root.parent
    if (root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        root = root / "vendor" / "llama.cpp"  # an llama-cpp-python sdist/checkout
    if not (root / "convert_hf_to_gguf.py").is_file() or not (root / "gguf-py").is_dir():
        raise InputError(f"{root}: not a llama.cpp tree (need convert_hf_to_gguf.py and gguf-py/)")
    return root


def converter_sources(tree: Path) -> list[Path]:
    """Every file whose change can change the converter's output."""
    files = [tree / "convert_hf_to_gguf.py"]
    for sub in ("conversion", "gguf-py/gguf"):
        if (tree / sub).is_dir():
            files += sorted(p for p in (tree / sub).rglob("*.py") if "__pycache__" not in p.parts)
    return files


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_digest(p: Path) -> str:
    """sha256 of a file's bytes, memoised per (path, inode, size, mtime) in this process, so a
    many-GB checkpoint is read once per session rather than once per load."""
    st = p.stat()
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(p)
    return _DIGESTS[key]


def _hash_files(h: Any, files: Iterable[Path], root: Path) -> None:
    for p in files:
        h.update(f"{p.relative_to(root)}\0{file_digest(p)}\0".encode())


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's top-level regular files (config, weights, index, tokenizer), sorted."""
    return sorted(p for p in checkpoint.iterdir() if p.is_file() and not p.name.startswith("."))


def cache_key(checkpoint: Path, tree: Path, outtype: str) -> str:
    """Hash of the checkpoint's identity (:func:`checkpoint_identity`: small files whole, weight
    files by size, mtime and sampled bytes) + converter sources + outtype + staging rules."""
    h = hashlib.sha256(f"{outtype}\0{STAGING_VERSION}\0".encode())
    h.update(checkpoint_identity(checkpoint).encode())
    h.update(b"\1")
    _hash_files(h, converter_sources(tree), tree)
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    from harness.llamacpp.build import cache_root

    return cache_root() / "gguf"


# --- safetensors headers (shapes without loading weights) -------------------------------------
def tensor_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape for every tensor in the checkpoint's ``*.safetensors`` (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(meta["shape"])
    return shapes


# --- staging: one function per friction, each returning its finding ---------------------------
def _canonical_architecture(config: dict[str, Any], path: Path) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else str(archs or "")
    try:
        from harness.backends.families import family_of

        return family_of(config, path).architecture
    except InputError:
        return ARCH_ALIASES.get(arch, arch)


def _fix_architecture(st: Staged, src: Path) -> None:
    archs = st.config.get("architectures") or []
    arch = archs[0] if archs else ""
    canonical = _canonical_architecture(st.config, src / "config.json")
    if canonical and canonical != arch:
        st.config["architectures"] = [canonical]
        st.findings.append(
            f"config.json names architecture {arch!r} (what transformers' save_pretrained "
            f"writes); convert_hf_to_gguf.py dispatches on architectures[0] and registers "
            f"{canonical!r}: staged a copy with architectures=[{canonical!r}]"
        )


def _transformers_attribute_map(model_type: str) -> dict[str, str]:
    """transformers' config aliases (upstream key -> transformers attribute) for a model_type."""
    try:
        from transformers import CONFIG_MAPPING

        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})
    except (ImportError, KeyError):
        return {}


def converter_text(tree: Path, architecture: str) -> str:
    """The converter code that handles ``architecture``: script, base class, model file."""
    texts = []
    for p in _dispatch_sources(tree):
        text = p.read_text(errors="replace")
        if p.name in ("convert_hf_to_gguf.py", "base.py", "__init__.py") or architecture in text:
            texts.append(text)
    return "\n".join(texts)


def _fix_key_names(st: Staged, tree: Path) -> None:
    """save_pretrained writes transformers' attribute names; the converter reads upstream ones.

    An upstream key is added only where the converter's code for this architecture quotes it
    and does not quote transformers' name (it reads ``num_experts`` itself, but never
    ``moe_renormalize``).
    """
    amap = _transformers_attribute_map(str(st.config.get("model_type", "")))
    arch = (st.config.get("architectures") or [""])[0]
    code = converter_text(tree, arch) if amap else ""
    added = []
    for upstream, tf_name in amap.items():
        if upstream in st.config or tf_name not in st.config:
            continue
        if f'"{upstream}"' in code and f'"{tf_name}"' not in code:
            st.config[upstream] = st.config[tf_name]
            added.append(f"{upstream}={st.config[upstream]!r} (from {tf_name})")
    if added:
        silent = ""
        if any(a.startswith("n_group=") for a in added):
            silent = (
                " (n_group is read with .get(): without it the GGUF silently has no "
                "expert_group_count and llama.cpp routes without the group limit)"
            )
        st.findings.append(
            "config.json carries transformers' attribute names where convert_hf_to_gguf.py "
            f"reads the upstream keys{silent}: staged a copy adding " + ", ".join(added)
        )
    renamed = [k for k in amap if k in st.config]
    if renamed:
        st.bypass_autoconfig = renamed


def _fix_ling3_keys(st: Staged, shapes: dict[str, tuple[int, ...]]) -> None:
    """Ling 3.0 keys the converter requires and transformers does not write (frictions 3, 5)."""
    if st.config.get("architectures", [""])[0] != LING3_ARCH:
        return
    c = st.config
    if "moe_shared_expert_intermediate_size" not in c and "moe_intermediate_size" in c:
        n_shared = int(c.get("num_shared_experts", c.get("n_shared_experts", 1)) or 1)
        c["moe_shared_expert_intermediate_size"] = int(c["moe_intermediate_size"]) * n_shared
        st.findings.append(
            "no moe_shared_expert_intermediate_size in config.json (transformers sizes the shared "
            "expert moe_intermediate_size x num_shared_experts and writes no key); the converter "
            "fails with KeyError: staged "
            f"moe_shared_expert_intermediate_size={c['moe_shared_expert_intermediate_size']}"
        )
    score_keys = ("score_function", "scoring_func", "score_func", "moe_router_activation")
    if not any(k in c for k in score_keys):
        c["score_function"] = "sigmoid"
        st.findings.append(
            "no score_function in config.json: the converter then writes no "
            "bailingmoe3.expert_gating_func and llama.cpp refuses the GGUF ('key not found'); "
            "transformers' BailingHybridTopkRouter is sigmoid: staged score_function='sigmoid'"
        )
    f_proj = [n for n in shapes if n.endswith(".attention.f_proj.weight")]
    if "no_kda_lora" not in c and f_proj:
        c["no_kda_lora"] = True
        st.findings.append(
            "no no_kda_lora in config.json (the converter refuses KDA without it); the "
            f"checkpoint's KDA gates are full-rank ({len(f_proj)} attention.f_proj, no LoRA "
            "pair): staged no_kda_lora=true"
        )
    n_head = c.get("num_attention_heads")
    head_wise = [
        n
        for n, s in shapes.items()
        if n.endswith(".attention.g_proj.weight") and s and s[0] == n_head
    ]
    if "gated_attention_proj_granularity_type" not in c and head_wise:
        c["gated_attention_proj_granularity_type"] = "head_wise"
        st.findings.append(
            "no gated_attention_proj_granularity_type in config.json (the converter requires "
            f"'head_wise'); the MLA g_proj weights are [num_heads={n_head}, hidden] (one gate per "
            "head): staged gated_attention_proj_granularity_type='head_wise'"
        )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def _fix_tokenizer(st: Staged, src: Path) -> None:
    if any((src / f).exists() for f in _TOKENIZER_FILES):
        return
    vocab = int(st.config.get("vocab_size") or 0)
    write_tiny_tokenizer(st.path, vocab)
    st.tokenizer_written = True
    st.findings.append(
        f"no tokenizer in the checkpoint (a synthetic case): wrote a tiny byte-level BPE "
        f"tokenizer ({vocab} tokens, one merge, tokenizer.json + tokenizer_config.json) into the "
        "staged copy so that the converter's _set_vocab_gpt2 runs; token ids are fed directly, "
        "so it never affects numbers"
    )


def _extra_tensors(checkpoint: Path, config: dict[str, Any]) -> list[str]:
    """Tensors a Ling-2.6 config does not account for (InputError unless extras are allowed);
    every family: a tensor in two files is refused.  A config the reference cannot read is left
    to the converter (its failure on it is a finding about the port)."""
    from references.checkpoint_io import check_extra_tensors, unaccounted, weight_files

    where = weight_files(checkpoint)
    try:
        from harness.backends.families import family_of
        from references.checkpoint_spec import expected_tensors

        family = family_of(config, checkpoint / "config.json")
        if family.name != "ling26":
            return []
        cfg = family.validate_config(config, checkpoint / "config.json")
    except InputError:
        return []
    extra = unaccounted(where, {s.name for s in expected_tensors(cfg)})
    check_extra_tensors(checkpoint, extra)
    return extra


def _stage_file(src: Path, dst: Path, drop: Sequence[str]) -> None:
    """Symlink ``src`` into the staged copy, or write it without the ``drop`` tensors."""
    from references.checkpoint_io import INDEX_NAME

    drop_set = set(drop)
    if src.name == INDEX_NAME and drop_set:
        index = json.loads(src.read_text())
        index["weight_map"] = {
            k: v for k, v in index["weight_map"].items() if k not in drop_set
        }
        dst.write_text(json.dumps(index, indent=2))
    elif src.suffix == ".safetensors" and drop_set & set(tensor_shapes_of(src)):
        _write_safetensors_without(src, dst, drop_set)
    else:
        dst.symlink_to(src.resolve())


def tensor_shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of one safetensors file (its header only)."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _write_safetensors_without(src: Path, dst: Path, drop: set[str]) -> None:
    """A copy of ``src`` without ``drop``: kept tensors' bytes copied as they are."""
    with src.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        start = 8 + n
        kept = sorted(
            (k for k in header if k != "__metadata__" and k not in drop),
            key=lambda k: header[k]["data_offsets"][0],
        )
        new: dict[str, Any] = {}
        if "__metadata__" in header:
            new["__metadata__"] = header["__metadata__"]
        offset = 0
        for k in kept:
            lo, hi = header[k]["data_offsets"]
            new[k] = {**header[k], "data_offsets": [offset, offset + hi - lo]}
            offset += hi - lo
        blob = json.dumps(new).encode()
        blob += b" " * (-len(blob) % 8)
        with dst.open("wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for k in kept:
                lo, hi = header[k]["data_offsets"]
                fh.seek(start + lo)
                out.write(fh.read(hi - lo))


def _port_map(tree: Path, config: dict[str, Any]) -> str | None:
    """Our port's tensor map name when ``tree`` is our port's converter (a cached copy under
    ``<cache>/port-convert``) and the checkpoint is Ling-2.6; else None."""
    from harness.llamacpp.build import cache_root

    try:
        from ports.llamacpp.port import PORT_NAME
    except ImportError:
        return None
    ours = (cache_root() / "port-convert").resolve()
    arch = _canonical_architecture(config, Path("config.json"))
    if arch == "BailingMoeV2_5ForCausalLM" and ours in Path(tree).resolve().parents:
        return PORT_NAME
    return None


def stage(checkpoint: Path, into: Path, tree: Path) -> Staged:
    """A converter-ready copy of ``checkpoint`` in ``into``: weights symlinked, config fixed."""
    cfg_path = checkpoint / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path}: cannot read config.json ({e})") from None
    into.mkdir(parents=True, exist_ok=True)
    st = Staged(path=into, config=config, source_name=checkpoint.name)
    extra = _extra_tensors(checkpoint, config)
    for f in checkpoint_files(checkpoint):
        if f.name != "config.json":
            _stage_file(f, into / f.name, extra)
    if extra:
        st.findings.append(
            f"{len(extra)} checkpoint tensor(s) config.json does not account for were left out "
            f"of the staged copy (extra tensors allowed): {', '.join(extra[:5])}"
            + (f" (and {len(extra) - 5} more)" if len(extra) > 5 else "")
        )

    (into / KV_FILE).write_text(json.dumps(metadata_for(checkpoint, _port_map(tree, config))))
    _fix_architecture(st, checkpoint)
    _fix_key_names(st, tree)
    _fix_ling3_keys(st, tensor_shapes(checkpoint))
    _fix_tokenizer(st, checkpoint)
    (into / "config.json").write_text(json.dumps(st.config, indent=2))
    return st


# --- running the converter --------------------------------------------------------------------
# Runs the tree's converter as its own __main__ would, with at most two declared overrides that
# are printed (SHIM_MARKER lines) when they take effect, so findings report what happened; the
# bailing_parity.* keys staged in KV_FILE are added to every GGUF it writes (through gguf-py's
# own GGUFWriter, before its header is written: no second pass over the tensor data).
_SHIM = r"""
from harness.core.lifecycle import die_with_parent
die_with_parent()  # a SIGKILLed harness leaves no converter running
import json, runpy, sys
tree, bypass, marker = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, tree)
script = tree + "/convert_hf_to_gguf.py"
sys.argv = [script] + sys.argv[4:]
g = runpy.run_path(script, run_name="bailing_parity_convert")
def say(**kw):
    print(marker + json.dumps(kw), file=sys.stderr, flush=True)
mb = g.get("ModelBase")
if bypass:
    fn = getattr(mb, "load_hparams", None)
    if fn is None or "AutoConfig" not in getattr(fn, "__globals__", {}):
        say(autoconfig="absent")
    else:
        class RefusingAutoConfig:
            @staticmethod
            def from_pretrained(*a, **k):
                say(autoconfig="refused")
                raise ValueError("bailing-parity: AutoConfig refused; read config.json")
        fn.__globals__["AutoConfig"] = RefusingAutoConfig
def classes(root):
    seen, todo = [], [root]
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.append(c)
            todo += c.__subclasses__()
    return seen
def named_default(orig):
    def get_vocab_base_pre(self, tokenizer):
        try:
            return orig(self, tokenizer)
        except NotImplementedError as e:
            say(pre_tokenizer="default", error=str(e))
            return "default"
    return get_vocab_base_pre
if mb is not None:
    for c in classes(mb):
        if "get_vocab_base_pre" in vars(c):
            c.get_vocab_base_pre = named_default(vars(c)["get_vocab_base_pre"])
import os
kv_file = os.path.join(sys.argv[1], KV_FILE)
if os.path.isfile(kv_file):
    import gguf
    with open(kv_file) as fh:
        kv = json.load(fh)
    write_header = gguf.GGUFWriter.write_header_to_file
    def write_header_with_kv(self, *a, **k):
        for key, value in kv.items():
            self.add_string(key, value)
        return write_header(self, *a, **k)
    gguf.GGUFWriter.write_header_to_file = write_header_with_kv
g["main"]()
""".replace("KV_FILE", repr(KV_FILE))


def _run_converter(
    tree: Path, staged: Staged, outfile: Path, outtype: str, log: Path, timeout: float
) -> tuple[int, list[dict[str, Any]]]:
    """Run the shimmed converter; return (exit code, shim events)."""
    env = lifecycle.child_env(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree / "gguf-py")] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [
        sys.executable,
        "-c",
        _SHIM,
        str(tree),
        "1" if staged.bypass_autoconfig else "",
        SHIM_MARKER,
        str(staged.path),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype,
        "--model-name",
        staged.source_name,
    ]
    with (log.open("w+b") as fh,
          Progress(f"converting {staged.source_name} to GGUF ({outtype})") as progress,
          follow_log(log, progress, converter_tensor)):
        try:
            proc = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=log.parent
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(SHIM_MARKER):
            events.append(json.loads(line[len(SHIM_MARKER) :]))
    return rc, events


def _shim_findings(staged: Staged, events: list[dict[str, Any]]) -> list[str]:
    out = []
    if any(e.get("autoconfig") == "refused" for e in events):
        renames = ", ".join(staged.bypass_autoconfig)
        out.append(
            "convert_hf_to_gguf.py reads config through transformers' AutoConfig, whose "
            f"attribute map renames {renames} (e.g. norm_topk_prob -> moe_renormalize), and then "
            "fails with KeyError 'norm_topk_prob' (transformers >= 5.23): ran it with AutoConfig "
            "refused inside ModelBase.load_hparams so that it takes its own config.json fallback"
        )
    elif any(e.get("autoconfig") == "absent" for e in events):
        out.append(
            "this converter has no ModelBase.load_hparams reading AutoConfig: ran it unmodified"
        )
    if any(e.get("pre_tokenizer") == "default" for e in events):
        whose = "the harness's tiny" if staged.tokenizer_written else "the checkpoint's"
        out.append(
            f"convert_hf_to_gguf.py does not recognise {whose} BPE pre-tokenizer by its hash "
            "('BPE pre-tokenizer was not recognized', NotImplementedError in "
            "get_vocab_base_pre): the run named it 'default' (tokenizer.ggml.pre)"
        )
    return out


def _unsupported_reason(log_text: str, architecture: str, tree: Path) -> str | None:
    """The converter's own words when it does not know the architecture, else None."""
    needle = f"Model {architecture} is not supported"
    if needle in log_text:
        return f"architecture not supported by this build: its converter says '{needle}' ({tree})"
    registered = any(architecture in p.read_text(errors="replace") for p in _dispatch_sources(tree))
    if not registered:
        return (
            f"architecture not supported by this build: {architecture!r} appears nowhere in the "
            f"converter of {tree}"
        )
    return None


def _dispatch_sources(tree: Path) -> list[Path]:
    """Where a converter registers model classes: the script and its ``conversion/`` package."""
    return [tree / "convert_hf_to_gguf.py", *sorted((tree / "conversion").glob("*.py"))]


def _tail(text: str, n: int = LOG_TAIL_LINES) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith(SHIM_MARKER)]
    return "\n".join(lines[-n:])


def convert(
    checkpoint: Path | str,
    outtype: str = "f32",
    *,
    tree: Path | str | None = None,
    cache: Path | None = None,
    timeout: float = 3600.0,
    force: bool = False,
) -> Conversion:
    """Convert (or fetch from the cache) ``checkpoint`` with ``tree``'s converter.

    Returns a :class:`Conversion`; an architecture the tree does not know comes back with
    ``supported=False`` and the reason; any other converter failure raises ConversionFailed.
    """
    if outtype not in OUTTYPES:
        raise InputError(f"unknown GGUF outtype {outtype!r}; known: {', '.join(OUTTYPES)}")
    checkpoint = Path(checkpoint).expanduser().resolve()
    if not (checkpoint / "config.json").is_file():
        raise InputError(f"{checkpoint}: no config.json (expected an HF checkpoint directory)")
    root = resolve_tree(tree)
    key = cache_key(checkpoint, root, outtype)
    out_dir = (cache or cache_dir()) / key
    result_path = out_dir / "conversion.json"
    if not force:
        with contextlib.suppress(StaleCacheEntry):  # rechecked, and rebuilt, under the lock
            if (hit := _cached(result_path)) is not None:
                return hit

    from harness.core.atomic import locked

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with locked(out_dir.parent / f".{key}.lock"):
        rebuilt = None
        if not force:
            try:
                if (hit := _cached(result_path)) is not None:
                    return hit
            except StaleCacheEntry as stale:
                rebuilt = f"{stale}: removed and rebuilt"
                shutil.rmtree(out_dir, ignore_errors=True)
        result = _convert_into(checkpoint, root, outtype, out_dir, timeout)
    if rebuilt:
        result = replace(result, findings=(*result.findings, rebuilt))
    return result


def _convert_into(
    checkpoint: Path, root: Path, outtype: str, out_dir: Path, timeout: float
) -> Conversion:
    """Run the converter in a temporary sibling of ``out_dir``, renamed to it once complete
    (removed on any exception, KeyboardInterrupt and termination included)."""
    from harness.core.atomic import staged_dir

    with staged_dir(out_dir, replace=True) as work:
        staged = stage(checkpoint, work / "staged", root)
        arch = (staged.config.get("architectures") or ["?"])[0]
        outfile = work / f"model-{outtype}.gguf"
        t0 = time.monotonic()
        log = work / "convert.log"
        rc, events = _run_converter(root, staged, outfile, outtype, log, timeout)
        seconds = round(time.monotonic() - t0, 2)
        log_text = log.read_text(errors="replace")
        findings = tuple(staged.findings + _shim_findings(staged, events))
        if rc != 0 or not outfile.is_file():
            reason = _unsupported_reason(log_text, arch, root)
            if reason is None:
                why = "timed out" if rc == -9 else f"exited with code {rc}"
                raise ConversionFailed(
                    f"convert_hf_to_gguf.py ({root}) {why} on {checkpoint} ({arch}, {outtype})"
                    + "".join(f"\n  after staging: {f}" for f in findings)
                    + f"\n--- converter log tail ---\n{_tail(log_text)}"
                )
            result = Conversion(
                None, outtype, arch, root / "convert_hf_to_gguf.py", findings, False, reason,
                seconds=seconds,
            )
        else:
            result = Conversion(
                out_dir / outfile.name, outtype, arch, root / "convert_hf_to_gguf.py",
                findings, seconds=seconds,
            )
            (work / RECORD_NAME).write_text(json.dumps(file_record(outfile), indent=2))
        for copy in (work / "staged").glob("*.safetensors"):
            if not copy.is_symlink():
                copy.unlink()  # a copy without extra tensors: not worth its disk space
        (work / "staged").rename(work / "staged-copy")  # kept for inspection
        _save_result(work / "conversion.json", result)
    return result


class StaleCacheEntry(Exception):
    """A cache entry whose GGUF no longer matches the record written at conversion time."""


def _cached(result_path: Path) -> Conversion | None:
    """The cached conversion, None when there is none, StaleCacheEntry when its GGUF no longer
    matches its record (truncated, corrupted in place, lost, or no record at all)."""

    if not result_path.is_file():
        return None
    entry = result_path.parent
    try:
        result = _load_result(result_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StaleCacheEntry(f"cache entry {entry}: unreadable conversion.json ({e})") from None
    if result.gguf is None:
        return result
    try:
        record = json.loads((entry / RECORD_NAME).read_text())
    except (OSError, ValueError) as e:
        raise StaleCacheEntry(f"cache entry {entry}: no readable {RECORD_NAME} ({e})") from None
    why = record_mismatch(result.gguf, record)
    if why is not None:
        raise StaleCacheEntry(f"cache entry {entry}: {why}")
    return result


def _save_result(path: Path, result: Conversion) -> None:
    d = asdict(result)
    d["gguf"] = result.gguf.name if result.gguf else None
    d["converter"] = str(result.converter)
    d["findings"] = list(result.findings)
    path.write_text(json.dumps(d, indent=2))


def _load_result(path: Path) -> Conversion:
    d = json.loads(path.read_text())
    gguf = path.parent / d["gguf"] if d.get("gguf") else None
    return Conversion(
        gguf=gguf,
        outtype=d["outtype"],
        architecture=d["architecture"],
        converter=Path(d["converter"]),
        findings=tuple(d["findings"]),
        supported=d["supported"],
        reason=d["reason"],
        cached=True,
        seconds=0.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.llamacpp.convert CHECKPOINT [--outtype f32] [--tree DIR]``."""
    ap = argparse.ArgumentParser(prog="python -m harness.llamacpp.convert", description=__doc__)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--outtype", default="f32", choices=OUTTYPES)
    ap.add_argument("--tree", type=Path, default=None, help="llama.cpp checkout (default: sdist)")
    ap.add_argument("--force", action="store_true", help="ignore the cache")
    args = ap.parse_args(argv)
    try:
        res = convert(args.checkpoint, args.outtype, tree=args.tree, force=args.force)
    except (InputError, PortFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    for f in res.findings:
        print(f"finding: {f}")
    if not res.supported:
        print(res.reason)
        return 1
    print(res.gguf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
